"""Batched greedy generation and label scoring, each row with its own user's intervention.

``generate`` and ``score_labels`` take a fitted ``PerFit`` (see ``artifact.load_perfit``),
one user id per prompt and a stage:

- ``perfit``: collective + that user's personal intervention (stacked as the fit says);
- ``collective``: the stage-1 intervention alone;
- ``none``: the base model.

``scale`` (a number or one value per prompt) multiplies the outermost edit: the personal one
for ``perfit``, the collective one for ``collective`` (0 = switched off, 1 = as trained;
dose-response curves use other values). User swaps need nothing special: pass user A's id
with user B's prompt. ``ablate_basis [k, d]`` projects a subspace out at the intervention
sites and positions (``ablate_mode``: from the edited hidden state, or from the edit only);
with ``perfit=None`` it needs ``sites`` and ``positions``.

Edits apply in the prompt pass only; generation then continues greedily with the KV cache
(a hand-written loop with padding-aware position ids, so a left-padded batched row generates
exactly what the same prompt generates alone, up to floating-point summation order).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Sequence

import torch

from perfit_probe.errors import ConfigError
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.artifact import PERFIT_STAGES, PerFit
from perfit_probe.interventions.batching import collate, continuation_logprobs, encode
from perfit_probe.models import LoadedModel
from perfit_probe.sites import PositionSpec, Site

log = logging.getLogger(__name__)


def _per_row(value, n: int, what: str) -> list:
    if value is None or isinstance(value, (str, int, float)):
        return [value] * n
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.ndim else [value.item()] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(f"{what}: got {len(value)} values for {n} prompts")
    return value


def build_intervention(
    perfit: PerFit | None,
    stage: str,
    *,
    ablate_basis: torch.Tensor | None = None,
    ablate_mode: str = "hidden",
    sites: Sequence[Site] | None = None,
    positions: PositionSpec | None = None,
) -> Intervention | None:
    """The ``Intervention`` a generation or scoring call applies (None for the bare base model)."""
    if stage not in PERFIT_STAGES:
        raise ConfigError(f"unknown stage {stage!r}: choose from {PERFIT_STAGES}")
    if perfit is not None:
        iv = perfit.intervention(stage, ablate_basis=ablate_basis, ablate_mode=ablate_mode)
        return None if stage == "none" and ablate_basis is None else iv
    if stage != "none" and stage != "perfit":
        raise ConfigError(f"stage {stage!r} needs a fitted PerFit (perfit=...)")
    if ablate_basis is None:
        return None
    if sites is None or positions is None:
        raise ConfigError("ablation without a fitted PerFit needs sites= and positions=")
    return Intervention(sites=sites, positions=positions, ablate_basis=ablate_basis, ablate_mode=ablate_mode)


def _slots(iv: Intervention | None, user_ids: list, rows: slice) -> torch.Tensor | None:
    if iv is None or iv.personal is None:
        return None
    chunk = user_ids[rows]
    if any(u is None for u in chunk):
        raise ConfigError("stage 'perfit' needs a user id for every prompt (user_ids=...)")
    return iv.personal.slot_indices([str(u) for u in chunk])


@torch.no_grad()
def _prepare(perfit, stage: str, n: int, user_ids, scale, **edit) -> tuple[Intervention | None, list, list]:
    """The intervention of a call (``build_intervention``) and its per-row users and scales."""
    iv = build_intervention(perfit, stage, **edit)
    return iv, _per_row(user_ids, n, "user_ids"), _per_row(scale, n, "scale")


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    perfit: PerFit | None = None,
    user_ids: Sequence[str] | str | None = None,
    stage: str = "perfit",
    scale: float | Sequence[float] | torch.Tensor = 1.0,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    ablate_basis: torch.Tensor | None = None,
    ablate_mode: str = "hidden",
    sites: Sequence[Site] | None = None,
    positions: PositionSpec | None = None,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens dropped, stripped)."""
    n = len(prompts)
    if n == 0:
        return []
    iv, users, scales = _prepare(perfit, stage, n, user_ids, scale, ablate_basis=ablate_basis,
                                 ablate_mode=ablate_mode, sites=sites, positions=positions)
    model, tok = loaded.model, loaded.tokenizer
    pad = int(tok.pad_token_id)
    eos = tok.eos_token_id
    device = loaded.device
    outputs: list[str] = []
    with (iv.attached(model) if iv is not None else nullcontext()):
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            encoded = [encode(tok, p, max_prompt_tokens=max_prompt_tokens) for p in prompts[rows]]
            batch = collate(encoded, pad, padding_side="left", device=device)
            if iv is not None:
                iv.set_batch(batch.prompt_mask, _slots(iv, users, rows), scales[rows])
            inputs = batch.inputs()
            out = model(**inputs, use_cache=True)
            past, mask = out.cache, batch.attention_mask
            position = inputs["position_ids"][:, -1]
            finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=device)
            steps: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                steps.append(torch.where(finished, torch.full_like(nxt, pad), nxt))
                if eos is not None:
                    finished |= nxt == eos
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                out = model(input_ids=nxt.unsqueeze(1), attention_mask=mask,
                            position_ids=position.unsqueeze(1), cache=past, use_cache=True)
                past = out.cache
            if iv is not None:
                iv.clear()
            generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in encoded]
            for row in generated:
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                outputs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outputs


