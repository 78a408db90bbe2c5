"""Label scores of many edit variants of the same prompts, sharing the un-edited prompt prefix.

The causal checks score the same held-out prompts under many variants of one intervention:
the personal edit scaled by each ``alpha`` (dose response), or the personal subspace and
dozens of random subspaces projected out (ablation). An edit at position ``t`` changes only
positions ``>= t`` (causal attention), so every variant shares the prompt up to the earliest
edited position. ``score_label_variants`` runs that prefix once per batch (keeping its
key/value cache) and then, for each group of variants, only the edited suffix (for the
demo's last-2-token interventions, 2 tokens instead of ~100), with the rows replicated once
per variant (row ``r`` = prompt ``r // G``, variant ``r % G``) and each row's scale and
ablated basis set per row (``Intervention.set_batch(scale=, ablate_index=)``).

It covers what ``score_labels``' fast path covers: labels of one token each, read from the
next-token distribution at the last prompt token. The result equals ``score_labels`` of each
variant up to floating-point summation order (checked in the tests). Where the positions of
the suffix alone would differ from those of the whole prompt (first-token interventions,
prompts clamped by the position rule), there is no shared prefix and whole prompts run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Integer
from torch import Tensor

from perfit_probe.errors import ConfigError
from perfit_probe.interventions import PerFit
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.batching import Batch, collate, encode
from perfit_probe.models import LoadedModel
from perfit_probe.sites import batch_last_mask, batch_positions

log = logging.getLogger(__name__)


def single_token_labels(tokenizer, labels: Sequence[str]) -> list[int] | None:
    """Each label's token id when every label is one token, else None."""
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    return [i[0] for i in ids] if ids and all(len(i) == 1 for i in ids) else None


def _prefix_length(iv, prompt_mask: torch.Tensor) -> int:
    """Columns of a left-padded batch that can run once, un-edited (0 when none can).

    The cut is at or before the earliest edited position, and late enough that the position
    rule picks the same tokens from the suffix alone as from the whole prompt (under the
    ``pyreft`` clamp the last ``s`` tokens need a suffix of ``2 s``), so the cut backs off a
    few columns from the first edited position until the selections agree.
    """
    seq = prompt_mask.shape[1]
    index, valid = batch_positions(iv.positions, prompt_mask, iv.position_clamp)
    first = min(int(index[valid].min()) if bool(valid.any()) else seq - 1, seq - 1)
    last_mask = batch_last_mask(iv.positions, prompt_mask, iv.position_clamp)
    back_off = 2 * (iv.positions.first + iv.positions.last) + 2
    for cut in range(first, max(0, first - back_off), -1):
        sub = prompt_mask[:, cut:]
        index_s, valid_s = batch_positions(iv.positions, sub, iv.position_clamp)
        if (index_s.shape == index.shape and torch.equal(valid_s, valid)
                and torch.equal((index_s + cut)[valid], index[valid])
                and torch.equal(batch_last_mask(iv.positions, sub, iv.position_clamp), last_mask)):
            return cut
    return 0


class PrefixStore:
    """Key/value caches of un-edited prompt prefixes, kept for the next call on the same prompts.

    Keyed by the batch's prompts, the prompt truncation and the prefix length; a cache is
    never changed in place (each suffix pass works on a copy), so any call may reuse it.
    """

    def __init__(self) -> None:
        self._caches: dict[tuple, object] = {}

    def get(self, model, prompts: tuple[str, ...], max_prompt_tokens: int | None, inputs: dict, first: int):
        """The cache of ``inputs[:, :first]``, computed on the first request."""
        key = (prompts, max_prompt_tokens, first)
        if key not in self._caches:
            self._caches[key] = model(**{k: v[:, :first] for k, v in inputs.items()}, use_cache=True).cache
        return self._caches[key]


