"""Acceptance tests: the real embedded model (SmolLM2-135M-Instruct), marked ``slow``."""