@torch.no_grad()
def score_labels(
    loaded: LoadedModel,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    perfit: PerFit | None = None,
    user_ids: Sequence[str] | str | None = None,
    stage: str = "perfit",
    scale: float | Sequence[float] | torch.Tensor = 1.0,
    batch_size: int = 16,
    ablate_basis: torch.Tensor | None = None,
    ablate_mode: str = "hidden",
    sites: Sequence[Site] | None = None,
    positions: PositionSpec | None = None,
    max_prompt_tokens: int | None = None,
) -> torch.Tensor:
    """``[n_prompts, n_labels]`` log-probability of each label as the continuation of each prompt.

    ``log p(label | prompt) = sum_t log p(label_t | prompt, label_<t)`` (a sum, not a mean,
    over the label's tokens; without end-of-text). The edit sees only the prompt tokens.
    ``batch_size`` counts prompts; each forward pass holds ``batch_size * n_labels`` rows.
    """
    n, n_labels = len(prompts), len(labels)
    if n_labels == 0:
        raise ConfigError("score_labels needs at least one label")
    iv, users, scales = _prepare(perfit, stage, n, user_ids, scale, ablate_basis=ablate_basis,
                                 ablate_mode=ablate_mode, sites=sites, positions=positions)
    model, tok = loaded.model, loaded.tokenizer
    pad = int(tok.pad_token_id)
    device = loaded.device
    result = torch.zeros(n, n_labels)
    label_ids = [tok(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    # Labels of one token each (ratings, most tags): one forward pass per prompt, reading the
    # next-token distribution at the last prompt token, instead of one row per label.
    single = all(len(ids) == 1 for ids in label_ids)
    with (iv.attached(model) if iv is not None else nullcontext()):
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            per = 1 if single else n_labels
            encoded = [encode(tok, p, None if single else lab, max_prompt_tokens=max_prompt_tokens)
                       for p in prompts[rows] for lab in (labels[:1] if single else labels)]
            batch = collate(encoded, pad, padding_side="left", device=device)
            if iv is not None:
                slots = _slots(iv, users, rows)
                iv.set_batch(batch.prompt_mask,
                             None if slots is None else slots.repeat_interleave(per),
                             [s for s in scales[rows] for _ in range(per)])
            if single:
                logits = model(**batch.inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
                logp = logits.float().log_softmax(-1)[:, [ids[0] for ids in label_ids]]
                result[rows] = logp.cpu()
            else:
                logp, _ = continuation_logprobs(model, batch)
                result[rows] = logp.sum(1).view(-1, n_labels).cpu()
            if iv is not None:
                iv.clear()
    return result
