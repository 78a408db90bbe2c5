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

import torch
from jaxtyping import Float
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
    """Columns before the earliest edited position of a left-padded batch (0 when none are shared)."""
    seq = prompt_mask.shape[1]
    index, valid = batch_positions(iv.positions, prompt_mask, iv.position_clamp)
    first = min(int(index[valid].min()) if bool(valid.any()) else seq - 1, seq - 1)
    if first <= 0:
        return 0
    sub = prompt_mask[:, first:]
    index_s, valid_s = batch_positions(iv.positions, sub, iv.position_clamp)
    same = (index_s.shape == index.shape and torch.equal(valid_s, valid)
            and torch.equal((index_s + first)[valid], index[valid])
            and torch.equal(batch_last_mask(iv.positions, sub, iv.position_clamp),
                            batch_last_mask(iv.positions, prompt_mask, iv.position_clamp)))
    return first if same else 0


@torch.no_grad()
def score_label_variants(
    loaded: LoadedModel,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    perfit: PerFit,
    user_ids: Sequence[str],
    scales: Sequence[float],
    ablate_bases: Float[Tensor, "variants k d_model"] | None = None,
    ablate_mode: str = "hidden",
    stage: str = "perfit",
    batch_size: int = 16,
    rows_per_pass: int = 64,
    max_prompt_tokens: int | None = None,
) -> Float[Tensor, "variants prompts labels"]:
    """``[n_variants, n_prompts, n_labels]`` log p(label | prompt) under each variant.

    Variant ``v`` scales the outermost edit by ``scales[v]`` and, with ``ablate_bases [V, k, d]``,
    projects out ``ablate_bases[v]``. ``rows_per_pass`` bounds the replicated rows of one
    suffix pass (memory: each row carries a copy of its prompt's key/value cache).
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
    if len(user_ids) != len(prompts):
        raise ConfigError(f"{len(user_ids)} user ids for {len(prompts)} prompts")
    iv = perfit.intervention(stage, ablate_basis=ablate_bases, ablate_mode=ablate_mode)
    pad = int(tok.pad_token_id)
    n = len(prompts)
    result = torch.zeros(n_var, n, len(labels))
    scale_t = torch.as_tensor(list(scales), dtype=torch.float32)
    with iv.attached(loaded.model):
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            batch = collate([encode(tok, p, max_prompt_tokens=max_prompt_tokens) for p in prompts[rows]], pad,
                            padding_side="left", device=loaded.device)
            _score_batch(loaded, iv, batch, [str(u) for u in user_ids[rows]], scale_t, label_ids,
                         rows_per_pass=rows_per_pass, per_row_basis=ablate_bases is not None, out=result[:, rows])
    return result


def _score_batch(loaded: LoadedModel, iv: Intervention, batch: Batch, user_ids: list[str],
                 scale_t: Float[Tensor, " variants"], label_ids: list[int], *, rows_per_pass: int,
                 per_row_basis: bool, out: Float[Tensor, "variants batch labels"]) -> None:
    """Score one left-padded batch under every variant into ``out``: the shared prefix once
    (its key/value cache kept), then the edited suffix for groups of variants, each prompt's
    row replicated once per variant of the group."""
    model, device = loaded.model, loaded.device
    n_var, b = len(scale_t), batch.prompt_mask.shape[0]
    inputs = batch.inputs()
    first = _prefix_length(iv, batch.prompt_mask)
    cache = None
    if first > 0:
        iv.clear()  # the prefix holds no edited position
        cache = model(**{k: v[:, :first] for k, v in inputs.items()}, use_cache=True).cache
    slots = None if iv.personal is None else iv.personal.slot_indices(user_ids)
    group = max(1, min(n_var, rows_per_pass // b))
    for v0 in range(0, n_var, group):
        g = min(group, n_var - v0)
        variant = torch.arange(v0, v0 + g).repeat(b)  # row r: prompt r // g, variant r % g
        iv.set_batch(batch.prompt_mask[:, first:].repeat_interleave(g, 0),
                     None if slots is None else slots.repeat_interleave(g).to(device),
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
