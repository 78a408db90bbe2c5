"""Activation backends: one small interface, three implementations.

Every backend takes a padded batch of token ids and a list of canonical ``Site`` objects and
returns, for each site, the activations ``[batch, seq, d_model]`` of that batch. They differ
only in how they reach inside the model:

- ``hooks``: plain PyTorch forward hooks on the Hugging Face model (the reference, and the
  fastest: it can stop the forward pass after the deepest requested layer);
- ``transformer_lens``: a transformer-lens 4.x ``TransformerBridge`` over the same HF model,
  without weight processing so values match Hugging Face's;
- ``nnsight``: an nnsight ``LanguageModel`` over the same HF model.

``get_backend(name, loaded)`` builds one; heavy libraries (transformer-lens, nnsight) are
imported only when their backend is built.
"""

from __future__ import annotations

from typing import get_args

from perfit_probe.backends.base import ActivationBackend, model_inputs
from perfit_probe.backends.hooks import HookBackend
from perfit_probe.backends.nnsight_backend import NNsightBackend
from perfit_probe.backends.tlens import TransformerLensBackend
from perfit_probe.config import Backend
from perfit_probe.errors import ConfigError

BACKEND_NAMES = get_args(Backend)


def get_backend(name: str, loaded) -> ActivationBackend:
    """Build the backend called ``name`` over a ``LoadedModel``."""
    if name == "hooks":
        return HookBackend(loaded)
    if name == "transformer_lens":
        return TransformerLensBackend(loaded)
    if name == "nnsight":
        return NNsightBackend(loaded)
    raise ConfigError(f"unknown backend {name!r}: choose from {BACKEND_NAMES}")


__all__ = ["ActivationBackend", "BACKEND_NAMES", "get_backend", "model_inputs"]
