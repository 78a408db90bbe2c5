"""Tokenising prompt + continuation pairs and padding them into batches.

A prompt and its continuation (a training target, or a label to score) are tokenised
*separately* and concatenated, so the prompt tokens are exactly those a generation call sees.
Training targets end with the end-of-text token. ``labels`` are -100 on prompt and padding
tokens (masked out of the loss), the continuation's token ids elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from perfit_probe.backends.base import model_inputs
from perfit_probe.errors import DataError


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt (+ continuation)."""

    ids: tuple[int, ...]
    """Prompt ids followed by continuation ids."""
    n_prompt: int
    """Number of prompt tokens at the start of ``ids``."""


@dataclass
class Batch:
    """A padded batch."""

    input_ids: torch.Tensor
    """``[B, T]`` token ids (padding = pad token)."""
    attention_mask: torch.Tensor
    """``[B, T]`` 1 on real tokens."""
    prompt_mask: torch.Tensor
    """``[B, T]`` 1 on prompt tokens."""
    labels: torch.Tensor
    """``[B, T]`` continuation ids, -100 elsewhere."""

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword inputs for the model (with padding-aware position ids)."""
        return model_inputs(self.input_ids, self.attention_mask)


def encode(
    tokenizer,
    prompt: str,
    continuation: str | None = None,
    *,
    eos: bool = False,
    max_prompt_tokens: int | None = None,
) -> Encoded:
    """Token ids of ``prompt`` (+ ``continuation`` (+ eos)); long prompts keep their last tokens."""
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise DataError(f"prompt {prompt[:40]!r} tokenises to nothing")
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[len(ids) - max_prompt_tokens:]
    n_prompt = len(ids)
    if continuation is not None:
        ids += list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if eos:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-text token to end training targets with")
        ids.append(int(tokenizer.eos_token_id))
    return Encoded(tuple(int(i) for i in ids), n_prompt)


def collate(items: Sequence[Encoded], pad_id: int, *, padding_side: str = "left",
            device: torch.device | str = "cpu") -> Batch:
    """Pad encoded rows into a ``Batch`` (left padding by default)."""
    length = max(len(e.ids) for e in items)
    n = len(items)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros(n, length, dtype=torch.long)
    prompt = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for i, enc in enumerate(items):
        start = length - len(enc.ids) if padding_side == "left" else 0
        ids = torch.tensor(enc.ids, dtype=torch.long)
        input_ids[i, start:start + len(ids)] = ids
        attention[i, start:start + len(ids)] = 1
        prompt[i, start:start + enc.n_prompt] = 1
        labels[i, start + enc.n_prompt:start + len(ids)] = ids[enc.n_prompt:]
    return Batch(input_ids.to(device), attention.to(device), prompt.to(device), labels.to(device))


def continuation_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` of ``model`` on ``batch``, projecting only the positions that matter.

    The vocabulary projection is computed only at positions that predict a continuation token
    in some row (``logits_to_keep``), instead of at every position: for short targets after
    long prompts this removes most of the time and memory of the LM head and its softmax.
    Returns ``(logp [B, T-1], mask [B, T-1])`` exactly as ``token_logprobs`` does.
    """
    shifted = batch.labels[:, 1:]
    mask = shifted != -100
    keep = mask.any(0).nonzero().squeeze(1)
    logits = model(**batch.inputs(), use_cache=False, logits_to_keep=keep).logits
    kept = shifted[:, keep]
    logp_kept = -F.cross_entropy(logits.float().transpose(1, 2), kept.clamp(min=0), reduction="none")
    logp = torch.zeros(shifted.shape, dtype=logp_kept.dtype, device=logp_kept.device)
    logp[:, keep] = logp_kept
    return logp * mask, mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of next-token ``labels`` and the mask of counted tokens.

    ``logits [B, T, V]`` predict token t+1 at position t; returns ``(logp [B, T-1], mask [B, T-1])``.
    """
    shifted = labels[:, 1:]
    mask = shifted != -100
    logp = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted.clamp(min=0), reduction="none"
    )
    return logp * mask, mask
