"""Low-rank representation interventions (LoReFT and variants), stored as banks.

An *intervention* edits a hidden state ``h`` (a ``d``-vector) at a chosen site and prompt
position. The kinds offered:

- ``loreft`` (ReFT paper, arXiv 2404.03592)::

      phi(h) = h + R^T (W h + b - R h),   R in R^{r x d} with orthonormal rows, W in R^{r x d}, b in R^r

  i.e. inside the subspace spanned by R's rows, ``R h`` is replaced by ``W h + b``;
  ``2 d r + r`` parameters.
- ``noreft``: the same formula with R unconstrained (pyreft's ``NoreftIntervention``).
- ``lobireft``: a plain additive vector in a learned subspace, ``phi(h) = h + R^T b``
  (pyreft's ``LobireftIntervention``); ``d r + r`` parameters.

A *bank* holds the parameters of many interventions of one kind and shape, one *slot* per
user (the collective intervention is a bank of one slot), for every site: tensors with a
leading slot axis, ``A [n, r, d]``, ``W [n, r, d]``, ``b [n, r]``. A batch carries a slot
index per row and each row is edited with its own slot's parameters, so that one forward
pass trains or applies many users' interventions at once.

Position groups: with ``share_weights`` (one intervention for all positions) a bank holds
one intervention per site. Without it, and with a spec of both sides (``f{p}+l{s}``), it
holds two per site, as pyreft does with ``share_weights=False``: one edits the first-p
positions, the other the last-s positions (``BankSpec.groups``). A spec of one side
(``f{p}``, ``l{s}``, ``mean``) has one group either way (pyreft doubles its interventions only
for ``+`` specs). The *units* of a bank (one per group and site) are numbered
``group * n_sites + site``, pyreft's order (all first-p interventions, then all last-s ones).

Orthonormal rows in a bank: ``torch.nn.utils.parametrizations.orthogonal`` (the reference
implementation's choice) parametrizes one matrix, so banks use their own parametrization,
applied slot by slot in one batched call: ``R = rows of the Q factor of A^T`` (QR with the
signs fixed so that the triangular factor has a positive diagonal, i.e. Gram-Schmidt on the
rows of the free parameter ``A``). R is orthonormal after every optimiser step by
construction, and equals A whenever A already has orthonormal rows, which makes initialising
one bank from another exact.

Initialisations (per slot, seeded by the slot's key so a user gets the same start in a
batched bank as alone): ``zero`` (random orthonormal R, W = R, b = 0: the edit is zero up
to the rounding of R's QR), ``random`` (random orthonormal R, W and b uniform in
+-1/sqrt(d) as ``nn.Linear`` does: pyreft's start).

*Anchored* banks (``BankSpec.anchored``) measure their edit from where they started: with
``theta_0`` a frozen copy of the parameters at initialisation (buffers ``A0``, ``W0``,
``b0``)::

    edit(h) = e_theta(h) - e_theta_0(h)

so an anchored bank's edit is exactly zero before training whatever its initialisation. PerFit's
stage 2 anchors its personal bank (whether it starts at a zero edit, pyreft's random start or a
copy of the stage-1 intervention), so that "stage 2 before training" is exactly stage 1 alone
(with a copy of stage 1 and ``sum`` stacking, the trained model is ``h + e_p(h)``: the copy
replaces stage 1).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import get_args

import torch
from jaxtyping import Bool, Float, Integer
from torch import Tensor, nn

from perfit_probe.config import Init, InterventionKind
from perfit_probe.errors import ConfigError
from perfit_probe.sites import POSITION_CLAMPS, READ_CLAMP, PositionSpec, Site, parse_positions, parse_site

INTERVENTION_KINDS = get_args(InterventionKind)
INITS = get_args(Init)


@dataclass(frozen=True)
class BankSpec:
    """Shape and kind of the interventions a bank holds."""

    kind: str
    """One of ``INTERVENTION_KINDS``."""
    sites: tuple[Site, ...]
    """Sites edited, one intervention per site (saved by canonical name, ``blocks.{l}.hook_{kind}``)."""
    positions: PositionSpec
    """Prompt positions edited (saved as spec text, ``f1+l2``, ``l1``, ...), see ``perfit_probe.sites``."""
    rank: int
    """Rank r of each intervention."""
    d_model: int
    """Width d of the edited hidden state."""
    position_clamp: str = READ_CLAMP
    """How short prompts clamp the positions, one of ``POSITION_CLAMPS`` (see
    ``perfit_probe.sites``). The default is the rule of banks saved before this field
    existed; ``FitConfig`` passes its own choice."""
    share_weights: bool = True
    """One intervention per site for all positions (True), or separate interventions for
    the first-p and the last-s positions of an ``f{p}+l{s}`` spec (False, pyreft's default).
    The default is the behaviour of banks saved before this field existed."""
    anchored: bool = False
    """The edit is measured from the initial parameters (frozen buffers ``A0``, ``W0``, ``b0``):
    exactly zero before training (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTION_KINDS:
            raise ConfigError(f"unknown intervention kind {self.kind!r}: choose from {INTERVENTION_KINDS}")
        if not 1 <= self.rank <= self.d_model:
            raise ConfigError(
                f"intervention rank {self.rank} must be between 1 and d_model={self.d_model}"
            )
        if not self.sites:
            raise ConfigError("an intervention needs at least one site")
        if not all(isinstance(site, Site) for site in self.sites) or not isinstance(self.positions, PositionSpec):
            raise ConfigError("a BankSpec holds Site objects and a PositionSpec: parse text with "
                              "sites.parse_site and sites.parse_positions (BankSpec.from_dict reads saved specs)")
        if self.position_clamp not in POSITION_CLAMPS:
            raise ConfigError(f"unknown position clamp {self.position_clamp!r}: choose from {POSITION_CLAMPS}")
        if not isinstance(self.share_weights, bool):
            raise ConfigError(f"share_weights must be true or false, got {self.share_weights!r}")

    @property
    def groups(self) -> tuple[str, ...]:
        """Position groups with their own intervention at each site: ``("first", "last")``
        without shared weights on an ``f{p}+l{s}`` spec, else ``("all",)``."""
        spec = self.positions
        if not self.share_weights and spec.mode == "fl" and spec.first and spec.last:
            return ("first", "last")
        return ("all",)

    @property
    def n_units(self) -> int:
        """Interventions per slot: one per group and site."""
        return len(self.groups) * len(self.sites)

    def unit(self, site: int, group: int = 0) -> int:
        """Number of the intervention of group ``group`` at site number ``site``."""
        return group * len(self.sites) + site

    def unit_name(self, unit: int) -> str:
        """``site{i}`` (one group) or ``site{i}.first`` / ``site{i}.last``: tensor-name prefix in artifacts."""
        group, site = divmod(unit, len(self.sites))
        return f"site{site}" if len(self.groups) == 1 else f"site{site}.{self.groups[group]}"

    def to_dict(self) -> dict:
        """Plain-JSON form: sites by canonical name, positions as spec text."""
        return {"kind": self.kind, "sites": [site.name for site in self.sites], "positions": self.positions.text,
                "rank": self.rank, "d_model": self.d_model, "position_clamp": self.position_clamp,
                "share_weights": self.share_weights, "anchored": self.anchored}

    @classmethod
    def from_dict(cls, data: dict) -> BankSpec:
        """Inverse of :meth:`to_dict` (site names and the position spec parsed here, once); a
        dict without ``position_clamp``/``share_weights`` (a bank saved before they existed)
        gets the field defaults, i.e. the old behaviour."""
        return cls(data["kind"], tuple(parse_site(name) for name in data["sites"]), parse_positions(data["positions"]),
                   int(data["rank"]), int(data["d_model"]), data.get("position_clamp", cls.position_clamp),
                   data.get("share_weights", cls.share_weights), bool(data.get("anchored", False)))

    def params_per_slot(self) -> int:
        """Trainable parameters of one slot (all units): ``2dr + r`` per unit, ``dr + r`` for lobireft;
        a unit per site, or two per site with separate first/last interventions."""
        d, r = self.d_model, self.rank
        per_unit = d * r + r if self.kind == "lobireft" else 2 * d * r + r
        return per_unit * self.n_units


def orthonormal_rows(a: Float[Tensor, "*batch r d"]) -> Float[Tensor, "*batch r d"]:
    """Rows of ``a [..., r, d]`` made orthonormal (Gram-Schmidt via QR, unique signs)."""
    q, tri = torch.linalg.qr(a.transpose(-1, -2))  # q [..., d, r]
    diag = torch.diagonal(tri, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return (q * sign.unsqueeze(-2)).transpose(-1, -2)


def slot_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, key)``: a slot's initialisation never depends on its index."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class InterventionBank(nn.Module):
    """Parameters of ``n_slots`` interventions of one ``BankSpec``, one slot per key (user).

    Learned state lives in per-unit modules (``site_params``, one per group and site, numbered
    as ``BankSpec.unit``) holding ``A [n, r, d]`` (free parameter of R), ``W [n, r, d]`` and
    ``b [n, r]`` (``lobireft`` has no W).
    """

    def __init__(self, spec: BankSpec, keys: list[str]) -> None:
        super().__init__()
        if len(set(keys)) != len(keys) or not keys:
            raise ConfigError("a bank needs at least one slot and unique slot keys")
        self.spec = spec
        self.keys = list(keys)
        n, r, d = len(keys), spec.rank, spec.d_model
        self.site_params = nn.ModuleList()
        for _ in range(spec.n_units):
            holder = nn.Module()
            holder.A = nn.Parameter(torch.zeros(n, r, d))
            if spec.kind != "lobireft":
                holder.W = nn.Parameter(torch.zeros(n, r, d))
            holder.b = nn.Parameter(torch.zeros(n, r))
            if spec.anchored:
                for name, param in list(holder.named_parameters()):
                    holder.register_buffer(f"{name}0", torch.zeros_like(param))
            self.site_params.append(holder)

    # ------------------------------------------------------------------ construction
    @classmethod
    def initialised(cls, spec: BankSpec, keys: list[str], init: str = "zero", seed: int = 0) -> InterventionBank:
        """A bank with every slot initialised by ``init`` (``zero`` or ``random``), seeded per key."""
        if init not in INITS:
            raise ConfigError(f"unknown initialisation {init!r}: choose from {INITS}")
        bank = cls(spec, keys)
        d, r = spec.d_model, spec.rank
        bound = 1.0 / math.sqrt(d)
        with torch.no_grad():
            for i, key in enumerate(keys):
                gen = slot_generator(seed, key)
                for holder in bank.site_params:
                    a = orthonormal_rows(torch.randn(r, d, generator=gen))
                    holder.A[i] = a
                    if init == "zero":
                        if spec.kind != "lobireft":
                            holder.W[i] = a
                        holder.b[i] = 0.0
                    else:
                        if spec.kind != "lobireft":
                            holder.W[i] = (torch.rand(r, d, generator=gen) * 2 - 1) * bound
                        holder.b[i] = (torch.rand(r, generator=gen) * 2 - 1) * bound
        return bank

    @classmethod
    def copied_from(cls, source: InterventionBank, keys: list[str], slot: int = 0) -> InterventionBank:
        """A bank whose every slot is a copy of ``source``'s slot ``slot`` (PerFit's stage-1 init)."""
        bank = cls(source.spec, keys)
        with torch.no_grad():
            for mine, theirs in zip(bank.site_params, source.site_params):
                for name, tensor in _state(mine):
                    tensor.copy_(getattr(theirs, name)[slot].unsqueeze(0).expand_as(tensor))
        return bank

    def anchored(self) -> InterventionBank:
        """A copy of this bank whose edit is measured from its current parameters (zero as it is)."""
        bank = type(self)(replace(self.spec, anchored=True), self.keys)
        with torch.no_grad():
            for mine, theirs in zip(bank.site_params, self.site_params):
                for name, param in theirs.named_parameters():
                    getattr(mine, name).copy_(param)
                    getattr(mine, f"{name}0").copy_(param)
        return bank.to(self.device)

    def subset(self, keys: list[str]) -> InterventionBank:
        """A new bank holding copies of the named slots, in that order."""
        index = torch.tensor([self.slot(k) for k in keys], dtype=torch.long)
        bank = type(self)(self.spec, keys)
        with torch.no_grad():
            for mine, theirs in zip(bank.site_params, self.site_params):
                for name, tensor in _state(mine):
                    tensor.copy_(getattr(theirs, name).detach().index_select(0, index.to(tensor.device)))
        return bank.to(self.device)

    @classmethod
    def concat(cls, banks: list[InterventionBank]) -> InterventionBank:
        """One bank holding the slots of several banks of the same spec (e.g. torchrun shards)."""
        if not banks:
            raise ConfigError("nothing to concatenate")
        spec = banks[0].spec
        if any(b.spec != spec for b in banks):
            raise ConfigError("cannot concatenate banks of different specs")
        out = cls(spec, [k for b in banks for k in b.keys])
        with torch.no_grad():
            for s, holder in enumerate(out.site_params):
                for name, tensor in _state(holder):
                    tensor.copy_(torch.cat([getattr(b.site_params[s], name).detach().cpu() for b in banks]))
        return out

    # ------------------------------------------------------------------ access
    @property
    def n_slots(self) -> int:
        """Number of slots (users)."""
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.site_params[0].A.device

    def slot(self, key: str) -> int:
        """Index of a slot by key; ``ConfigError`` naming the key when absent."""
        try:
            return self.keys.index(key)
        except ValueError:
            raise ConfigError(f"no intervention for user {key!r} in this bank ({self.n_slots} users)") from None

    def slot_indices(self, keys: list[str]) -> torch.Tensor:
        """Slot index of each key, as a long tensor on the bank's device."""
        lookup = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in lookup]
        if missing:
            raise ConfigError(
                f"no intervention for user(s) {missing[:3]} in this bank; it has {self.n_slots} users"
            )
        return torch.tensor([lookup[k] for k in keys], dtype=torch.long, device=self.device)

    def rotation(self, unit: int, initial: bool = False) -> Float[Tensor, "slots rank d_model"]:
        """``R [n, r, d]`` of unit ``unit`` (= site number with one group): orthonormal rows except
        for ``noreft`` (``initial``: of the anchor parameters, anchored banks only)."""
        a = self.site_params[unit].A0 if initial else self.site_params[unit].A
        return a if self.spec.kind == "noreft" else orthonormal_rows(a)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """Parameters that weight decay applies to: W and b (A is scale-free under QR)."""
        return [p for h in self.site_params for n, p in h.named_parameters()
                if n != "A" or self.spec.kind == "noreft"]

    # ------------------------------------------------------------------ the edit
    def edit(self, site: int, h: Float[Tensor, "batch k d_model"], slots: Integer[Tensor, " batch"],
             last: Bool[Tensor, "batch k"] | None = None) -> Float[Tensor, "batch k d_model"]:
        """The additive edit ``phi(h) - h`` for hidden states ``h [B, k, d]`` at site number
        ``site``; row i uses slot ``slots[i]``. ``last [B, k]`` (bool, ``sites.batch_last_mask``)
        marks the last-s positions: with separate first/last interventions they get the
        ``last`` unit and the others the ``first`` unit; with one group it is ignored.
        Anchored banks return ``e_theta(h) - e_theta_0(h)`` (zero before training)."""
        if len(self.spec.groups) == 1:
            return self._unit_edit(site, h, slots)
        if last is None:
            raise ConfigError("this bank has separate first/last interventions: pass the last-position mask")
        first_edit = self._unit_edit(self.spec.unit(site, 0), h, slots)
        last_edit = self._unit_edit(self.spec.unit(site, 1), h, slots)
        return torch.where(last.unsqueeze(-1), last_edit, first_edit)

    def _unit_edit(self, unit: int, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        out = self._raw_edit(unit, h, slots, initial=False)
        if self.spec.anchored:
            out = out - self._raw_edit(unit, h, slots, initial=True)
        return out

    def _raw_edit(self, unit: int, h: torch.Tensor, slots: torch.Tensor, *, initial: bool) -> torch.Tensor:
        holder = self.site_params[unit]
        suffix = "0" if initial else ""
        rot, bias = self.rotation(unit, initial), getattr(holder, "b" + suffix)
        weight = getattr(holder, "W" + suffix) if self.spec.kind != "lobireft" else None
        if self.n_slots == 1:
            rot, bias = rot.expand(h.shape[0], -1, -1), bias.expand(h.shape[0], -1)
            weight = None if weight is None else weight.expand(h.shape[0], -1, -1)
        else:
            rot, bias = rot.index_select(0, slots), bias.index_select(0, slots)
            weight = None if weight is None else weight.index_select(0, slots)
        rot = rot.to(h.dtype)
        if weight is None:
            inner = bias.to(h.dtype).unsqueeze(1).expand(-1, h.shape[1], -1)
        else:
            diff = weight.to(h.dtype) - rot  # W h - R h = (W - R) h
            inner = torch.einsum("bkd,brd->bkr", h, diff) + bias.to(h.dtype).unsqueeze(1)
        return torch.einsum("bkr,brd->bkd", inner, rot)

    def forward(self, site: int, h: Float[Tensor, "batch k d_model"], slots: Integer[Tensor, " batch"],
                last: Bool[Tensor, "batch k"] | None = None) -> Float[Tensor, "batch k d_model"]:
        """``phi(h)`` (the edited hidden state)."""
        return h + self.edit(site, h, slots, last)


def _state(holder: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A site holder's parameters and anchor buffers, by name."""
    yield from holder.named_parameters()
    yield from holder.named_buffers()
