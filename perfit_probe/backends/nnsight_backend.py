"""nnsight 0.8 backend: a ``LanguageModel`` over the already-loaded HF model.

Each site is read inside one ``trace`` by saving the input or output of the Hugging Face
module that ``Site.hf_module`` names (translation of sites lives in ``perfit_probe.sites``).
"""

from __future__ import annotations

import warnings

import torch

from perfit_probe.backends.base import ActivationBackend, model_inputs
from perfit_probe.sites import Site


_EXEC_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


def _envoy(root, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class NNsightBackend(ActivationBackend):
    """Reads activations by saving module inputs/outputs inside an nnsight trace."""

    name = "nnsight"

    def __init__(self, loaded) -> None:
        super().__init__(loaded)
        # nnsight is heavy and needed by this backend only: imported when one is built
        from nnsight import LanguageModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.lm = LanguageModel(loaded.model, tokenizer=loaded.tokenizer)

    def run(self, input_ids, attention_mask, sites) -> dict[Site, torch.Tensor]:
        sites = self.resolve(sites)
        # nnsight requires modules to be visited in the order the forward pass runs them.
        ordered = sorted(sites, key=lambda s: (s.layer, _EXEC_ORDER[s.kind]))
        plan = [(site, *site.hf_module(self.model), site.hf_module_path(self.model)) for site in ordered]
        saved = {}
        with self.lm.trace(model_inputs(input_ids, attention_mask), use_cache=False):
            for site, _, where, path in plan:
                envoy = _envoy(self.lm, path)
                value = envoy.input if where == "input" else envoy.output
                saved[site] = value.save()
        out = {}
        for site in sites:
            value = saved[site]
            value = getattr(value, "value", value)
            out[site] = value[0] if isinstance(value, (tuple, list)) else value
        return out
