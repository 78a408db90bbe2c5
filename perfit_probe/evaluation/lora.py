"""The OPPU baselines: one LoRA adapter per user, trained one user after another.

OPPU ("One PEFT Per User", the baseline PerFit compares with) trains, for each test user, a
LoRA of rank 8 on the attention query and value projections of a frozen base model, on that
user's own history examples, with the same objective as PerFit (next-token cross-entropy on
the target, prompt tokens masked). The OPPU code uses ``r=8, lora_alpha=8,
lora_dropout=0.05``, AdamW (lr 1e-4, weight decay 1e-2), gradient-norm clip 0.3, 2 epochs, a
linear schedule with 10% warm-up; these are the defaults of :class:`LoraBaselineConfig`.
Full OPPU first trains a shared *task* LoRA on the other (train) users' data and merges it
into the base; the per-user adapters then sit on that task model. Both are available:
``fit_user`` on the train users' examples gives the task adapter, and ``merged(adapter)``
makes the task model for as long as the context lasts.

Model selection (as PerFit's stage 2, ``perfit_probe.interventions.train``): given validation
examples, ``fit_user`` measures their loss (next-token cross-entropy averaged over all their
target tokens, dropout off) before training (epoch 0: no adapter, i.e. the model the adapter
sits on) and after each epoch, and keeps the adapter of the epoch with the lowest loss (the
earliest on ties); epoch 0 is kept as a zero adapter (every weight 0: the adapted model *is*
the model it sits on). Measuring changes nothing in training (no random numbers are drawn),
so a kept epoch ``e`` is exactly the adapter after ``e`` epochs of the run without validation.

``LoraBaseline`` is the fitter: ``fit_user`` injects a fresh adapter with ``peft``, trains it,
copies out the adapter weights into a small ``UserLora`` artifact and removes the adapter
again (``unload``), so the base model is left exactly as it was. ``applied(adapter)`` is a
context manager that puts a user's adapter back for prediction and always removes it;
``merged(adapter)`` merges an adapter into the weights and restores the original weights
bit for bit on exit.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from perfit_probe.config import LoraBaselineConfig
from perfit_probe.errors import ConfigError
from perfit_probe.interventions.batching import Encoded, collate, continuation_logprobs, encode
from perfit_probe.models import LoadedModel

log = logging.getLogger(__name__)

FUSED_QKV = ("c_attn", "query_key_value", "Wqkv", "qkv_proj")
"""Fused query/key/value projections, used when a model has no separate q/v projections."""


@dataclass(frozen=True)
class UserLora:
    """A trained user adapter: its weights and what training it cost."""

    user_id: str
    """The user it was trained for."""
    state: dict[str, torch.Tensor]
    """Adapter weights (``peft`` state dict: ``lora_A``/``lora_B`` of every target module)."""
    n_trainable: int
    """Number of trainable parameters of the adapter."""
    train_s: float
    """Wall time of training, seconds (injection and removal included)."""
    n_examples: int
    """Training examples the user had."""
    losses: tuple[float, ...] = field(default_factory=tuple)
    """Mean training loss of each epoch."""
    val_losses: tuple[float, ...] = field(default_factory=tuple)
    """Validation loss before training and after each epoch (empty: no validation examples)."""
    epoch: int | None = None
    """Epochs of training in the kept ``state`` (0: the zero adapter; all epochs without validation)."""
    n_val: int = 0
    """Validation examples the epoch was chosen on."""


def resolve_targets(model: nn.Module, targets: Sequence[str] = ()) -> list[str]:
    """Module names to adapt: the given ones, else q/v projections, else a fused qkv."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if targets:
        missing = [t for t in targets if t not in names]
        if missing:
            raise ConfigError(f"LoRA targets {missing} are not modules of {type(model).__name__}: "
                              "name linear layers it has, e.g. q_proj,v_proj")
        return list(targets)
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    for fused in FUSED_QKV:
        if fused in names:
            return [fused]
    raise ConfigError(f"cannot find query/value projections in {type(model).__name__}: "
                      "pass the LoRA target module names explicitly")


def encode_supervised(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], max_length: int
) -> list[Encoded]:
    """Token ids of ``prompt + target + eos`` per example, as PerFit's trainer encodes them.

    (``perfit_probe.interventions.batching.encode``: prompt and target tokenized separately;
    too-long prompts keep their last tokens so that the whole sequence fits ``max_length``.)
    """
    out = []
    for prompt, target in zip(prompts, targets, strict=True):
        n_target = len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1
        if n_target <= 1:
            raise ConfigError(f"empty training target for prompt {prompt[:40]!r}...")
        out.append(encode(tokenizer, prompt, target, eos=True,
                          max_prompt_tokens=max(1, max_length - n_target)))
    return out


