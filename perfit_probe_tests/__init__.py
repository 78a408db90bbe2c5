"""Tests of perfit-probe (not shipped in the package)."""
