"""Figures as pure functions of saved results (CSV / safetensors) to matplotlib figures."""