def _lr_lambda(n_steps: int, warmup_ratio: float):
    warm = int(math.ceil(n_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (n_steps - step) / max(1, n_steps - warm))

    return factor


def _load_adapter(model: nn.Module, adapter: UserLora) -> None:
    """Put ``adapter``'s weights into the injected peft ``model``; refuse weights it has no place for."""
    # peft takes seconds to import: deferred until a LoRA is used
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, adapter.state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ConfigError(f"adapter of user {adapter.user_id!r} does not fit this model "
                          f"(unexpected weights {unexpected[:2]})")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy (on the CPU) of the injected peft ``model``'s adapter weights."""
    # peft takes seconds to import: deferred until a LoRA is used
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


class LoraBaseline:
    """Trains and applies one LoRA adapter per user on a frozen base model."""

    def __init__(self, loaded: LoadedModel, config: LoraBaselineConfig = LoraBaselineConfig()) -> None:
        self.loaded = loaded
        self.config = config
        self.targets_ = resolve_targets(loaded.model, config.targets)

    def _peft_config(self):
        """peft's ``LoraConfig`` of this baseline (rank, alpha, dropout, target modules)."""
        # peft takes seconds to import: deferred until a LoRA is used
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, bias="none",
                          target_modules=list(self.targets_), task_type="CAUSAL_LM")

    @contextmanager
    def _injected(self) -> Iterator[nn.Module]:
        """A peft model around the base model; the adapter is removed on exit."""
        # peft takes seconds to import: deferred until a LoRA is used
        from peft import get_peft_model

        base = self.loaded.model
        was_training = base.training
        with warnings.catch_warnings():  # transformers deprecation; peft's Conv1D fan_in_fan_out note
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            peft_model = get_peft_model(base, self._peft_config())
        try:
            yield peft_model
        finally:
            peft_model.unload()
            base.train(was_training)
            base.requires_grad_(False)

    def fit_user(self, user_id: str, prompts: Sequence[str], targets: Sequence[str], *,
                 seed: int = 0, val_prompts: Sequence[str] = (), val_targets: Sequence[str] = (),
                 progress: bool = False, desc: str | None = None) -> UserLora:
        """Train a fresh adapter on one user's ``(prompt, target)`` history examples.

        With ``val_prompts``/``val_targets``: keep the epoch (0 = zero adapter) with the lowest
        loss on them (see the module docstring). ``progress``: a progress bar over the
        optimisation steps, labelled ``desc`` (for long trainings such as OPPU's task LoRA).
        """
        if not prompts:
            raise ConfigError(f"user {user_id!r} has no history examples to train a LoRA on")
        c = self.config
        tok = self.loaded.tokenizer
        rows = encode_supervised(tok, prompts, targets, c.max_length)
        val_rows = encode_supervised(tok, val_prompts, val_targets, c.max_length) if val_prompts else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # adapter init (lora_A) and LoRA dropout masks
            with self._injected() as model:
                params = [p for p in model.parameters() if p.requires_grad]
                n_trainable = sum(p.numel() for p in params)
                losses, val_losses, state, kept_epoch = self._train(
                    model, params, rows, val_rows, seed=seed, progress=progress, desc=desc or f"LoRA {user_id}")
        train_s = time.perf_counter() - start
        log.debug("LoRA for user %s: %d examples, loss %s, validation %s, kept epoch %d, %.1f s", user_id,
                  len(rows), losses, val_losses, kept_epoch, train_s)
        return UserLora(user_id, state, n_trainable, train_s, len(rows), tuple(losses), tuple(val_losses),
                        kept_epoch, len(val_rows))

    def _train(self, model: nn.Module, params: list[nn.Parameter], rows: list[Encoded], val_rows: list[Encoded], *,
               seed: int, progress: bool, desc: str) -> tuple[list[float], list[float], dict[str, torch.Tensor], int]:
        """Optimise the injected adapter of ``model`` (``params``) on ``rows``, batches shuffled by
        ``seed``; returns the training loss per epoch, the validation loss per epoch (from epoch 0,
        the zero adapter; empty without ``val_rows``), the kept adapter weights and their epoch."""
        # peft takes seconds to import: deferred until a LoRA is trained
        from peft import get_peft_model_state_dict

        c = self.config
        gen = torch.Generator().manual_seed(seed)
        n_batches = math.ceil(len(rows) / c.batch_size)
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(n_batches * c.epochs, c.warmup_ratio))
        model.eval()  # base-model dropout stays off; only LoRA dropout trains
        for name, module in model.named_modules():
            if "lora_dropout" in name:
                module.train()
        losses, val_losses, kept, kept_epoch = [], [], None, c.epochs
        if val_rows:
            with model.disable_adapter():
                val_losses.append(self._loss(model, val_rows))
            kept = {k: torch.zeros_like(v, device="cpu") for k, v in get_peft_model_state_dict(model).items()}
            kept_epoch = 0
        bar = tqdm(total=n_batches * c.epochs, desc=desc, unit="step", disable=not progress, leave=False)
        for epoch in range(c.epochs):
            order = torch.randperm(len(rows), generator=gen).tolist()
            losses.append(self._epoch(model, params, [rows[i] for i in order], opt, sched, bar))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if val_rows:
                val_losses.append(self._loss(model, val_rows))
                if val_losses[-1] < val_losses[kept_epoch]:
                    kept_epoch = epoch + 1
                    kept = _state(model)
        state = kept if kept is not None else _state(model)
        bar.close()
        return losses, val_losses, state, kept_epoch

    def _epoch(self, model: nn.Module, params: list[nn.Parameter], rows: list[Encoded],
               opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, bar: tqdm) -> float:
        """One pass over ``rows`` (in this order) in batches; returns the mean batch loss."""
        c = self.config
        total, count = 0.0, 0
        for b in range(math.ceil(len(rows) / c.batch_size)):
            batch = collate(rows[b * c.batch_size:(b + 1) * c.batch_size], self.loaded.tokenizer.pad_token_id,
                            padding_side="right", device=self.loaded.device)
            logp, mask = continuation_logprobs(model, batch)
            loss = -logp.sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            opt.step()
            sched.step()
            total += float(loss.detach())
            count += 1
            bar.update()
        return total / count

    @torch.no_grad()
    def _loss(self, model: nn.Module, rows: list[Encoded]) -> float:
        """Next-token cross-entropy of ``rows``' targets under ``model``, averaged over all their
        target tokens; LoRA dropout off while measuring (no random numbers are drawn)."""
        dropouts = [m for name, m in model.named_modules() if "lora_dropout" in name]
        modes = [m.training for m in dropouts]
        for module in dropouts:
            module.eval()
        total, tokens = 0.0, 0.0
        try:
            for b in range(0, len(rows), self.config.batch_size):
                batch = collate(rows[b:b + self.config.batch_size], self.loaded.tokenizer.pad_token_id,
                                padding_side="right", device=self.loaded.device)
                logp, mask = continuation_logprobs(model, batch)
                total -= float(logp.sum())
                tokens += float(mask.sum())
        finally:
            for module, mode in zip(dropouts, modes):
                module.train(mode)
        return total / tokens

    @contextmanager
    def applied(self, adapter: UserLora) -> Iterator[LoadedModel]:
        """The base model with ``adapter`` in place (eval mode, no dropout); removed on exit."""
        with self._injected() as model:
            _load_adapter(model, adapter)
            model.eval().requires_grad_(False)
            yield replace(self.loaded, model=model)

    @contextmanager
    def merged(self, adapter: UserLora) -> Iterator[LoadedModel]:
        """The base model with ``adapter`` merged into its weights (OPPU's task model).

        Adapters fitted or applied inside the context sit on the merged weights. On exit the
        adapted modules' original weights are copied back, so the base model is bit-identical
        to what it was.
        """
        base = self.loaded.model
        targets = set(self.targets_)
        saved = {name: p.detach().clone() for name, p in base.named_parameters()
                 if name.rsplit(".", 2)[-2] in targets}
        try:
            with self._injected() as model:
                _load_adapter(model, adapter)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    model.base_model.merge_adapter()
            # _injected unloaded the LoRA layers; their base layers keep the merged weights
            yield self.loaded
        finally:
            params = dict(base.named_parameters())
            with torch.no_grad():
                for name, original in saved.items():
                    params[name].copy_(original)

    def fit(self, users: dict[str, tuple[Sequence[str], Sequence[str]]], *, seed: int = 0,
            progress: bool = False) -> dict[str, UserLora]:
        """Train every user's adapter, one user after another (as OPPU does)."""
        out = {}
        for i, (user_id, (prompts, targets)) in enumerate(
                tqdm(users.items(), desc="LoRA per user", disable=not progress)):
            out[user_id] = self.fit_user(user_id, prompts, targets, seed=seed + i)
        return out
