"""Training-free steering: adding fixed vectors to the residual stream during the prompt pass.

``AdditiveSteering`` holds a table of vectors ``V [n, n_sites, d]``; a batch row with slot
``i`` and scale ``alpha`` gets, at site number ``s`` and each selected prompt position
(``last`` by default)::

    h  ->  h + alpha * V[i, s]

It is an ``Intervention`` (``perfit_probe.interventions.apply``) whose edit ignores ``h``, so
it shares the hook machinery: ``Site.hf_module`` places the hooks, positions come from the
prompt mask, only the prompt pass is edited, and ``attached(model)`` always removes the hooks.

Two ways to score a label set under steering:

- ``steered_label_logprobs``: full forward passes of padded batches (any labels, the rule of
  ``generate.score_labels``: ``log p(label | prompt)`` summed over the label's tokens);
- ``steer_last_token``: for one prompt and single-token labels, one pass over the prompt with
  the KV cache, then the last token alone, once per (vector, scale) row in one batch. Exact
  when only the last prompt position is edited (earlier positions do not see it), and far
  cheaper when many vectors and scales are tried on the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Integer
from torch import Tensor

from perfit_probe.errors import ConfigError
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.batching import collate, continuation_logprobs, encode
from perfit_probe.models import LoadedModel
from perfit_probe.sites import LAST, READ_CLAMP, PositionSpec, Site, parse_site


class AdditiveSteering(Intervention):
    """``h + alpha * V[slot, site]`` at the selected prompt positions (see the module docstring)."""

    def __init__(self, vectors: Float[Tensor, "slots sites d_model"] | Float[Tensor, "slots d_model"],
                 sites: Sequence[Site], positions: PositionSpec = LAST) -> None:
        if vectors.dim() == 2:
            vectors = vectors.unsqueeze(1)
        if vectors.dim() != 3 or vectors.shape[1] != len(sites):
            raise ConfigError(f"steering vectors must be [n, n_sites={len(sites)}, d], got {tuple(vectors.shape)}")
        super().__init__(sites=sites, positions=positions, position_clamp=READ_CLAMP)
        self.vectors = vectors.detach().float()

    def delta(self, site: int, h: Float[Tensor, "batch k d_model"], slots: Integer[Tensor, " batch"] | None,
              scale: Float[Tensor, " batch"], last: Bool[Tensor, "batch k"] | None = None,
              ablate_index: Integer[Tensor, " batch"] | None = None) -> Float[Tensor, "batch k d_model"]:
        if slots is None:
            raise ConfigError("additive steering needs one vector slot per row")
        vec = self.vectors.to(h.device, h.dtype)[slots.to(h.device), site]  # [B, d]
        out = scale.view(-1, 1).to(h.dtype) * vec
        return out.unsqueeze(1).expand_as(h).clone()


def _check_single(label_ids: list[list[int]]) -> None:
    if not all(len(ids) == 1 for ids in label_ids):
        raise ConfigError("the cached last-token path needs labels of one token each: "
                          "use steered_label_logprobs for multi-token labels")


def label_ids_of(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label continuation (as ``score_labels`` tokenises them)."""
    return [list(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels]


@torch.no_grad()
def steered_label_logprobs(
    loaded: LoadedModel,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    steering: AdditiveSteering | None = None,
    slots: Sequence[int] | None = None,
    scales: Sequence[float] | float = 1.0,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
) -> Float[Tensor, "prompts labels"]:
    """``[n_prompts, n_labels]`` ``log p(label | prompt)`` with row ``i`` steered by vector
    ``slots[i]`` scaled by ``scales[i]`` (full forward passes, left-padded batches)."""
    n, model, tok = len(prompts), loaded.model, loaded.tokenizer
    label_ids = label_ids_of(tok, labels)
    single = all(len(ids) == 1 for ids in label_ids)
    scales = [float(scales)] * n if isinstance(scales, (int, float)) else [float(s) for s in scales]
    if steering is not None and (slots is None or len(slots) != n or len(scales) != n):
        raise ConfigError("steering needs one slot and one scale per prompt")
    result = torch.zeros(n, len(labels))
    ctx = steering.attached(model) if steering is not None else _null()
    with ctx:
        for start in range(0, n, batch_size):
            rows = range(start, min(start + batch_size, n))
            per = 1 if single else len(labels)
            encoded = [encode(tok, prompts[i], None if single else lab, max_prompt_tokens=max_prompt_tokens)
                       for i in rows for lab in (labels[:1] if single else labels)]
            batch = collate(encoded, int(tok.pad_token_id), padding_side="left", device=loaded.device)
            if steering is not None:
                steering.set_batch(batch.prompt_mask,
                                   torch.tensor([slots[i] for i in rows for _ in range(per)]),
                                   [scales[i] for i in rows for _ in range(per)])
            if single:
                logits = model(**batch.inputs(), use_cache=False, logits_to_keep=1).logits[:, -1]
                result[start:start + len(rows)] = logits.float().log_softmax(-1)[:, [i[0] for i in label_ids]].cpu()
            else:
                logp, _ = continuation_logprobs(model, batch)
                result[start:start + len(rows)] = logp.sum(1).view(-1, len(labels)).cpu()
            if steering is not None:
                steering.clear()
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def steer_last_token(
    loaded: LoadedModel,
    prompt: str,
    label_ids: list[list[int]],
    steering: AdditiveSteering,
    slots: Sequence[int],
    scales: Sequence[float],
    *,
    capture: Sequence[str] = (),
    max_prompt_tokens: int | None = None,
) -> tuple[Float[Tensor, " labels"], Float[Tensor, "slots labels"], dict[str, Float[Tensor, "tokens d_model"]]]:
    """One prompt, many steered variants of its last position (see the module docstring).

    Returns the unsteered ``log p(label)`` ``[n_labels]``, the steered ones ``[len(slots),
    n_labels]`` (row ``j``: vector ``slots[j]`` scaled by ``scales[j]``) and the unsteered hidden
    states ``[n_tokens, d]`` of the prompt at each site in ``capture``.
    """
    _check_single(label_ids)
    if len(slots) != len(scales) or not len(slots):
        raise ConfigError("give one scale per slot, and at least one slot")
    if steering.positions != LAST:
        raise ConfigError("the cached path edits the last prompt position only (positions='last')")
    model = loaded.model
    ids = torch.tensor([encode(loaded.tokenizer, prompt, max_prompt_tokens=max_prompt_tokens).ids],
                       device=loaded.device)
    wanted = [i[0] for i in label_ids]
    found: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in capture:
            module, where = parse_site(name).hf_module(model)
            if where == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, kwargs, name=name: found.__setitem__(
                        name, (args[0] if args else kwargs["hidden_states"])[0].detach().float().cpu()),
                    with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, name=name: found.__setitem__(
                        name, (out[0] if isinstance(out, (tuple, list)) else out)[0].detach().float().cpu())))
        out = model(input_ids=ids, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    plain = out.logits[0, -1].float().log_softmax(-1)[wanted].cpu()
    if ids.shape[1] < 2:
        raise ConfigError("the cached path needs prompts of at least 2 tokens")
    cache = out.cache
    cache.crop(-1)
    cache.batch_repeat_interleave(len(slots))
    last = ids[:, -1:].expand(len(slots), 1)
    with steering.attached(model):
        steering.set_batch(torch.ones(len(slots), 1, dtype=torch.long, device=loaded.device),
                           torch.as_tensor(list(slots), dtype=torch.long), list(scales))
        n = ids.shape[1]
        logits = model(input_ids=last, attention_mask=torch.ones(len(slots), n, dtype=torch.long, device=loaded.device),
                       position_ids=torch.full((len(slots), 1), n - 1, device=loaded.device), cache=cache,
                       use_cache=True).logits[:, -1]
    steered = logits.float().log_softmax(-1)[:, wanted].cpu()
    return plain, steered, found