@torch.no_grad()
def score_label_variants(
    loaded: LoadedModel,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    perfit: PerFit,
    user_ids: Sequence[str] | Sequence[Sequence[str]],
    scales: Sequence[float],
    ablate_bases: Float[Tensor, "variants k d_model"] | None = None,
    ablate_mode: str = "hidden",
    stage: str = "perfit",
    batch_size: int = 16,
    rows_per_pass: int = 64,
    max_prompt_tokens: int | None = None,
    prefixes: PrefixStore | None = None,
) -> Float[Tensor, "variants prompts labels"]:
    """``[n_variants, n_prompts, n_labels]`` log p(label | prompt) under each variant.

    Variant ``v`` scales the outermost edit by ``scales[v]`` and, with ``ablate_bases [V, k, d]``,
    projects out ``ablate_bases[v]``. ``user_ids`` gives each prompt's user (the intervention
    slot), either once for every variant or once per variant (``[n_variants][n_prompts]``: the
    user swap runs every donor as a variant). ``stage`` ``none`` scores the model alone.
    ``rows_per_pass`` bounds the replicated rows of one suffix pass (memory: each row carries a
    copy of its prompt's key/value cache). ``prefixes`` keeps the un-edited prefixes' caches
    across calls on the same prompts (the causal checks score them under many interventions).
    """
    tok = loaded.tokenizer
    label_ids = single_token_labels(tok, labels)
    if label_ids is None:
        raise ConfigError("score_label_variants needs labels of one token each: use score_labels per variant")
    n_var = len(scales)
    if n_var == 0:
        raise ConfigError("score_label_variants needs at least one variant (scales=...)")
    if ablate_bases is not None and ablate_bases.shape[0] != n_var:
        raise ConfigError(f"{ablate_bases.shape[0]} ablation bases for {n_var} scales: give one per variant")
    per_variant = [list(user_ids)] * n_var if not len(user_ids) or isinstance(user_ids[0], str) else user_ids
    if len(per_variant) != n_var or any(len(ids) != len(prompts) for ids in per_variant):
        raise ConfigError(f"user ids must be one per prompt ({len(prompts)}), once or once per variant ({n_var})")
    iv = perfit.intervention(stage, ablate_basis=ablate_bases, ablate_mode=ablate_mode)
    slots_all = None if iv.personal is None else torch.stack(
        [iv.personal.slot_indices([str(u) for u in ids]) for ids in per_variant])
    n = len(prompts)
    result = torch.zeros(n_var, n, len(labels))
    scale_t = torch.as_tensor(list(scales), dtype=torch.float32)
    with iv.attached(loaded.model):
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            batch = collate([encode(tok, p, max_prompt_tokens=max_prompt_tokens) for p in prompts[rows]],
                            int(tok.pad_token_id), padding_side="left", device=loaded.device)
            store = prefixes if prefixes is not None else PrefixStore()  # without one: this batch only
            prefix = _PrefixKey(store, tuple(prompts[rows]), max_prompt_tokens)
            _score_batch(loaded, iv, batch, prefix, None if slots_all is None else slots_all[:, rows], scale_t,
                         label_ids, rows_per_pass=rows_per_pass, per_row_basis=ablate_bases is not None,
                         out=result[:, rows])
    return result


@dataclass(frozen=True)
class _PrefixKey:
    """Where a batch's un-edited prefix cache is kept: the store, the batch's prompts and their truncation."""

    store: PrefixStore
    """The store."""
    prompts: tuple[str, ...]
    """The batch's prompts."""
    max_prompt_tokens: int | None
    """Their truncation."""


def _score_batch(loaded: LoadedModel, iv: Intervention, batch: Batch, prefix: _PrefixKey,
                 slots: Integer[Tensor, "variants batch"] | None, scale_t: Float[Tensor, " variants"],
                 label_ids: list[int], *, rows_per_pass: int, per_row_basis: bool,
                 out: Float[Tensor, "variants batch labels"]) -> None:
    """Score one left-padded batch under every variant into ``out``: the shared prefix once
    (its key/value cache kept in ``prefix.store``), then the edited suffix for groups of
    variants, each prompt's row replicated once per variant of the group; ``slots``: each
    variant's slot for each prompt."""
    model, device = loaded.model, loaded.device
    n_var, b = len(scale_t), batch.prompt_mask.shape[0]
    inputs = batch.inputs()
    first = _prefix_length(iv, batch.prompt_mask)
    cache = None
    if first > 0:
        iv.clear()  # the prefix holds no edited position
        cache = prefix.store.get(model, prefix.prompts, prefix.max_prompt_tokens, inputs, first)
    group = max(1, min(n_var, rows_per_pass // b))
    for v0 in range(0, n_var, group):
        g = min(group, n_var - v0)
        variant = torch.arange(v0, v0 + g).repeat(b)  # row r: prompt r // g, variant r % g
        rows_slots = None if slots is None else slots[v0:v0 + g].transpose(0, 1).reshape(-1)
        iv.set_batch(batch.prompt_mask[:, first:].repeat_interleave(g, 0),
                     None if rows_slots is None else rows_slots.to(device),
                     scale_t[variant], variant.to(device) if per_row_basis else None)
        kwargs = {"input_ids": inputs["input_ids"][:, first:].repeat_interleave(g, 0),
                  "attention_mask": inputs["attention_mask"].repeat_interleave(g, 0),
                  "position_ids": inputs["position_ids"][:, first:].repeat_interleave(g, 0)}
        if cache is not None:
            kwargs["cache"] = copy.deepcopy(cache)
            kwargs["cache"].batch_repeat_interleave(g)
        logits = model(**kwargs, use_cache=cache is not None, logits_to_keep=1).logits[:, -1]
        logp = logits.float().log_softmax(-1)[:, label_ids].cpu().view(b, g, -1)
        out[v0:v0 + g] = logp.transpose(0, 1)
        iv.clear()
