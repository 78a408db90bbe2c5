"""Applying intervention banks to a Hugging Face causal LM through forward hooks.

An ``Intervention`` combines a collective bank (one slot) and a personal bank (one slot
per user) at the same sites and positions. On a hidden state ``h`` at a selected prompt
position, with ``e_c``/``e_p`` the collective/personal edits (``phi(h) - h``) and ``s`` the
row's scale, the two stack as

- ``sum``:     ``h + e_c(h) + s * e_p(h)``
- ``compose``: ``h' + s * e_p(h')`` with ``h' = h + e_c(h)``   (``phi_p(phi_c(h))`` at s = 1)

and with the collective alone as ``h + s * e_c(h)``. Optionally a subspace with orthonormal
basis ``Q [k, d]`` is projected out at the selected positions, from the edited hidden state
(``x - Q^T Q x``, mode ``hidden``) or from the edit alone (mode ``edit``). A stack of bases
``[G, k, d]`` ablates a different subspace in each row: ``set_batch(..., ablate_index=)``
names each row's basis (many random control subspaces in one forward pass).

Edits happen only in the *prompt pass*: the forward call whose sequence length is that of
the batch given to :meth:`Intervention.set_batch` (a one-token prompt is edited once).
Later cached generation steps (one new token each) pass through untouched and reuse the
edited keys and values. The positions are computed from a *prompt mask* (1 on prompt
tokens), so training batches (prompt + target) and left- or right-padded batches select the
same prompt tokens, clamped on short prompts by the banks' rule (``BankSpec.position_clamp``).
A bank with separate first/last interventions (``BankSpec.share_weights`` False) edits each
first-p position with its ``first`` unit and each last-s position with its ``last`` unit.
``Intervention.attached(model)`` is a context manager that registers the hooks and always
removes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import get_args

import torch
from jaxtyping import Bool, Float, Integer, Shaped
from torch import Tensor, nn

from perfit_probe.config import AblateMode, Stacking
from perfit_probe.errors import ConfigError
from perfit_probe.interventions.modules import InterventionBank, orthonormal_rows
from perfit_probe.sites import READ_CLAMP, PositionSpec, Site, batch_last_mask, batch_positions, check_clamp

STACKINGS = get_args(Stacking)
ABLATE_MODES = get_args(AblateMode)


class Intervention:
    """Collective and/or personal banks plus per-batch state (rows' slots, scales, positions)."""

    def __init__(
        self,
        *,
        collective: InterventionBank | None = None,
        personal: InterventionBank | None = None,
        stacking: str = "sum",
        sites: Sequence[Site] | None = None,
        positions: PositionSpec | None = None,
        ablate_basis: Float[Tensor, "k d_model"] | Float[Tensor, "bases k d_model"] | None = None,
        ablate_mode: str = "hidden",
        position_clamp: str | None = None,
    ) -> None:
        """``sites``, ``positions`` and ``position_clamp`` default to the banks'; without banks,
        ``sites`` and ``positions`` are required and the clamp defaults to ``sites.READ_CLAMP``."""
        if stacking not in STACKINGS:
            raise ConfigError(f"unknown stacking {stacking!r}: choose from {STACKINGS}")
        if ablate_mode not in ABLATE_MODES:
            raise ConfigError(f"unknown ablation mode {ablate_mode!r}: choose from {ABLATE_MODES}")
        banks = [b for b in (collective, personal) if b is not None]
        if banks:
            ref = banks[0].spec
            for bank in banks[1:]:
                if (bank.spec.sites != ref.sites or bank.spec.positions != ref.positions
                        or bank.spec.position_clamp != ref.position_clamp):
                    raise ConfigError("collective and personal banks must share sites, positions and position clamp")
            sites = sites if sites is not None else ref.sites
            positions = positions if positions is not None else ref.positions
            position_clamp = position_clamp if position_clamp is not None else ref.position_clamp
        if sites is None or positions is None:
            raise ConfigError("an intervention without banks needs explicit sites and positions")
        self.collective = collective
        self.personal = personal
        self.stacking = stacking
        if not all(isinstance(site, Site) for site in sites) or not isinstance(positions, PositionSpec):
            raise ConfigError("an Intervention takes Site objects and a PositionSpec: parse text with "
                              "sites.parse_site and sites.parse_positions")
        self.sites = list(sites)
        self.positions = positions
        self.position_clamp = position_clamp if position_clamp is not None else READ_CLAMP
        check_clamp(self.position_clamp)
        self.ablate_mode = ablate_mode
        if ablate_basis is not None and ablate_basis.dim() not in (2, 3):
            raise ConfigError(f"ablate_basis must be [k, d] or [G, k, d], got {tuple(ablate_basis.shape)}")
        self.ablate_q = None if ablate_basis is None else orthonormal_rows(ablate_basis.detach().float())
        self._state: dict | None = None

    # ------------------------------------------------------------------ per batch
    def set_batch(
        self,
        prompt_mask: Shaped[Tensor, "batch seq"],
        slots: Integer[Tensor, " batch"] | None = None,
        scale: float | Sequence[float] | Float[Tensor, " batch"] = 1.0,
        ablate_index: Integer[Tensor, " batch"] | None = None,
    ) -> None:
        """Prepare the next prompt pass: ``prompt_mask [B, T]`` is 1 on prompt tokens.

        ``slots [B]`` are personal-bank slot indices (required when a personal bank is set);
        ``scale`` multiplies the outermost edit (the personal one when present), per row;
        ``ablate_index [B]`` picks each row's basis from a stacked ``ablate_basis [G, k, d]``
        (required with one, refused without).
        """
        batch = prompt_mask.shape[0]
        if self.personal is not None and slots is None:
            raise ConfigError("a personal intervention needs one user slot per row")
        per_row = self.ablate_q is not None and self.ablate_q.dim() == 3
        if per_row != (ablate_index is not None):
            raise ConfigError("ablate_index (one basis per row) goes with a stacked ablate_basis [G, k, d] only")
        if ablate_index is not None and tuple(ablate_index.shape) != (batch,):
            raise ConfigError(f"ablate_index needs one basis per row ({batch}), got {tuple(ablate_index.shape)}")
        scale_t = torch.as_tensor(scale, dtype=torch.float32)
        if scale_t.ndim == 0:
            scale_t = scale_t.expand(batch)
        if scale_t.shape != (batch,):
            raise ConfigError(f"scale must be a number or one value per row ({batch}), got {tuple(scale_t.shape)}")
        index, valid = batch_positions(self.positions, prompt_mask, self.position_clamp)
        last = batch_last_mask(self.positions, prompt_mask, self.position_clamp)
        device = prompt_mask.device
        self._state = {
            "seq_len": prompt_mask.shape[1],
            "index": index.to(device),
            "valid": valid.to(device),
            "last": last.to(device),
            "slots": None if slots is None else slots.to(device),
            "scale": scale_t.to(device),
            "ablate_index": None if ablate_index is None else ablate_index.long().to(device),
            "done": set(),
        }

    def clear(self) -> None:
        """Forget the batch state (hooks then leave every forward pass untouched)."""
        self._state = None

    # ------------------------------------------------------------------ the maths
    def delta(self, site: int, h: Float[Tensor, "batch k d_model"], slots: Integer[Tensor, " batch"] | None,
              scale: Float[Tensor, " batch"], last: Bool[Tensor, "batch k"] | None = None,
              ablate_index: Integer[Tensor, " batch"] | None = None) -> Float[Tensor, "batch k d_model"]:
        """Total edit at site number ``site`` for selected hidden states ``h [B, k, d]`` (fp32);
        ``last [B, k]`` marks the last-s positions (needed by banks with separate first/last units);
        ``ablate_index [B]`` each row's basis of a stacked ``ablate_basis``."""
        s = scale.view(-1, 1, 1).to(h.dtype)
        zero_slots = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        out = torch.zeros_like(h)
        if self.collective is not None:
            e_c = self.collective.edit(site, h, zero_slots, last)
            out = e_c if self.personal is not None else s * e_c
        if self.personal is not None:
            base = h + out if self.stacking == "compose" else h
            out = out + s * self.personal.edit(site, base, slots, last)
        if self.ablate_q is not None:
            q = self.ablate_q.to(h.device, h.dtype)
            target = h + out if self.ablate_mode == "hidden" else out
            if q.dim() == 3:
                if ablate_index is None:
                    raise ConfigError("a stacked ablate_basis [G, k, d] needs ablate_index (one basis per row)")
                q = q[ablate_index.to(h.device)]
                out = out - torch.einsum("bkr,brd->bkd", torch.einsum("bkd,brd->bkr", target, q), q)
            else:
                out = out - torch.einsum("bkr,rd->bkd", torch.einsum("bkd,rd->bkr", target, q), q)
        return out

    def _edit_hidden(self, site: int, hidden: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state is None or hidden.dim() != 3 or hidden.shape[1] != state["seq_len"]:
            return hidden
        if state["seq_len"] == 1:
            if site in state["done"]:
                return hidden
            state["done"].add(site)
        index, valid = state["index"], state["valid"]
        if index.shape[0] != hidden.shape[0]:
            raise ConfigError(
                f"intervention prepared for {index.shape[0]} rows but the model got {hidden.shape[0]}"
            )
        gather_index = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = hidden.gather(1, gather_index).float()
        delta = self.delta(site, picked, state["slots"], state["scale"], state["last"], state["ablate_index"])
        delta = delta * valid.unsqueeze(-1).to(delta.dtype)
        full = torch.zeros(hidden.shape, dtype=delta.dtype, device=hidden.device)
        full = full.scatter_add(1, gather_index, delta)
        return hidden + full.to(hidden.dtype)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[Intervention]:
        """Register the editing hooks on ``model``; they are removed on exit, whatever happens."""
        handles = []
        try:
            for number, site in enumerate(self.sites):
                module, where = site.hf_module(model)
                if where == "input":
                    def pre(mod, args, kwargs, number=number):
                        if args:
                            return (self._edit_hidden(number, args[0]), *args[1:]), kwargs
                        kwargs = dict(kwargs)
                        kwargs["hidden_states"] = self._edit_hidden(number, kwargs["hidden_states"])
                        return args, kwargs
                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(mod, args, output, number=number):
                        if isinstance(output, tuple):
                            return (self._edit_hidden(number, output[0]), *output[1:])
                        if isinstance(output, list):
                            return [self._edit_hidden(number, output[0]), *output[1:]]
                        return self._edit_hidden(number, output)
                    handles.append(module.register_forward_hook(post))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.clear()
