"""Integration tests: tiny random-init models (``tiny.py``), the CLI and the pipeline on tiny runs."""
