"""Unit tests: synthetic tensors and data, configs, reports; no model (a tiny tokenizer at most)."""
