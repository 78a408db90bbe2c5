"""Evaluating a fitted run against baselines on the held-out queries of its test users.

Methods compared (one row each in ``RUN/eval/results.csv`` and ``results.md``):

- ``base``: the frozen base model on the plain prompt (no personalization);
- ``rag``: the base model on the enhanced prompt (``k`` retrieved history items);
- ``stage1``: the collective (stage-1) intervention on the plain prompt;
- ``perfit``: collective + the user's personal intervention (stage 1 + 2) on the plain prompt;
- ``lora``: a rank-8 q/v LoRA per user, directly on the base model, trained on the user's
  history examples (see ``perfit_probe.evaluation.lora``);
- ``lora_task``: OPPU's shared *task* LoRA alone, trained on the train users' queries (PerFit
  stage 1's data) and merged into the base, the LoRA analogue of ``stage1``;
- ``steer_delta``: training-free, each user's measured delta vector added to the plain prompt's
  hidden state at the last token (``_steer_delta_predictions``; needs the run's cached deltas);
- ``oppu``: full OPPU, the per-user LoRA trained and applied on top of that task model, the
  LoRA analogue of ``perfit``;
- equal budgets: with ``val_per_user`` > 0 (by default the fit's, so PerFit and the LoRAs
  select alike) the per-user LoRAs of ``lora`` and ``oppu`` hold out exactly the examples
  PerFit's stage 2 holds out (``perfit_probe.interventions.fit.validation_indices``), train on
  the rest, and keep the epoch with the lowest loss on them (epoch 0: a zero adapter, i.e. the
  base model for ``lora``, the task model for ``oppu``); the epochs are in ``lora_selection.csv``;
- the trivial, model-free baselines of ``perfit_probe.evaluation.baselines`` (``user_mean``,
  ``user_median``, ``user_majority``, ``global_majority``, ``global_mean``, ``bm25_top1``),
  each where it applies to the task kind (the others are skipped with a log line).

``write_results`` adds the uncertainty of every metric (``perfit_probe.evaluation.uncertainty``):
cluster-bootstrap intervals over test users (``uncertainty.csv``) and paired differences from
PerFit and from the best trivial baseline with permutation p-values (``differences.csv``).

Each row carries the LaMP metrics of the task kind, the trainable parameters per user, the
shared trainable parameters, and the training time per user where known.

Decoding (``decoding``): ``constrained`` predicts ``argmax_label log p(label | prompt)`` over
the task's label set (``score_labels``); ``greedy`` generates ``max_new_tokens`` tokens
greedily and the metrics parse the text. ``auto`` (default) is constrained for
classification and rating tasks, since a 135M model rarely formats a free answer reliably,
and greedy for generation tasks. For rating tasks the constrained path also reports
``expected``, the rating expected under the label distribution ``softmax(log p(label))``
(an extra column; the LaMP metrics are on the discrete prediction). Ratings are read with
LaMP's rule (``float`` of the answer) for ``mae``/``rmse``; ``mae_lenient``/``rmse_lenient``
(first number in the answer) are diagnostics beside them (``perfit_probe.evaluation.metrics``).

All users' held-out prompts go through the model in mixed batches, each row with its own
user's intervention (``perfit_probe.interventions.generate``).

Re-evaluating a subset of the methods (``--methods base``) *merges* into ``RUN/eval/``: the
rows of the other methods stay, as long as they were evaluated on the same basis (the same
fit and model, and the same settings that every method shares, ``evaluation.json``). Results
of another basis cannot share a table: when they hold methods not evaluated now, they are
moved (never deleted) to ``RUN/eval/superseded/<time>/``, with a warning naming what differs.
``RUN/eval/checksums.json`` holds the SHA-256 of every result and prediction file, verified
before old results are merged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from perfit_probe.data.prompts import build_examples, continuation
from perfit_probe.data.profile_examples import PersonalData, personal_examples
from perfit_probe.data.records import Example, TaskData, TaskSpec
from perfit_probe.data.splits import Split, heldout_user
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ArtifactError, ConfigError
from perfit_probe.evaluation.baselines import BASELINES, baseline_predictions, skip_reason
from perfit_probe.evaluation.lora import LoraBaseline, LoraBaselineConfig, UserLora
from perfit_probe.evaluation.metrics import DIAGNOSTICS, HIGHER_IS_BETTER, METRICS, score_task, write_predictions
from perfit_probe.evaluation.uncertainty import (
    UncertaintyConfig,
    describe_uncertainty,
    differences_table,
    evaluation_uncertainty,
    with_intervals,
)
from perfit_probe.interventions import PerFit, generate, score_labels
from perfit_probe.interventions.fit import validation_indices
from perfit_probe.interventions.steering import AdditiveSteering, steered_label_logprobs
from perfit_probe.models import LoadedModel
from perfit_probe.sites import parse_site

log = logging.getLogger(__name__)

METHODS = ("base", "rag", "stage1", "perfit", "lora", "lora_task", "oppu", "steer_delta", *BASELINES)
DECODINGS = ("auto", "constrained", "greedy")
_METHOD_SETUP = {  # method -> (prompt variant, intervention stage)
    "base": ("plain", "none"),
    "rag": ("enhanced", "none"),
    "stage1": ("plain", "collective"),
    "perfit": ("plain", "perfit"),
    "lora": ("plain", "none"),
    "lora_task": ("plain", "none"),
    "oppu": ("plain", "none"),
    "steer_delta": ("plain", "none"),
    **{name: ("plain", "none") for name in BASELINES},
}


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``perfit-probe evaluate``."""

    methods: tuple[str, ...] = METHODS
    """Methods to evaluate, a subset of ``METHODS``."""
    decoding: str = "auto"
    """``auto``, ``constrained`` or ``greedy`` (see the module docstring)."""
    max_new_tokens: int = 16
    """Tokens generated per prompt by greedy decoding."""
    batch_size: int = 16
    """Prompts per forward pass."""
    k: int | None = None
    """History items retrieved into the ``rag`` prompt (None: the fit's value; 4 without one)."""
    retriever: str | None = None
    """Retriever of the ``rag`` prompt (None: the fit's; ``bm25`` without one)."""
    chat: bool | None = None
    """Wrap prompts in the chat template (None: as the fit did, else when the tokenizer has one)."""
    use_stemmer: bool = False
    """ROUGE with the Porter stemmer (LaMP's evaluation uses none)."""
    max_prompt_tokens: int | None = None
    """Longer prompts keep their last tokens."""
    lora: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    """Hyperparameters of the per-user LoRA adapters (``lora`` and ``oppu``)."""
    lora_task: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    """Hyperparameters of OPPU's shared task LoRA (``lora_task`` and ``oppu``)."""
    seed: int = 0
    """Seed of prompt construction and LoRA training (and of the bootstrap in ``write_results``)."""
    val_per_user: int | None = None
    """Model selection of the per-user LoRAs (``lora``, ``oppu``): this many of each test user's
    history examples are held out and the user keeps its best epoch on them, epoch 0 being no
    adapter (None: the fit's ``val_per_user`` in ``run_evaluate``, so the budgets match; 0: no
    selection, every example trained on for all epochs)."""
    val_seed: int | None = None
    """Seed of the held-out choice (None: the fit's seed in ``run_evaluate``, else ``seed``)."""
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    """Bootstrap and permutation settings of the intervals and differences in ``write_results``."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        if self.decoding not in DECODINGS:
            raise ConfigError(f"unknown decoding {self.decoding!r}: choose from {DECODINGS}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"batch_size ({self.batch_size}) and max_new_tokens ({self.max_new_tokens}) "
                              "must be at least 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or None)")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k={self.k} must be >= 1: the rag prompt needs history items")
        if self.val_per_user is not None and self.val_per_user < 0:
            raise ConfigError(f"val_per_user={self.val_per_user} must be >= 0 (0: no model selection)")

    def with_fit(self, recorded: dict) -> EvalConfig:
        """Prompt options left unset (None) take the fit's ``recorded`` values, then the defaults.

        An option set explicitly always wins, even when it equals a default.
        """
        fallback = {"k": 4, "retriever": "bm25", "chat": None}
        values = {key: getattr(self, key) if getattr(self, key) is not None else recorded.get(key, default)
                  for key, default in fallback.items()}
        return replace(self, **values)


@dataclass
class Predictions:
    """Predictions for a list of prompts."""

    outputs: list[str]
    """Predicted output text (a label under constrained decoding)."""
    label_logprobs: torch.Tensor | None = None
    """``[n, n_labels]`` log p(label | prompt), constrained decoding only."""
    expected: np.ndarray | None = None
    """Expected rating under ``softmax(label_logprobs)``, rating tasks only."""


@dataclass
class EvalResult:
    """What ``evaluate_methods`` returns."""

    table: pd.DataFrame
    """One row per method: costs and metrics."""
    predictions: pd.DataFrame
    """One row per method x held-out query: user, query, gold, output (, expected)."""
    lora_adapters: dict[str, UserLora] = field(default_factory=dict)
    """The trained LoRA adapter of each test user (when ``lora`` ran)."""
    lora_selection: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Model selection of the per-user LoRAs (``selection_frame``), ``lora`` and ``oppu`` rows."""
    wall_s: dict[str, float] = field(default_factory=dict)
    """Seconds spent per method (training included); ``lora_task+oppu`` when they ran together."""


