"""Two-stage PerFit training on a frozen base model.

Stage 1 (collective) trains one intervention (a one-slot bank) on all training users'
examples. Stage 2 (personal) trains one intervention per user, on top of the frozen stage-1
intervention, on that user's own examples. Loss: next-token cross-entropy on the target
tokens (prompt and padding masked), averaged over a step's target tokens::

    L_u(step) = - (1 / N_u) sum_{target tokens t of user u's rows} log p(t | prefix)

Stage 2 trains all users *together*: a step takes the next mini-batch of every user that has
one left, concatenates the rows into one forward pass (split into chunks of at most
``rows_per_forward`` rows, gradients accumulated), and minimises ``sum_u L_u``. Since users'
parameters are disjoint slots of one bank, user u's gradient is exactly that of ``L_u``
alone. The optimiser keeps each slot independent too:

- gradient-norm clipping is **per user** (``clip_grad_norm`` over that slot's parameters
  only; a global clip would couple users);
- AdamW (``BankAdamW``) is elementwise, with a step counter per slot, and updates (including
  weight decay and bias corrections) only the slots active in the step.

Each user sees its examples in the same order (shuffled per epoch with a generator seeded by
``(seed, user, epoch)``) and takes the same number of steps as when trained alone, so the
batched run equals one-user-at-a-time training (``train_personal_sequential``) up to
floating-point summation order. The base model and stage 1 stay frozen.

Model selection (optional, stage 2): given validation rows per user, each user's loss on
them is measured before training and at the end of each of *its* epochs, and the user keeps
the parameters of its best epoch (epoch 0: the initialisation, e.g. a zero personal edit,
i.e. stage 1 alone). This too is per user, so batched and sequential runs select alike.

The returned curve has one row per (user, step) with ``split == "train"`` (``epoch`` is the
epoch the step belongs to) and, with validation, one row per (user, completed epochs) with
``split == "val"`` (``epoch`` counts completed epochs; ``selected`` marks the kept one).
"""

from __future__ import annotations

import logging
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from perfit_probe.config import TrainConfig
from perfit_probe.errors import ConfigError
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.batching import Encoded, collate, continuation_logprobs
from perfit_probe.interventions.modules import InterventionBank, slot_generator
from perfit_probe.models import LoadedModel

log = logging.getLogger(__name__)


class BankAdamW:
    """AdamW over bank parameters (leading slot axis) with per-slot steps and masked updates.

    For an active slot, with gradient g and slot step t (``torch.optim.AdamW``'s update)::

        p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
        p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

    Inactive slots are left exactly as they are (parameters, moments and step count).
    """

    def __init__(self, bank: InterventionBank, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        decayed = {id(p) for p in bank.decayed_parameters()}
        self.params = [(p, id(p) in decayed) for p in bank.parameters()]
        self.m = [torch.zeros_like(p) for p, _ in self.params]
        self.v = [torch.zeros_like(p) for p, _ in self.params]
        self.steps = torch.zeros(bank.n_slots, dtype=torch.float64, device=bank.device)

    def zero_grad(self) -> None:
        """Drop the gradients."""
        for p, _ in self.params:
            p.grad = None

    @torch.no_grad()
    def clip_per_slot(self, max_norm: float) -> torch.Tensor:
        """Clip each slot's gradient norm (over all its parameters) to ``max_norm``; return the norms."""
        sq = torch.zeros(len(self.steps), dtype=torch.float32, device=self.steps.device)
        for p, _ in self.params:
            if p.grad is not None:
                sq += p.grad.float().pow(2).flatten(1).sum(1)
        norms = sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            for p, _ in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef.view(-1, *[1] * (p.ndim - 1)).to(p.grad.dtype))
        return norms

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One update of the ``active`` slots (``[n_slots]`` bool)."""
        b1, b2 = self.betas
        self.steps += active.to(self.steps.dtype)
        t = self.steps.clamp(min=1)
        bc1 = (1 - b1 ** t).float()
        bc2_sqrt = (1 - b2 ** t).sqrt().float()
        for (p, decay), m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1, *[1] * (p.ndim - 1))
            a = active.view(shape)
            g = p.grad
            if decay and self.weight_decay:
                p.copy_(torch.where(a, p * (1 - self.lr * self.weight_decay), p))
            m.copy_(torch.where(a, m.lerp(g, 1 - b1), m))
            v.copy_(torch.where(a, v * b2 + (1 - b2) * g * g, v))
            denom = v.sqrt() / bc2_sqrt.view(shape) + self.eps
            p.copy_(torch.where(a, p - (self.lr / bc1.view(shape)) * m / denom, p))


# ---------------------------------------------------------------------- schedules
Row = tuple[int, Encoded]
"""A training row: slot index in the trained bank, encoded prompt + target."""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def user_steps(key: str, examples: Sequence[Encoded], config: TrainConfig) -> list[tuple[int, list[Encoded]]]:
    """A user's (epoch, mini-batch) sequence: each epoch shuffled with a generator seeded by (seed, user, epoch)."""
    out = []
    for epoch in range(config.epochs):
        order = torch.randperm(len(examples), generator=slot_generator(config.seed, f"{key}/epoch{epoch}")).tolist()
        out += [(epoch, batch) for batch in _chunks([examples[i] for i in order], config.batch_size)]
    return out


