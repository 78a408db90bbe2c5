"""transformer-lens 4.x backend: a ``TransformerBridge`` over the already-loaded HF model.

The bridge is booted with ``hf_model=`` (no download, no weight processing), so its
``blocks.{l}.hook_*`` values equal Hugging Face's. Booting replaces the wrapped model's
sub-modules by bridge components *in place* (and switches it to eager attention), which
breaks ``generate`` on the original; so by default the bridge wraps a deep copy
(``copy_model=False`` saves the memory when the model is not used otherwise).
"""

from __future__ import annotations

import copy
import logging

import torch

from perfit_probe.backends.base import ActivationBackend
from perfit_probe.sites import Site

log = logging.getLogger(__name__)


class TransformerLensBackend(ActivationBackend):
    """Reads activations with ``TransformerBridge.run_with_cache``."""

    name = "transformer_lens"

    def __init__(self, loaded, copy_model: bool = True) -> None:
        super().__init__(loaded)
        # transformer-lens is heavy and needed by this backend only: imported when one is built
        from transformer_lens.model_bridge import TransformerBridge

        # The bridge may rebuild the tokenizer from its saved name to force a BOS token; we
        # feed it token ids only, so hand it a copy that already claims to add one.
        tokenizer = copy.deepcopy(loaded.tokenizer)
        tokenizer.init_kwargs["add_bos_token"] = True
        tokenizer.init_kwargs.setdefault("name_or_path", loaded.identity.name)
        self.bridge = TransformerBridge.boot_transformers(
            loaded.identity.name,
            hf_model=copy.deepcopy(loaded.model) if copy_model else loaded.model,
            tokenizer=tokenizer,
            device=str(loaded.device),
            dtype=next(loaded.model.parameters()).dtype,
        )

    def run(self, input_ids, attention_mask, sites) -> dict[Site, torch.Tensor]:
        sites = self.resolve(sites)
        names = {site.transformer_lens_name(): site for site in sites}
        _, cache = self.bridge.run_with_cache(
            input_ids,
            attention_mask=attention_mask,
            names_filter=lambda name: name in names,
            stop_at_layer=max(s.layer for s in sites) + 1,
            return_cache_object=False,
        )
        return {site: cache[name] for name, site in names.items()}