def resolve_decoding(decoding: str, kind: str) -> str:
    """``auto`` -> constrained for classification/rating, greedy for generation."""
    if decoding not in DECODINGS:
        raise ConfigError(f"unknown decoding {decoding!r}: choose from {DECODINGS}")
    if decoding == "auto":
        return "greedy" if kind == "generation" else "constrained"
    if decoding == "constrained" and kind == "generation":
        raise ConfigError("constrained decoding needs a label set: use --decoding greedy for generation tasks")
    return decoding


def label_values(spec: TaskSpec) -> np.ndarray | None:
    """Numeric values of a rating task's labels (None for other kinds)."""
    if spec.kind != "rating" or not spec.labels:
        return None
    try:
        return np.array([float(label) for label in spec.labels])
    except ValueError:
        raise ConfigError(f"rating labels of {spec.name} are not numbers: {spec.labels}") from None


def predict(
    loaded: LoadedModel,
    prompts: Sequence[str],
    spec: TaskSpec,
    *,
    decoding: str = "auto",
    chat: bool | None = None,
    perfit: PerFit | None = None,
    user_ids: Sequence[str] | None = None,
    stage: str = "none",
    scale: float | Sequence[float] = 1.0,
    ablate_basis: torch.Tensor | None = None,
    ablate_mode: str = "hidden",
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_prompt_tokens: int | None = None,
) -> Predictions:
    """Predict outputs for ``prompts``, each row with its user's intervention at ``stage``."""
    mode = resolve_decoding(decoding, spec.kind)
    common = dict(perfit=perfit, user_ids=user_ids, stage=stage, scale=scale, batch_size=batch_size,
                  ablate_basis=ablate_basis, ablate_mode=ablate_mode, max_prompt_tokens=max_prompt_tokens)
    if mode == "greedy":
        return Predictions(generate(loaded, prompts, max_new_tokens=max_new_tokens, **common))
    if not spec.labels:
        raise ConfigError(f"task {spec.name} has no label set for constrained decoding")
    labels = [continuation(label, loaded.tokenizer, chat) for label in spec.labels]
    logp = score_labels(loaded, prompts, labels, **common)
    outputs = [spec.labels[i] for i in logp.argmax(1).tolist()]
    values = label_values(spec)
    expected = None if values is None else logp.softmax(1).double().numpy() @ values
    return Predictions(outputs, logp, expected)


def _metrics_row(spec: TaskSpec, golds: list[str], preds: Predictions, config: EvalConfig) -> dict:
    row = score_task(spec.kind, golds, preds.outputs, spec.labels, use_stemmer=config.use_stemmer)
    if preds.expected is not None:
        gold_v = np.array([float(g) for g in golds])
        row["expected_mae"] = float(np.abs(preds.expected - gold_v).mean())
    return row


