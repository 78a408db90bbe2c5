"""Reproducibility: the versions that shape a run's numbers, and seeding once at the entry point."""

from __future__ import annotations

import platform
import random
from importlib import metadata

import numpy as np
import torch

import perfit_probe

VERSIONED_PACKAGES = (
    "torch", "transformers", "transformer-lens", "nnsight", "numpy", "scipy",
    "scikit-learn", "pandas", "safetensors", "peft", "gguf",
)


def package_versions() -> dict[str, str]:
    """Installed versions of perfit-probe and the libraries that shape its numbers."""
    out = {"perfit-probe": perfit_probe.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) once; return a torch generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
