"""Evaluation: LaMP metrics, the LoRA-per-user baseline, the results table and causal checks."""