def heldout_examples(task: TaskData, split: Split, tokenizer, *, variants: Sequence[str], k: int,
                     retriever: str, chat: bool | None, seed: int) -> list[Example]:
    """Prompts of every test user's held-out queries (history: the user's profile minus held-out items)."""
    users = [heldout_user(task.user(u), split) for u in split.test_users]
    return build_examples(users, task.spec, tokenizer, variants=variants, k=k, retriever=retriever,
                          chat=chat, seed=seed)


def evaluate_methods(
    loaded: LoadedModel,
    task: TaskData,
    split: Split,
    perfit: PerFit | None,
    config: EvalConfig = EvalConfig(),
    *,
    personal: PersonalData = PersonalData(),
    deltas: Deltas | None = None,
    perfit_costs: dict | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``config.methods`` on the held-out queries of ``split``'s test users.

    ``personal``: what the per-user LoRAs train on (the fit's stage-2 data, ``RUN/perfit/task.json``).
    ``deltas``: the run's delta vectors, for the training-free ``steer_delta`` method.
    ``perfit_costs`` may give ``stage1_train_s`` and ``stage2_train_s_per_user`` (from the fit)
    for the cost columns. Methods needing a fit are skipped (with a warning) when ``perfit``
    is None or has no personal bank.
    """
    config = config.with_fit({})
    mode = resolve_decoding(config.decoding, task.spec.kind)
    by_variant, golds = _heldout_by_variant(loaded, task, split, config)
    run = _Evaluation(loaded, task, split, perfit, config, personal, deltas, perfit_costs or {}, progress,
                      dict(decoding=mode, chat=config.chat, batch_size=config.batch_size,
                           max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_prompt_tokens))
    rows, pred_frames, adapters, selections = [], [], {}, []
    oppu, wall_s = {}, {}
    if {"lora_task", "oppu"} & set(config.methods):
        t0 = time.perf_counter()
        oppu = _oppu_predictions(loaded, task, split, by_variant["plain"], config, run.opts, progress,
                                 personal, per_user="oppu" in config.methods)
        wall_s["+".join(oppu)] = time.perf_counter() - t0
    for method in tqdm(config.methods, desc="evaluate", unit="method", disable=not progress):
        t0 = time.perf_counter()
        chosen = by_variant[_METHOD_SETUP[method][0]]
        done = run.method(method, chosen, oppu)
        if done is None:
            continue
        preds, info, user_adapters = done
        if method == "lora":
            adapters = user_adapters
        if method == "lora" or user_adapters:
            selections.append(selection_frame(method, user_adapters))
        row = {**info, "decoding": info.get("decoding", mode), "n_users": len(split.test_users),
               "n_queries": len(chosen), **_metrics_row(task.spec, golds, preds, config)}
        rows.append(row)
        pred_frames.append(_prediction_frame(method, chosen, golds, preds))
        if method not in oppu:
            wall_s[method] = time.perf_counter() - t0
        log.info("%s: %s", method, {m: round(row[m], 4) for m in METRICS[task.spec.kind]})
    table = pd.DataFrame.from_records(rows)
    return EvalResult(table, pd.concat(pred_frames, ignore_index=True) if pred_frames else pd.DataFrame(),
                      adapters, pd.concat(selections, ignore_index=True) if selections else pd.DataFrame(),
                      wall_s)


def _heldout_by_variant(loaded: LoadedModel, task: TaskData, split: Split,
                        config: EvalConfig) -> tuple[dict[str, list[Example]], list[str]]:
    """The held-out examples by prompt variant (``plain``, and ``enhanced`` when ``rag`` is
    evaluated) and their gold outputs; ``ConfigError`` when there is none or a gold is missing."""
    variants = ("plain", "enhanced") if "rag" in config.methods else ("plain",)
    examples = heldout_examples(task, split, loaded.tokenizer, variants=variants, k=config.k,
                                retriever=config.retriever, chat=config.chat, seed=config.seed)
    if not examples:
        raise ConfigError("no held-out queries to evaluate: check the split's test users")
    by_variant = {v: [e for e in examples if e.variant == v] for v in variants}
    golds = [e.target for e in by_variant["plain"]]
    if any(g is None for g in golds):
        raise ConfigError("held-out queries without gold outputs cannot be scored")
    return by_variant, golds


def _prediction_frame(method: str, chosen: list[Example], golds: list[str], preds: Predictions) -> pd.DataFrame:
    """One row per held-out query of ``method``: user, query, gold, output (, expected)."""
    frame = pd.DataFrame({"method": method, "user_id": [e.user_id for e in chosen],
                          "query_id": [e.query_id for e in chosen], "gold": golds,
                          "output": preds.outputs})
    if preds.expected is not None:
        frame["expected"] = preds.expected
    return frame


@dataclass
class _Evaluation:
    """``evaluate_methods``' arguments, resolved: what predicting with one method needs."""

    loaded: LoadedModel
    """The model."""
    task: TaskData
    """The task."""
    split: Split
    """Train/test users and held-out queries."""
    perfit: PerFit | None
    """The fit, if any."""
    config: EvalConfig
    """Evaluation options (``with_fit`` applied)."""
    personal: PersonalData
    """What the per-user LoRAs train on."""
    deltas: Deltas | None
    """Delta vectors for ``steer_delta``."""
    costs: dict
    """The fit's training times."""
    progress: bool
    """Progress bars."""
    opts: dict
    """Keyword arguments of ``predict`` (decoding, chat, batch sizes, prompt cap)."""

    def method(self, method: str, chosen: list[Example],
               oppu: dict) -> tuple[Predictions, dict, dict[str, UserLora]] | None:
        """Predictions of ``method`` on ``chosen``, its cost columns and its per-user LoRAs;
        None (logged) when it cannot run. ``oppu``: ``_oppu_predictions``' results."""
        variant, stage = _METHOD_SETUP[method]
        perfit = self.perfit
        if stage != "none" and perfit is None:
            log.warning("skipping %s: the run has no fitted interventions", method)
            return None
        if stage == "perfit" and perfit.personal is None:
            log.warning("skipping perfit: the fit has no personal (stage 2) bank")
            return None
        info = {"method": method, "params_per_user": 0, "shared_params": 0, "train_s_per_user": 0.0}
        if method == "lora":
            preds, adapters, info = _lora_predictions(self.loaded, self.task, self.split, chosen, self.config,
                                                      self.opts, self.progress, self.personal)
            return preds, info, adapters
        if method in oppu:
            return oppu[method]
        if method == "steer_delta":
            preds = _steer_delta_predictions(self.loaded, self.task.spec, chosen, perfit, self.deltas, self.config)
            return None if preds is None else (preds, info, {})
        if method in BASELINES:
            preds = _baseline_predictions(method, self.task, self.split, chosen, self.personal)
            return None if preds is None else (preds, {**info, "decoding": "none"}, {})
        preds = predict(self.loaded, [e.prompt for e in chosen], self.task.spec, perfit=perfit,
                        user_ids=[e.user_id for e in chosen], stage=stage, **self.opts)
        if method in ("stage1", "perfit"):
            info["shared_params"] = perfit.collective.spec.params_per_slot()
            info["train_s_shared"] = self.costs.get("stage1_train_s", float("nan"))
        if method == "perfit":
            info["params_per_user"] = perfit.personal.spec.params_per_slot()
            info["train_s_per_user"] = self.costs.get("stage2_train_s_per_user", float("nan"))
        return preds, info, {}


def _fit_on(baseline: LoraBaseline, key: str, examples: list[Example], config: EvalConfig, *,
            seed: int, validation: Sequence[Example] = (), progress: bool = False,
            desc: str | None = None) -> UserLora:
    """A LoRA adapter trained on ``examples`` (prompt -> gold continuation), its epoch chosen
    on ``validation`` (the same form) when given."""
    tok = baseline.loaded.tokenizer
    return baseline.fit_user(key, [e.prompt for e in examples],
                             [continuation(e.target, tok, config.chat) for e in examples], seed=seed,
                             val_prompts=[e.prompt for e in validation],
                             val_targets=[continuation(e.target, tok, config.chat) for e in validation],
                             progress=progress, desc=desc)


def _lora_predictions(loaded, task, split, chosen, config, opts, progress, personal, desc="LoRA per user"):
    """Train one LoRA per test user on its personal examples (as PerFit's stage 2), predict its held-out queries.

    With ``config.val_per_user`` > 0 the examples PerFit's stage 2 validates on
    (``validation_indices`` with ``config.val_seed``) are held out and pick the user's epoch.
    """
    history = personal_examples(loaded.tokenizer, task, split, split.test_users, personal, k=config.k,
                                retriever=config.retriever, chat=config.chat, seed=config.seed)
    baseline = LoraBaseline(loaded, config.lora)
    n_val = config.val_per_user or 0
    val_seed = config.seed if config.val_seed is None else config.val_seed
    outputs: dict[tuple[str, str], tuple[str, float | None]] = {}
    adapters = {}
    for i, uid in enumerate(tqdm(split.test_users, desc=desc, disable=not progress)):
        examples = history[uid]
        held = set(validation_indices(uid, len(examples), n_val, val_seed))
        adapter = _fit_on(baseline, uid, [e for j, e in enumerate(examples) if j not in held], config,
                          seed=config.seed + i, validation=[e for j, e in enumerate(examples) if j in held])
        adapters[uid] = adapter
        mine = [e for e in chosen if e.user_id == uid]
        with baseline.applied(adapter) as adapted:
            preds = predict(adapted, [e.prompt for e in mine], task.spec, stage="none", **opts)
        for j, e in enumerate(mine):
            outputs[(uid, e.query_id)] = (preds.outputs[j], None if preds.expected is None else preds.expected[j])
    ordered = [outputs[(e.user_id, e.query_id)] for e in chosen]
    has_expected = ordered[0][1] is not None
    preds = Predictions([o for o, _ in ordered], None,
                        np.array([x for _, x in ordered]) if has_expected else None)
    info = {"method": "lora",
            "params_per_user": int(np.mean([a.n_trainable for a in adapters.values()])),
            "shared_params": 0,
            "train_s_per_user": float(np.mean([a.train_s for a in adapters.values()]))}
    return preds, adapters, info


def _oppu_predictions(loaded, task, split, chosen, config, opts, progress, personal, *, per_user: bool) -> dict:
    """OPPU: a task LoRA on the train users' queries, merged; then (``per_user``) one LoRA per
    test user on top. Returns ``{"lora_task": (preds, info, {}), "oppu": (preds, info, user adapters)}``."""
    users = [task.user(u) for u in split.train_users]
    train = build_examples(users, task.spec, loaded.tokenizer, variants=("plain",), chat=config.chat,
                           seed=config.seed)
    if not train:
        raise ConfigError("OPPU's task LoRA needs train users with queries")
    shared = LoraBaseline(loaded, config.lora_task)
    log.info("OPPU task LoRA: %d examples of %d train users", len(train), len(users))
    adapter = _fit_on(shared, "task", train, config, seed=config.seed + 10_000, progress=progress,
                      desc="OPPU task LoRA")
    out = {}
    with shared.merged(adapter) as task_model:
        preds = predict(task_model, [e.prompt for e in chosen], task.spec, stage="none", **opts)
        out["lora_task"] = (preds, {"method": "lora_task", "params_per_user": 0,
                                    "shared_params": adapter.n_trainable, "train_s_per_user": 0.0,
                                    "train_s_shared": adapter.train_s}, {})
        if per_user:
            preds, user_adapters, info = _lora_predictions(task_model, task, split, chosen, config, opts, progress,
                                                           personal, desc="OPPU per user")
            out["oppu"] = (preds, {**info, "method": "oppu", "shared_params": adapter.n_trainable,
                                   "train_s_shared": adapter.train_s}, user_adapters)
    return out


SELECTION_COLUMNS = ["method", "user_id", "epoch", "n_train", "n_val", "val_loss", "selected"]
"""Columns of ``lora_selection.csv``."""


def selection_frame(method: str, adapters: dict[str, UserLora]) -> pd.DataFrame:
    """The per-user LoRAs' model selection: one row per user x measured epoch (0 = no adapter)
    with its validation loss and ``selected`` on the kept one; a user without validation
    examples has one row, its last epoch, with no loss."""
    rows = []
    for uid, adapter in adapters.items():
        common = {"method": method, "user_id": uid, "n_train": adapter.n_examples, "n_val": adapter.n_val}
        if not adapter.val_losses:
            rows.append({**common, "epoch": adapter.epoch, "val_loss": float("nan"), "selected": True})
        for epoch, loss in enumerate(adapter.val_losses):
            rows.append({**common, "epoch": epoch, "val_loss": loss, "selected": epoch == adapter.epoch})
    return pd.DataFrame.from_records(rows, columns=SELECTION_COLUMNS)


def selection_summary(frame: pd.DataFrame) -> dict:
    """Per method: users, users with validation, the kept epochs' counts and mean, and the mean
    validation loss before training, after the last epoch and as kept (users with validation)."""
    out = {}
    for method, rows in frame.groupby("method", sort=False):
        kept = rows[rows["selected"].astype(bool)]
        validated = rows[rows["n_val"] > 0]
        summary = {"users": int(rows["user_id"].nunique()), "users_validated": int(validated["user_id"].nunique()),
                   "val_per_user": int(rows["n_val"].max()),
                   "kept_epoch_counts": {str(k): int(v) for k, v in kept["epoch"].value_counts().sort_index().items()},
                   "kept_epoch_mean": float(kept["epoch"].mean())}
        if not validated.empty:
            last = validated.loc[validated.groupby("user_id")["epoch"].idxmax()]
            summary.update(val_loss_start=float(validated[validated["epoch"] == 0]["val_loss"].mean()),
                           val_loss_last=float(last["val_loss"].mean()),
                           val_loss_kept=float(kept[kept["n_val"] > 0]["val_loss"].mean()))
        out[str(method)] = summary
    return out


def describe_lora_selection(summary: dict) -> str:
    """The ``results.md`` section on the per-user LoRAs' model selection."""
    lines = ["## Model selection of the per-user LoRAs (equal budgets)", ""]
    for method, s in summary.items():
        kept = ", ".join(f"{n} at epoch {epoch}" for epoch, n in s["kept_epoch_counts"].items())
        if not s["users_validated"]:
            lines.append(f"- {method}: no model selection (val_per_user 0): every user trained on all its "
                         f"history examples for all epochs ({kept}).")
            continue
        start = "the base model" if method == "lora" else "the task model"
        lines.append(f"- {method}: {s['val_per_user']} history examples per user held out (the ones PerFit's "
                     f"stage 2 holds out), {s['users_validated']} of {s['users']} users selected; kept {kept} "
                     f"(epoch 0 = no adapter, i.e. {start}); validation loss {s['val_loss_start']:.3f} before "
                     f"training, {s['val_loss_last']:.3f} after the last epoch, {s['val_loss_kept']:.3f} as kept.")
    return "\n".join(lines + ["", "Per user and epoch: `lora_selection.csv`.", ""])


def write_lora_selection(result: EvalResult, directory: Path) -> dict:
    """Write ``lora_selection.csv`` and add its section to ``results.md`` (after ``write_results``);
    returns ``selection_summary`` (empty when no per-user LoRA ran)."""
    from perfit_probe.rundir import atomic_write_text

    if result.lora_selection.empty:
        return {}
    directory = Path(directory)
    atomic_write_text(directory / "lora_selection.csv", result.lora_selection.to_csv(index=False))
    summary = selection_summary(result.lora_selection)
    results = directory / "results.md"
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    atomic_write_text(results, text.rstrip("\n") + "\n\n" + describe_lora_selection(summary))
    return summary


def steer_site(perfit: PerFit | None, deltas: Deltas) -> str | None:
    """Where ``steer_delta`` adds a user's delta: the first of the fit's sites that the cache
    measured (the first cached site without a fit); None when no fit site was cached."""
    sites = [site.name for site in perfit.collective.spec.sites] if perfit is not None else deltas.sites
    return next((s for s in sites if s in deltas.sites), None)


def _steer_delta_predictions(loaded: LoadedModel, spec: TaskSpec, chosen: list[Example], perfit: PerFit | None,
                             deltas: Deltas | None, config: EvalConfig) -> Predictions | None:
    """Training-free personalization: each row's user's delta vector (``RUN/deltas``: mean hidden state
    with the history minus without it) added at the last prompt token of the plain prompt, at the
    first of the fit's sites that the cache measured (any cached site without a fit), scale 1.
    Zero trained parameters, one forward per query; None (logged) where it cannot run."""
    if deltas is None or not spec.labels:
        log.info("skipping steer_delta: %s", "no cached deltas in the run" if deltas is None else "no label set")
        return None
    site = steer_site(perfit, deltas)
    users = sorted({e.user_id for e in chosen})
    missing = [u for u in users if u not in deltas.user_ids]
    if site is None or missing:
        log.info("skipping steer_delta: %s", f"users {missing[:3]} have no delta" if missing else
                 "none of the fit's sites was cached")
        return None
    vectors = torch.stack([deltas.enhanced[deltas.user_ids.index(u), deltas.site_index(site)] for u in users])
    steering = AdditiveSteering(vectors.unsqueeze(1), [parse_site(site)])
    labels = [continuation(label, loaded.tokenizer, config.chat) for label in spec.labels]
    logp = steered_label_logprobs(loaded, [e.prompt for e in chosen], labels, steering=steering,
                                  slots=[users.index(e.user_id) for e in chosen], scales=1.0,
                                  batch_size=config.batch_size, max_prompt_tokens=config.max_prompt_tokens)
    values = label_values(spec)
    expected = None if values is None else logp.softmax(1).double().numpy() @ values
    return Predictions([spec.labels[i] for i in logp.argmax(1).tolist()], logp, expected)


def _baseline_predictions(method: str, task: TaskData, split: Split, chosen: list[Example],
                          personal: PersonalData) -> Predictions | None:
    """A trivial baseline's predictions for ``chosen``; None (logged) where it does not apply."""
    reason = skip_reason(method, task.spec)
    if reason is not None:
        log.info("skipping %s: %s", method, reason)
        return None
    return baseline_predictions(method, task, split, [(e.user_id, e.query_id) for e in chosen], personal)


# ---------------------------------------------------------------------- writing
def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-markdown table of ``frame`` (floats rounded), without extra dependencies."""
    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "n/a" if np.isnan(value) else f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


RESULT_FILES = ("results.csv", "predictions.csv", "evaluation.json")
"""Files of ``RUN/eval/`` that a later evaluation reads back to merge (with ``predictions/*.json``)."""
_PER_METHOD_FIELDS = ("methods", "batch_size", "lora", "lora_task", "uncertainty", "val_per_user", "val_seed")
"""``EvalConfig`` fields that do not change the other methods' numbers (not part of the basis)."""


def evaluation_basis(config: EvalConfig, **identity) -> dict:
    """What must be equal for two evaluations' rows to sit in one table: the ``EvalConfig``
    fields every method shares, plus ``identity`` (the fit and model fingerprints)."""
    from perfit_probe.rundir import to_jsonable

    shared = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _PER_METHOD_FIELDS}
    return to_jsonable({**shared, **identity})


def _method_order(methods) -> list[str]:
    """``methods`` in the order of ``METHODS`` (names not in it last, in their given order)."""
    known = {m: i for i, m in enumerate(METHODS)}
    unique = list(dict.fromkeys(methods))
    return sorted(unique, key=lambda m: (known.get(m, len(known)), unique.index(m)))


def verify_results(directory: Path) -> None:
    """``ArtifactError`` when a result or prediction file in ``directory`` differs from its checksum."""
    from perfit_probe.rundir import verify_checksums

    if (Path(directory) / "results.csv").is_file():
        verify_checksums(directory, error=ArtifactError, fix=f"delete {directory} and evaluate every method again")


def _set_aside(directory: Path) -> Path:
    """Move the result files of ``directory`` into ``directory/superseded/<UTC time>/``; return it."""
    import shutil
    from datetime import datetime, timezone

    target = directory / "superseded" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    target.mkdir(parents=True)
    for name in (*RESULT_FILES, "results.md", "checksums.json", "predictions", "uncertainty.csv",
                 "differences.csv", "lora_selection.csv"):
        if (directory / name).exists():
            shutil.move(directory / name, target / name)
    return target


def _read_previous(directory: Path, basis: dict | None, methods=()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results and predictions already in ``directory`` that share ``basis`` (verified).

    Empty frames when there are none or when they come from another basis; in that case, if
    they hold methods other than ``methods`` (those evaluated now), they are moved aside
    (``_set_aside``) with a warning. ``ArtifactError`` when a result file is corrupt.
    """
    from perfit_probe.rundir import read_json

    empty = pd.DataFrame(), pd.DataFrame()
    if not (directory / "results.csv").is_file():
        return empty
    verify_results(directory)
    fix = f"delete {directory} and evaluate every method again"
    try:
        table = pd.read_csv(directory / "results.csv", dtype={"method": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read the earlier results in {directory} ({exc}): {fix}".splitlines()[0]) from None
    previous = read_json(directory / "evaluation.json") if (directory / "evaluation.json").is_file() else {}
    old = previous.get("basis") or {}
    if basis is None or old != basis:
        held = [str(m) for m in table.get("method", pd.Series(dtype=str))]
        if set(held) - set(methods):  # rows that this evaluation does not replace: keep them aside
            differ = sorted(k for k in set(old) | set(basis or {}) if old.get(k) != (basis or {}).get(k))
            where = _set_aside(directory)
            log.warning("%s held results of %s evaluated with another %s: moved them to %s (they cannot share "
                        "a table with these)", directory, ", ".join(held), ", ".join(differ) or "basis", where)
        return empty
    try:
        text = {c: str for c in ("method", "user_id", "query_id", "gold", "output")}
        predictions = pd.read_csv(directory / "predictions.csv", dtype=text, keep_default_na=False,
                                  na_values={"expected": ["", "nan", "NaN"]})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read the earlier results in {directory} ({exc}): {fix}".splitlines()[0]) from None
    if "expected" in predictions.columns:
        predictions["expected"] = pd.to_numeric(predictions["expected"])
    return table, predictions


def write_results(result: EvalResult, directory: Path, spec: TaskSpec, basis: dict | None = None, *,
                  config: EvalConfig | None = None) -> pd.DataFrame:
    """Write ``results.csv``, ``results.md``, ``predictions.csv``, LaMP-format ``predictions/{method}.json``,
    the bootstrap intervals ``uncertainty.csv`` and the paired differences ``differences.csv``.

    Results already in ``directory`` for other methods are kept when they were made on the same
    ``basis`` (see ``evaluation_basis``; ``None``: never merge), and moved to
    ``superseded/<time>/`` otherwise; the intervals and differences are computed on the merged
    predictions. ``config`` gives the scoring options (``use_stemmer``), the ``uncertainty``
    settings and the bootstrap's ``seed`` (default: ``EvalConfig()``). Returns the merged table.
    """
    from perfit_probe.rundir import atomic_write_text, write_checksums, write_json

    config = config or EvalConfig()
    directory = Path(directory)
    new_methods = set(result.table["method"]) if not result.table.empty else set()
    old_table, old_predictions = _read_previous(directory, basis, new_methods)
    kept = old_table[~old_table["method"].isin(new_methods)] if not old_table.empty else old_table
    table = pd.concat([kept, result.table], ignore_index=True) if not kept.empty else result.table.copy()
    order = _method_order(table["method"]) if not table.empty else []
    table = table.set_index("method").loc[order].reset_index() if order else table
    predictions = result.predictions
    if not old_predictions.empty:
        kept_p = old_predictions[old_predictions["method"].isin(set(order) - new_methods)]
        predictions = pd.concat([kept_p, predictions], ignore_index=True)
    if not predictions.empty:
        rank = {m: i for i, m in enumerate(order)}
        predictions = predictions.sort_values("method", key=lambda c: c.map(rank), kind="stable")
        predictions = predictions.reset_index(drop=True)

    pred_dir = directory / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for stale in pred_dir.glob("*.json"):
        if stale.stem != "golds" and stale.stem not in order:
            stale.unlink()
    atomic_write_text(directory / "results.csv", table.to_csv(index=False))
    atomic_write_text(directory / "predictions.csv", predictions.to_csv(index=False))
    uncertainty = evaluation_uncertainty(predictions, spec.kind, spec.labels,
                                         np.random.default_rng(config.seed), config.uncertainty,
                                         use_stemmer=config.use_stemmer)
    atomic_write_text(directory / "uncertainty.csv", uncertainty.intervals.to_csv(index=False))
    atomic_write_text(directory / "differences.csv", uncertainty.differences.to_csv(index=False))
    metrics = [m for m in METRICS[spec.kind] if m in table.columns]
    diagnostics = [m for m in DIAGNOSTICS[spec.kind] if m in table.columns]
    cols = ["method", *metrics, *diagnostics, "params_per_user", "shared_params", "train_s_per_user",
            "n_queries", "decoding"]
    cols = [c for c in cols if c in table.columns]
    note = f"; diagnostics beside them: {', '.join(diagnostics)}" if diagnostics else ""
    shown = with_intervals(table[cols], uncertainty.intervals) if not table.empty else table[cols]
    text = (f"# Evaluation on {spec.name} ({spec.kind})\n\nHeld-out queries of the test users; "
            f"metrics as LaMP defines them ({', '.join(metrics)}){note}. {describe_uncertainty(uncertainty)}\n\n"
            + markdown_table(shown))
    if not uncertainty.differences.empty:
        diffs = uncertainty.differences[uncertainty.differences.metric.isin(metrics)]
        text += ("\n## Differences from PerFit and from the best trivial baseline\n\n"
                 f"d = metric(method) - metric(vs), {config.uncertainty.level:.0%} paired bootstrap interval, "
                 "permutation p-value (two-sided)"
                 + "".join(f"; {m}: {'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better" for m in metrics)
                 + ".\n\n" + markdown_table(differences_table(diffs)))
    atomic_write_text(directory / "results.md", text)
    written = []
    if not predictions.empty:
        gold = predictions[predictions["method"] == predictions["method"].iloc[0]]
        write_predictions(pred_dir / "golds.json", spec.name, _lamp_ids(gold), list(gold["gold"]))
        written.append("predictions/golds.json")
        for method, frame in predictions.groupby("method", sort=False):
            write_predictions(pred_dir / f"{method}.json", spec.name,
                              _lamp_ids(frame), list(frame["output"]), meta={"method": method})
            written.append(f"predictions/{method}.json")
    write_json(directory / "evaluation.json", {"basis": basis, "methods": order})
    (directory / "checksums.json").unlink(missing_ok=True)  # the files above replace every entry
    write_checksums(directory, [*RESULT_FILES, *written])
    return table


def _lamp_ids(frame: pd.DataFrame) -> list[str]:
    """Query ids (LaMP's are unique); ``user/query`` when a task reuses query ids across users."""
    ids = [str(q) for q in frame["query_id"]]
    if len(set(ids)) == len(ids):
        return ids
    return [f"{u}/{q}" for u, q in zip(frame["user_id"], frame["query_id"])]


# ---------------------------------------------------------------------- run directories
@dataclass
class FittedRun:
    """What evaluation and steering read from a fitted run directory."""

    task: TaskData
    """The task, reloaded with the fit's load options (``RUN/perfit/task.json``)."""
    split: Split
    """Train/test users and held-out queries (``RUN/perfit/split.json``)."""
    perfit: PerFit
    """The fitted banks (``RUN/perfit/stage1``, ``RUN/perfit/bank``)."""
    prompt_options: dict
    """``k``, ``retriever``, ``chat`` of the fit's prompts."""
    personal: PersonalData
    """What the fit's stage 2 trained on (the per-user LoRA baselines train on the same)."""
    costs: dict
    """``stage1_train_s`` and ``stage2_train_s_per_user`` when the fit recorded them."""


_LOAD_KEYS = {"name": ("name", "task"), "path": ("path", "task_path"), "outputs": ("outputs", "task_outputs"),
              "n_users": ("n_users",), "seed": ("seed",), "max_queries": ("max_queries",)}


def _first(mapping: dict, keys: Sequence[str]):
    for key in keys:
        if key in mapping and not isinstance(mapping[key], dict):
            return mapping[key]
    return None


def task_load_options(data: dict) -> tuple[dict, dict]:
    """``load_task`` keyword arguments and prompt options from a fit's ``task.json``.

    Accepts a flat mapping (``task``/``name``, ``task_path``/``path``, ``n_users``, ``k``, ...)
    or one nested under ``load``/``task`` and ``prompts``.
    """
    load = data.get("load") if isinstance(data.get("load"), dict) else \
        data.get("task") if isinstance(data.get("task"), dict) else data
    prompts = data.get("prompts") if isinstance(data.get("prompts"), dict) else data
    kwargs = {key: _first(load, names) for key, names in _LOAD_KEYS.items()}
    if not kwargs["name"]:
        raise ConfigError("task.json of the fit names no task: re-run `perfit-probe fit`")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    options = {k: prompts[k] for k in ("k", "retriever", "chat") if k in prompts}
    return kwargs, options


def _fit_costs(run_dir: Path, n_users: int) -> dict:
    """Training times the fit recorded in ``metrics.json`` (keys looked up leniently)."""
    from perfit_probe.rundir import RunDir

    metrics = RunDir(run_dir).metrics()
    fit = metrics.get("fit", {}) if isinstance(metrics.get("fit"), dict) else {}
    timings = metrics.get("timings", {})
    out = {}
    for key, names in (("stage1_train_s", ("stage1_train_s", "stage1_s", "collective_s")),
                       ("stage2_train_s", ("stage2_train_s", "stage2_s", "personal_s"))):
        value = _first(fit, names)
        if value is None:
            value = _first(timings, names)
        if value is not None:
            out[key] = float(value)
    per_user = _first(fit, ("stage2_train_s_per_user",))
    if per_user is not None:
        out["stage2_train_s_per_user"] = float(per_user)
    elif "stage2_train_s" in out and n_users:
        out["stage2_train_s_per_user"] = out["stage2_train_s"] / n_users
    return out


def load_fitted_run(run_dir: Path, loaded: LoadedModel) -> FittedRun:
    """Reload the task, split and fitted interventions of ``run_dir`` (checked against the model)."""
    from perfit_probe.data import load_task
    from perfit_probe.interventions.artifact import load_perfit, perfit_dir
    from perfit_probe.rundir import read_json, verify_checksums

    directory = perfit_dir(Path(run_dir))
    verify_checksums(directory, ("split.json", "task.json"), error=ArtifactError,
                     fix="refit with `perfit-probe fit --force`")
    recorded = read_json(directory / "task.json")
    kwargs, options = task_load_options(recorded)
    personal = PersonalData(**recorded["personal"]) if isinstance(recorded.get("personal"), dict) else \
        PersonalData(source="queries")
    name = kwargs.pop("name")
    task = load_task(name, **kwargs)
    split = Split.load(directory / "split.json")
    perfit = load_perfit(directory, loaded)
    return FittedRun(task, split, perfit, options, personal, _fit_costs(Path(run_dir), len(split.test_users)))


def fit_selection(run_dir: Path) -> tuple[int, int]:
    """The fit's stage-2 model selection: ``(val_per_user, seed)`` from ``RUN/perfit/params.json``
    (the fit's config), the seed else from ``task.json``; ``(0, 0)`` for fits that recorded none."""
    from perfit_probe.interventions.artifact import perfit_dir
    from perfit_probe.rundir import read_json

    directory = perfit_dir(Path(run_dir))
    params = directory / "params.json"
    recorded = read_json(params).get("config", {}) if params.is_file() else {}
    seed = recorded.get("seed")
    if seed is None and (directory / "task.json").is_file():
        seed = (read_json(directory / "task.json").get("load") or {}).get("seed")
    return int(recorded.get("val_per_user") or 0), int(seed or 0)


def run_evaluate(run_dir: Path, loaded: LoadedModel, config: EvalConfig = EvalConfig(), *,
                 progress: bool = False, figures: bool = True) -> EvalResult:
    """``perfit-probe evaluate``: evaluate a fitted run and write ``RUN/eval/`` (and, with
    ``figures``, the interval figures of ``perfit_probe.plotting.eval_figures`` in ``RUN/figures/``).

    The ``rag`` prompts use the fit's ``k``/``retriever``/``chat`` where ``config`` leaves them
    unset (None); an explicit value always wins. So do the per-user LoRAs' ``val_per_user`` and
    ``val_seed`` (the fit's stage-2 selection, ``fit_selection``): by default they hold out the
    examples PerFit validated on and keep their best epoch, recorded in ``eval/lora_selection.csv``,
    a section of ``results.md`` and ``lora_selection`` in ``metrics.json``.
    """
    from perfit_probe.rundir import RunDir

    run = RunDir.open(run_dir)
    fitted = load_fitted_run(run.path, loaded)
    config = config.with_fit(fitted.prompt_options)
    val_per_user, val_seed = fit_selection(run.path)
    if config.val_per_user is not None and config.val_per_user != val_per_user:
        log.warning("LoRA model selection on %d examples per user, PerFit's stage 2 on %d: the budgets differ",
                    config.val_per_user, val_per_user)
    config = replace(config, val_per_user=val_per_user if config.val_per_user is None else config.val_per_user,
                     val_seed=val_seed if config.val_seed is None else config.val_seed)
    basis = evaluation_basis(config, fit=fit_fingerprint(run.path), model=loaded.identity.fingerprint)
    verify_results(run.path / "eval")  # a corrupt earlier result fails now, not after the work
    run.add_stage("evaluate", config)
    with run.timed("evaluate"):
        deltas = Deltas.load(run.path / "deltas") if (run.path / "deltas").is_dir() else None
        result = evaluate_methods(loaded, fitted.task, fitted.split, fitted.perfit, config,
                                  personal=fitted.personal, deltas=deltas, perfit_costs=fitted.costs,
                                  progress=progress)
    table = write_results(result, run.sub("eval"), fitted.task.spec, basis, config=config)
    selection = write_lora_selection(result, run.sub("eval"))
    if selection:
        run.add_metrics("lora_selection", selection)
    if figures:
        from perfit_probe.plotting.eval_figures import save_eval_figures

        save_eval_figures(run.sub("eval"), run.sub("figures"))
    metrics = [m for m in METRICS[fitted.task.spec.kind] if m in table.columns]
    run.add_metrics("evaluate", {row["method"]: {m: row[m] for m in metrics} for row in table.to_dict("records")})
    run.add_metrics("evaluate_wall_s", result.wall_s)
    return result


def fit_fingerprint(run_dir: Path) -> str:
    """SHA-256 prefix over the fit's split, task and banks: changes whenever the fit does."""
    from perfit_probe.interventions.artifact import TENSOR_FILE, perfit_dir
    from perfit_probe.rundir import file_sha256

    directory = perfit_dir(Path(run_dir))
    digest = hashlib.sha256()
    for rel in ("split.json", "task.json", f"stage1/{TENSOR_FILE}", f"bank/{TENSOR_FILE}"):
        path = directory / rel
        digest.update(f"{rel}:{file_sha256(path) if path.is_file() else '-'}\n".encode())
    return digest.hexdigest()[:16]
