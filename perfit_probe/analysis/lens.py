"""The logit lens: reading a hidden state (or a shift of one) in the vocabulary.

``logit_lens(model, h) = lm_head(norm_f(h))``: the model's final norm and unembedding
applied to a residual-stream state ``h [..., d]`` taken at any site (exact at the last
layer's output, an approximation earlier). ``final_readout(model)`` finds the two modules of
a Hugging Face causal LM: ``model.model.norm`` and ``model.lm_head`` (Llama, Mistral, Qwen,
SmolLM), ``model.transformer.ln_f`` and ``model.lm_head`` (GPT-2), ``gpt_neox.final_layer_norm``
and ``embed_out`` (NeoX).

A *direction* ``v`` is read at a base state ``h0`` (the mean plain-prompt state at the site)::

    shift(v) = log_softmax(lens(h0 + v)) - log_softmax(lens(h0))

over the whole vocabulary: the tokens it promotes (largest shift) and demotes (smallest);
and, for a label set, each label's shift (at the label's first token) and the label
distribution ``softmax`` over the labels' lens logits with and without ``v``.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from perfit_probe.errors import ConfigError

_READOUTS = (("model.norm", "lm_head"), ("transformer.ln_f", "lm_head"), ("model.final_layernorm", "lm_head"),
             ("gpt_neox.final_layer_norm", "embed_out"), ("model.decoder.final_layer_norm", "lm_head"))


def _attr(obj: object, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def final_readout(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(final_norm, unembedding)`` of a Hugging Face causal LM; ``ConfigError`` if not found."""
    for norm_path, head_path in _READOUTS:
        norm, head = _attr(model, norm_path), _attr(model, head_path)
        if isinstance(norm, nn.Module) and isinstance(head, nn.Module):
            return norm, head
    raise ConfigError(f"cannot find the final norm and unembedding of {type(model).__name__}: "
                      f"tried {[p for pair in _READOUTS for p in pair]}")


@torch.no_grad()
def logit_lens(model: nn.Module, hidden: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
    """``lm_head(norm(hidden))`` in float32, for ``hidden [..., d]`` (any leading shape)."""
    norm, head = final_readout(model)
    param = next(head.parameters())
    return head(norm(hidden.to(param.device, param.dtype))).float().cpu()


@torch.no_grad()
def lens_shift(model: nn.Module, base: Float[Tensor, " d_model"],
               directions: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """``[n, vocab]``: ``log_softmax(lens(base + v)) - log_softmax(lens(base))`` for each row ``v``
    of ``directions [n, d]`` at the base state ``base [d]``."""
    base = base.float().view(1, -1)
    with_v = logit_lens(model, base + directions.float()).log_softmax(-1)
    without = logit_lens(model, base).log_softmax(-1)
    return with_v - without


def top_tokens(shift: Float[Tensor, " vocab"], tokenizer,
               n: int = 10) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The ``n`` most promoted and most demoted tokens of one shift row ``[vocab]``, decoded."""
    shift = shift.float()
    n = min(n, shift.numel())
    up = torch.topk(shift, n)
    down = torch.topk(-shift, n)
    decode = lambda i: tokenizer.decode([int(i)])  # noqa: E731
    return ([(decode(i), float(v)) for v, i in zip(up.values, up.indices)],
            [(decode(i), float(-v)) for v, i in zip(down.values, down.indices)])


def label_first_tokens(tokenizer, labels: list[str]) -> list[int]:
    """First token id of each label text as it continues a prompt (labels with the same first
    token cannot be told apart here: ``ConfigError``)."""
    ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    if any(not i for i in ids):
        raise ConfigError(f"a label tokenises to nothing: {labels}")
    first = [int(i[0]) for i in ids]
    if len(set(first)) != len(first):
        raise ConfigError(f"labels {labels} share first tokens: the lens cannot separate them")
    return first


@torch.no_grad()
def label_shift(model: nn.Module, base: Float[Tensor, " d_model"], directions: Float[Tensor, "n d_model"],
                label_ids: list[int],
                ) -> tuple[Float[np.ndarray, "n labels"], Float[np.ndarray, " labels"], Float[np.ndarray, "n labels"]]:
    """Per direction: each label's log-probability shift over the vocabulary ``[n, n_labels]``,
    and the label distributions (softmax over the labels' lens logits) without ``[n_labels]``
    and with the direction ``[n, n_labels]``."""
    base = base.float().view(1, -1)
    with_v = logit_lens(model, base + directions.float())
    without = logit_lens(model, base)
    shift = (with_v.log_softmax(-1) - without.log_softmax(-1))[:, label_ids]
    return (shift.numpy(), without[0, label_ids].softmax(-1).numpy(),
            with_v[:, label_ids].softmax(-1).numpy())
