"""Canonical names of activation sites and prompt-position specs.

A *site* is a place in the network whose activations we read or edit. perfit-probe names
sites the TransformerLens way, ``blocks.{layer}.hook_{kind}``, whatever backend runs the
model. This module is the single place where a canonical site is translated into what each
backend needs (a TransformerLens hook name, or a module of a Hugging Face model and whether
its input or output is meant).

Kinds of site:

- ``resid_pre``: residual stream entering block ``l`` (input of decoder layer ``l``);
- ``resid_post``: residual stream leaving block ``l`` (output of decoder layer ``l``);
- ``attn_out``: output of block ``l``'s attention sub-layer;
- ``mlp_out``: output of block ``l``'s MLP sub-layer.

A *position spec* says which prompt tokens a read or an edit concerns:

- ``last`` (= ``l1``): the last prompt token;
- ``f{p}+l{s}``, ``f{p}``, ``l{s}``: the first ``p`` and the last ``s`` prompt tokens, the
  grammar of LoReFT/pyreft;
- ``mean``: all prompt tokens, mean-pooled when reading (every token when editing);
- ``all``: every prompt token, kept separately (reading only).

A prompt of ``n`` tokens may be too short for ``p`` and ``s``; a *clamp rule*
(``POSITION_CLAMPS``) says how many of each are taken:

- ``pyreft``: ``p' = min(p, n // 2)`` and ``s' = min(s, n // 2)``, both always, even when the
  spec has one side only (pyreft 0.1.0's ``get_intervention_locations`` with
  ``last_position = n``, as its generation datasets call it). A one-token prompt selects
  nothing; on an odd ``n`` the middle token is never selected. pyreft fills the slots it
  dropped with a padding position: with ``pad_mode="first"`` (its ``ReftDataset``) a
  prepended, masked pad token, so they change nothing; with ``pad_mode="last"`` position
  ``n``, the token after the prompt (in training the first target token, which pyreft then
  edits: a quirk not reproduced here). Here dropped slots edit nothing.
- ``cover``: ``p' = min(p, n // 2)`` and ``s' = min(s, ceil(n / 2))`` when both are used (the
  last side gets the extra token of an odd ``n``), each side alone clamped to ``n`` (``l1``
  selects the token of a one-token prompt).

Both rules keep the two sets disjoint. Reading activations (``gather_positions``, the cache)
uses ``cover`` (``READ_CLAMP``), so ``last`` always reads the last token; an intervention bank records its
own rule (``BankSpec.position_clamp``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int64, Shaped
from torch import Tensor, nn

from perfit_probe.errors import SiteError

SiteKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
"""Kinds of site (see the module docstring)."""
SITE_KINDS: tuple[SiteKind, ...] = get_args(SiteKind)
PositionClamp = Literal["pyreft", "cover"]
"""How short prompts clamp ``f{p}+l{s}`` (see the module docstring)."""
POSITION_CLAMPS: tuple[PositionClamp, ...] = get_args(PositionClamp)
READ_CLAMP = "cover"
"""The clamp rule of reads, and of intervention banks saved before banks recorded theirs."""
_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One canonical activation site."""

    layer: int
    """Index of the transformer block, from 0."""
    kind: str = "resid_post"
    """One of ``SITE_KINDS``."""

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}: choose from {SITE_KINDS}")

    @property
    def name(self) -> str:
        """Canonical name, ``blocks.{layer}.hook_{kind}``."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return self.name

    def transformer_lens_name(self) -> str:
        """Hook name in a transformer-lens ``TransformerBridge`` (same as canonical)."""
        return self.name

    def hf_module(self, model: nn.Module) -> tuple[nn.Module, str]:
        """Module of a Hugging Face model holding this site, and ``"input"`` or ``"output"``.

        Used by the forward-hook backend, the nnsight backend and the interventions alike.
        """
        block = decoder_layers(model)[self.layer]
        if self.kind == "resid_pre":
            return block, "input"
        if self.kind == "resid_post":
            return block, "output"
        attr = _first_attr(block, _SUBMODULE_NAMES[self.kind])
        if attr is None:
            raise SiteError(
                f"site {self.name!r}: block {self.layer} of {type(model).__name__} has no "
                f"{self.kind.split('_')[0]} sub-module named any of {_SUBMODULE_NAMES[self.kind]}"
            )
        return getattr(block, attr), "output"

    def hf_module_path(self, model: nn.Module) -> str:
        """Dotted path of :meth:`hf_module`'s module inside ``model``."""
        target, _ = self.hf_module(model)
        for name, module in model.named_modules():
            if module is target:
                return name
        raise SiteError(f"site {self.name!r}: module not found in model")  # pragma: no cover