def _run_step(loaded: LoadedModel, iv: Intervention, rows: list[Row], n_slots: int,
              rows_per_forward: int, backward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (and backward) of one step's rows; returns (loss per slot, target tokens per slot)."""
    device = loaded.device
    pad = int(loaded.tokenizer.pad_token_id)
    counts = torch.zeros(n_slots, dtype=torch.float32)
    for slot, enc in rows:
        counts[slot] += len(enc.ids) - enc.n_prompt
    if bool((counts[[s for s, _ in rows]] == 0).any()):
        raise ConfigError("a training example has an empty target")
    counts_dev = counts.to(device)
    losses = torch.zeros(n_slots, dtype=torch.float32)
    for chunk in _chunks(rows, rows_per_forward):
        batch = collate([e for _, e in chunk], pad, padding_side="left", device=device)
        slots = torch.tensor([s for s, _ in chunk], dtype=torch.long, device=device)
        iv.set_batch(batch.prompt_mask, slots)
        with torch.set_grad_enabled(backward):
            logp, _ = continuation_logprobs(loaded.model, batch)
        iv.clear()
        row_nll = -logp.sum(1) / counts_dev[slots]
        if backward:
            row_nll.sum().backward()
        losses.index_add_(0, slots.cpu(), row_nll.detach().float().cpu())
    return losses, counts


CURVE_COLUMNS = ["stage", "split", "user_id", "epoch", "step", "n_rows", "loss", "grad_norm", "selected"]
"""Columns of a training curve."""


class _Selector:
    """Per-slot model selection on validation rows: keeps each slot's best parameters."""

    def __init__(self, loaded: LoadedModel, iv: Intervention, bank: InterventionBank,
                 validation: dict[int, list[Encoded]], config: TrainConfig, stage: str) -> None:
        self.loaded, self.iv, self.bank, self.config, self.stage = loaded, iv, bank, config, stage
        self.validation = {slot: rows for slot, rows in validation.items() if rows}
        self.best_loss = torch.full((bank.n_slots,), float("inf"))
        self.best = [p.detach().clone() for p in bank.parameters()]
        self.records: list[dict] = []
        self.chosen: dict[int, int] = {}

    @torch.no_grad()
    def evaluate(self, ends: list[tuple[int, int, int]]) -> None:
        """Measure the slots of ``ends`` ((slot, completed epochs, last step)); keep improvements."""
        ends = [e for e in ends if e[0] in self.validation]
        if not ends:
            return
        rows = [(slot, enc) for slot, _, _ in ends for enc in self.validation[slot]]
        losses, _ = _run_step(self.loaded, self.iv, rows, self.bank.n_slots, self.config.rows_per_forward,
                              backward=False)
        for slot, epoch, step in ends:
            loss = float(losses[slot])
            self.records.append({"stage": self.stage, "split": "val", "user_id": self.bank.keys[slot],
                                 "epoch": epoch, "step": step, "n_rows": len(self.validation[slot]),
                                 "loss": loss, "grad_norm": float("nan"), "selected": False})
            if loss < float(self.best_loss[slot]):
                self.best_loss[slot] = loss
                self.chosen[slot] = len(self.records) - 1
                for kept, param in zip(self.best, self.bank.parameters()):
                    kept[slot] = param.detach()[slot]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every validated slot's best parameters back into the bank; mark the kept rows."""
        slots = torch.tensor(sorted(self.validation), dtype=torch.long, device=self.bank.device)
        for kept, param in zip(self.best, self.bank.parameters()):
            param.index_copy_(0, slots, kept.index_select(0, slots))
        for index in self.chosen.values():
            self.records[index]["selected"] = True


def _epoch_ends(steps: list[list[tuple[int, int, int, list[Encoded]]]]) -> dict[int, list[tuple[int, int, int]]]:
    """Global step index -> (slot, completed epochs, user step) of the slots whose epoch ends there."""
    last: dict[tuple[int, int], tuple[int, int]] = {}
    for t, step in enumerate(steps):
        for slot, epoch, number, _ in step:
            last[(slot, epoch)] = (t, number)
    ends: dict[int, list[tuple[int, int, int]]] = {}
    for (slot, epoch), (t, number) in sorted(last.items()):
        ends.setdefault(t, []).append((slot, epoch + 1, number))
    return ends


def _train(loaded: LoadedModel, iv: Intervention, bank: InterventionBank,
           steps: list[list[tuple[int, int, int, list[Encoded]]]], config: TrainConfig,
           stage: str, progress: bool, validation: dict[int, list[Encoded]] | None = None) -> pd.DataFrame:
    """Run ``steps``: each a list of (slot, epoch, user step number, mini-batch).

    ``validation`` (slot -> rows): select each slot's best epoch on them (see the module doc).
    """
    bank.requires_grad_(True)
    optimizer = BankAdamW(bank, config.lr, config.weight_decay, config.betas, config.eps)
    records = []
    with iv.attached(loaded.model):
        selector = None
        if validation is not None:
            selector = _Selector(loaded, iv, bank, validation, config, stage)
            selector.evaluate([(slot, 0, -1) for slot in range(bank.n_slots)])
        ends = _epoch_ends(steps) if selector is not None else {}
        for t, step in enumerate(tqdm(steps, desc=stage, disable=not progress, leave=False)):
            rows = [(slot, enc) for slot, _, _, batch in step for enc in batch]
            optimizer.zero_grad()
            losses, _ = _run_step(loaded, iv, rows, bank.n_slots, config.rows_per_forward)
            norms = optimizer.clip_per_slot(config.max_grad_norm)
            active = torch.zeros(bank.n_slots, dtype=torch.bool, device=bank.device)
            active[[slot for slot, _, _, _ in step]] = True
            optimizer.step(active)
            for slot, epoch, number, batch in step:
                records.append({"stage": stage, "split": "train", "user_id": bank.keys[slot], "epoch": epoch,
                                "step": number, "n_rows": len(batch), "loss": float(losses[slot]),
                                "grad_norm": float(norms[slot]), "selected": False})
            if t in ends:
                selector.evaluate(ends[t])
        if selector is not None:
            selector.restore()
            records += selector.records
    optimizer.zero_grad()
    bank.requires_grad_(False)
    return pd.DataFrame.from_records(records, columns=CURVE_COLUMNS)


def train_collective(loaded: LoadedModel, bank: InterventionBank, examples: Sequence[Encoded],
                     config: TrainConfig, *, progress: bool = False) -> pd.DataFrame:
    """Stage 1: train the one-slot ``bank`` in place on all ``examples``; returns the training curve."""
    if bank.n_slots != 1:
        raise ConfigError("the collective intervention is a bank with one slot")
    if not examples:
        raise ConfigError("stage 1 has no training examples")
    schedule = user_steps(bank.keys[0], list(examples), config)
    steps = [[(0, epoch, i, batch)] for i, (epoch, batch) in enumerate(schedule)]
    iv = Intervention(collective=bank)
    log.info("stage 1: %d examples, %d steps", len(examples), len(steps))
    return _train(loaded, iv, bank, steps, config, "collective", progress)


def _check_users(personal: InterventionBank, examples: dict[str, Sequence[Encoded]]) -> None:
    missing = [u for u in personal.keys if not examples.get(u)]
    if missing:
        raise ConfigError(f"no training examples for user(s) {missing[:3]} of the personal bank")


def train_personal(loaded: LoadedModel, collective: InterventionBank, personal: InterventionBank,
                   examples: dict[str, Sequence[Encoded]], config: TrainConfig, *, stacking: str = "sum",
                   validation: dict[str, Sequence[Encoded]] | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Stage 2, all users together: train ``personal`` in place (one slot per user), ``collective`` frozen.

    ``validation`` (user -> rows, optional): each user keeps its best epoch on its rows
    (users without rows keep their last epoch).
    """
    _check_users(personal, examples)
    collective.requires_grad_(False)
    schedules = [user_steps(key, list(examples[key]), config) for key in personal.keys]
    n_steps = max((len(s) for s in schedules), default=0)
    steps = [[(slot, *sched[t][:1], t, sched[t][1]) for slot, sched in enumerate(schedules) if t < len(sched)]
             for t in range(n_steps)]
    iv = Intervention(collective=collective, personal=personal, stacking=stacking)
    log.info("stage 2: %d users, %d batched steps", personal.n_slots, n_steps)
    by_slot = None
    if validation is not None:
        unknown = sorted(set(validation) - set(personal.keys))
        if unknown:
            raise ConfigError(f"validation rows for user(s) {unknown[:3]} who are not in the personal bank")
        by_slot = {slot: list(validation.get(key, ())) for slot, key in enumerate(personal.keys)}
    return _train(loaded, iv, personal, steps, config, "personal", progress, by_slot)


def train_personal_sequential(loaded: LoadedModel, collective: InterventionBank, personal: InterventionBank,
                              examples: dict[str, Sequence[Encoded]], config: TrainConfig, *,
                              stacking: str = "sum", validation: dict[str, Sequence[Encoded]] | None = None,
                              progress: bool = False) -> tuple[InterventionBank, pd.DataFrame]:
    """Stage 2 the way the reference implementations do it: one user after another.

    Each user gets a one-slot bank copied from its slot of ``personal`` and its own optimiser.
    Returns the trained bank (slots in ``personal``'s order) and the curve. Used as the
    baseline of the batched trainer (tests, benchmark).
    """
    _check_users(personal, examples)
    banks, curves = [], []
    for key in tqdm(personal.keys, desc="personal (sequential)", disable=not progress, leave=False):
        single = personal.subset([key])
        mine = None if validation is None else {key: validation.get(key, ())}
        curves.append(train_personal(loaded, collective, single, {key: examples[key]}, config, stacking=stacking,
                                     validation=mine))
        banks.append(single)
    return InterventionBank.concat(banks).to(personal.device), pd.concat(curves, ignore_index=True)


def curve_summary(curve: pd.DataFrame) -> dict:
    """First and last epoch mean training loss of a curve, and the selection summary if any."""
    val = curve[curve["split"] == "val"] if "split" in curve else curve.iloc[:0]
    curve = curve[curve["split"] == "train"] if "split" in curve else curve
    if curve.empty:
        return {"steps": 0}
    selection = {}
    if not val.empty:
        kept = val[val["selected"].astype(bool)]
        first = val[val["epoch"] == 0]
        last = val.loc[val.groupby("user_id")["epoch"].idxmax()]
        selection = {"selection": {
            "users": int(val["user_id"].nunique()),
            "kept_epoch_counts": {str(k): int(v) for k, v in kept["epoch"].value_counts().sort_index().items()},
            "val_loss_start": float(first["loss"].mean()), "val_loss_last": float(last["loss"].mean()),
            "val_loss_kept": float(kept["loss"].mean())}}
    by_epoch = curve.groupby("epoch")["loss"].mean()
    return {"steps": int(curve["step"].nunique()), "first_epoch_loss": float(by_epoch.iloc[0]),
            "last_epoch_loss": float(by_epoch.iloc[-1]),
            "first_step_loss": float(curve[curve["step"] == curve["step"].min()]["loss"].mean()),
            "last_step_loss": float(curve[curve["step"] == curve["step"].max()]["loss"].mean()), **selection}


def describe_selection(selection: dict) -> str:
    """One line of ``curve_summary``'s ``selection``: the epochs kept and the validation losses."""
    kept = ", ".join(f"{n} at epoch {epoch}" for epoch, n in selection["kept_epoch_counts"].items())
    return (f"kept {kept} (epoch 0 = the initialisation); validation loss {selection['val_loss_start']:.3f} "
            f"before stage 2, {selection['val_loss_last']:.3f} after the last epoch, "
            f"{selection['val_loss_kept']:.3f} as kept")

