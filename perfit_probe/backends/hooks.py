"""Reference backend: plain PyTorch forward hooks on a Hugging Face model.

It can stop the forward pass right after the deepest requested block (``early_stop``): a
hook raises an internal exception once every requested site is read, so the rest of the
network is never computed.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from perfit_probe.backends.base import ActivationBackend, model_inputs
from perfit_probe.sites import Site, decoder_layers


class _Stop(Exception):
    """Raised inside a hook to end the forward pass early."""


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class HookBackend(ActivationBackend):
    """Forward-hook backend (reference implementation)."""

    name = "hooks"

    def __init__(self, loaded, early_stop: bool = True) -> None:
        super().__init__(loaded)
        self.early_stop = early_stop

    def run(self, input_ids, attention_mask, sites) -> dict[Site, torch.Tensor]:
        sites = self.resolve(sites)
        found: dict[Site, torch.Tensor] = {}
        with ExitStack() as stack:
            for site in sites:
                module, where = site.hf_module(self.model)
                if where == "input":
                    def pre(mod, args, kwargs, site=site):
                        found[site] = args[0] if args else kwargs["hidden_states"]
                    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
                else:
                    def post(mod, args, output, site=site):
                        found[site] = _first(output)
                    handle = module.register_forward_hook(post)
                stack.callback(handle.remove)
            if self.early_stop:
                deepest = decoder_layers(self.model)[max(s.layer for s in sites)]

                def stop(mod, args, output):
                    raise _Stop

                stack.callback(deepest.register_forward_hook(stop).remove)
            try:
                self.model(**model_inputs(input_ids, attention_mask), use_cache=False)
            except _Stop:
                pass
        return {site: found[site] for site in sites}