_SUBMODULE_NAMES = {
    "attn_out": ("self_attn", "attn", "attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn"),
}


def _first_attr(obj: object, names: tuple[str, ...]) -> str | None:
    for name in names:
        if hasattr(obj, name):
            return name
    return None


def parse_site(name: str | int | Site, n_layers: int | None = None) -> Site:
    """Parse ``blocks.{l}.hook_{kind}`` (or a bare layer index, meaning ``resid_post``).

    Negative layer indices count from the end when ``n_layers`` is given. Raises
    ``SiteError`` for an unknown kind or a layer outside ``[0, n_layers)``.
    """
    if isinstance(name, Site):
        site = name
    elif isinstance(name, int) or (isinstance(name, str) and re.fullmatch(r"-?\d+", name)):
        site = Site(int(name), "resid_post")
    else:
        match = _SITE_RE.match(str(name))
        if not match:
            raise SiteError(
                f"unknown site name {name!r}: expected 'blocks.<layer>.hook_<kind>' with kind "
                f"in {SITE_KINDS}, or a layer index"
            )
        if match.group(2) not in SITE_KINDS:
            raise SiteError(f"unknown site kind {match.group(2)!r} in {name!r}: choose from {SITE_KINDS}")
        site = Site(int(match.group(1)), match.group(2))
    if n_layers is not None:
        return resolve_site(site, n_layers)
    if site.layer < 0:
        raise SiteError(f"negative layer {site.layer} needs the model's layer count")
    return site


def resolve_site(site: Site, n_layers: int) -> Site:
    """``site`` in a model of ``n_layers`` blocks: a negative layer counts from the end;
    ``SiteError`` for a layer outside ``[0, n_layers)``."""
    layer = site.layer + n_layers if site.layer < 0 else site.layer
    if not 0 <= layer < n_layers:
        raise SiteError(
            f"layer {site.layer} is out of range for a model with {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    return Site(layer, site.kind)


def parse_sites(names: list[str | int | Site] | str, n_layers: int | None = None) -> list[Site]:
    """Parse several sites; a string is split on commas. Duplicates are removed, order kept."""
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    out: list[Site] = []
    for name in names:
        site = parse_site(name, n_layers)
        if site not in out:
            out.append(site)
    if not out:
        raise SiteError("no site given")
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face causal LM (Llama, GPT-2, NeoX, ... families)."""
    base = getattr(model, "base_model", model)
    for path in ("model.layers", "layers", "transformer.h", "h", "gpt_neox.layers", "decoder.layers"):
        obj: object = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise SiteError(f"cannot find the decoder layers of {type(model).__name__}")


# ----------------------------------------------------------------------------------------
# Position specs


@dataclass(frozen=True)
class PositionSpec:
    """Parsed position spec: first ``first`` and last ``last`` tokens, or a pooled mode."""

    first: int = 0
    """Number of leading prompt tokens."""
    last: int = 1
    """Number of trailing prompt tokens."""
    mode: str = "fl"
    """``fl`` (first/last tokens), ``mean`` (all, pooled) or ``all`` (all, separately)."""

    @property
    def text(self) -> str:
        """The spec written back as text."""
        if self.mode != "fl":
            return self.mode
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)

    def counts(self, n: int, clamp: str = READ_CLAMP) -> tuple[int, int]:
        """``(p', s')``: how many leading and trailing tokens of an ``n``-token prompt are selected.

        ``mean``/``all`` select every token, counted as ``(n, 0)``. See the module docstring
        for the clamp rules.
        """
        if n <= 0:
            raise SiteError("cannot select positions in an empty prompt")
        check_clamp(clamp)
        if self.mode in ("mean", "all"):
            return n, 0
        p, s = self.first, self.last
        if clamp == "pyreft":
            return min(p, n // 2), min(s, n // 2)
        if p and s:
            return min(p, n // 2), min(s, math.ceil(n / 2))
        return min(p, n), min(s, n)

    def offsets(self, n: int, clamp: str = READ_CLAMP) -> list[int]:
        """Token offsets (0-based, within a prompt of ``n`` tokens, no padding) this spec selects:
        the first ``p'`` then the last ``s'`` (``counts``); possibly none under ``pyreft``."""
        p, s = self.counts(n, clamp)
        return list(range(p)) + list(range(n - s, n))


LAST = PositionSpec(0, 1)
"""The last prompt token (the spec ``last``, i.e. ``l1``)."""


def check_clamp(clamp: str) -> None:
    """``SiteError`` unless ``clamp`` is one of ``POSITION_CLAMPS``."""
    if clamp not in POSITION_CLAMPS:
        raise SiteError(f"unknown position clamp {clamp!r}: choose from {POSITION_CLAMPS}")


def parse_positions(spec: str | PositionSpec) -> PositionSpec:
    """Parse ``last``, ``mean``, ``all``, ``f{p}``, ``l{s}`` or ``f{p}+l{s}``."""
    if isinstance(spec, PositionSpec):
        return spec
    text = spec.strip().lower()
    if text == "last":
        return LAST
    if text in ("mean", "all"):
        return PositionSpec(0, 0, text)
    match = re.fullmatch(r"(?:f(\d+))?\+?(?:l(\d+))?", text)
    if not text or not match or (match.group(1) is None and match.group(2) is None):
        raise SiteError(
            f"bad position spec {spec!r}: use 'last', 'mean', 'all', 'f<p>', 'l<s>' or 'f<p>+l<s>'"
        )
    first, last = int(match.group(1) or 0), int(match.group(2) or 0)
    if first + last == 0:
        raise SiteError(f"position spec {spec!r} selects no token")
    return PositionSpec(first, last)


def batch_positions(
    spec: PositionSpec, attention_mask: Shaped[Tensor, "batch seq"], clamp: str = READ_CLAMP
) -> tuple[Int64[Tensor, "batch k"], Bool[Tensor, "batch k"]]:
    """Absolute positions selected in each row of a padded batch.

    Works for left and right padding alike: a row's prompt tokens are where
    ``attention_mask`` is 1, assumed contiguous.

    Returns ``(index, valid)``, both ``[batch, k]``: ``index`` holds sequence positions, in
    each row the first-``p'`` positions then the last-``s'`` ones (``PositionSpec.counts``),
    padded with the row's first selected position (or first prompt position); ``valid``
    marks real entries. Rows of short prompts may select fewer than ``k`` tokens (under
    ``pyreft``, possibly none; ``k >= 1``).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    starts = mask.int().argmax(dim=1)
    rows = [spec.offsets(int(n), clamp) for n in lengths.tolist()]
    k = max(1, max(len(r) for r in rows))
    index = torch.zeros(len(rows), k, dtype=torch.long)
    valid = torch.zeros(len(rows), k, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts.tolist())):
        index[i, : len(row)] = torch.tensor(row, dtype=torch.long) + start
        index[i, len(row):] = start + (row[0] if row else 0)
        valid[i, : len(row)] = True
    return index.to(attention_mask.device), valid.to(attention_mask.device)


def batch_last_mask(spec: PositionSpec, attention_mask: Shaped[Tensor, "batch seq"],
                    clamp: str = READ_CLAMP) -> Bool[Tensor, "batch k"]:
    """``[batch, k]`` bool, aligned with ``batch_positions``: True where the entry is one of the
    row's last-``s'`` positions (False for the first-``p'`` ones and for padding entries)."""
    _, valid = batch_positions(spec, attention_mask, clamp)
    lengths = attention_mask.bool().sum(dim=1).tolist()
    firsts = torch.tensor([spec.counts(int(n), clamp)[0] for n in lengths], dtype=torch.long)
    column = torch.arange(valid.shape[1]).unsqueeze(0)
    return (column >= firsts.unsqueeze(1)).to(valid.device) & valid


def gather_positions(
    hidden: Float[Tensor, "batch seq d_model"], spec: PositionSpec, attention_mask: Shaped[Tensor, "batch seq"]
) -> Float[Tensor, "batch d_model"] | Float[Tensor, "batch k d_model"]:
    """Read ``spec``'s positions from ``hidden`` ``[batch, seq, d]``.

    Returns ``[batch, d]`` for ``last`` and ``mean`` (``mean`` pools the selected tokens),
    ``[batch, k, d]`` otherwise (unselected slots are zero).
    """
    index, valid = batch_positions(spec, attention_mask)
    picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    picked = picked * valid.unsqueeze(-1).to(picked.dtype)
    if spec.mode == "mean":
        return picked.sum(1) / valid.sum(1, keepdim=True).to(picked.dtype)
    if spec.mode == "fl" and spec.first == 0 and spec.last == 1:
        return picked[:, 0]
    return picked
