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

The ``evaluate`` stage (``perfit_probe.stages.evaluate``) runs ``evaluate_methods`` on a fitted
run directory and writes ``RUN/eval/`` with the uncertainty of every metric
(``perfit_probe.stages.eval_results``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence, get_args

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from perfit_probe.config import Decoding, EvalConfig, Method, PersonalData
from perfit_probe.data.prompts import build_examples, continuation
from perfit_probe.data.profile_examples import personal_examples
from perfit_probe.data.records import Example, TaskData, TaskSpec
from perfit_probe.data.splits import Split, heldout_user
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.baselines import BASELINES, baseline_predictions, skip_reason
from perfit_probe.evaluation.lora import LoraBaseline, UserLora
from perfit_probe.evaluation.metrics import METRICS, score_task
from perfit_probe.interventions import PerFit, generate, score_labels
from perfit_probe.interventions.fit import validation_indices
from perfit_probe.interventions.steering import AdditiveSteering, steered_label_logprobs
from perfit_probe.models import LoadedModel
from perfit_probe.sites import parse_site

log = logging.getLogger(__name__)

METHODS = get_args(Method)
DECODINGS = get_args(Decoding)
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
    return label_predictions(spec, score_labels(loaded, prompts, labels, **common))


def label_predictions(spec: TaskSpec, logp: torch.Tensor) -> Predictions:
    """Predictions from label log-probabilities ``[n_prompts, n_labels]``: the most likely label,
    and for rating tasks the expected rating under the label distribution."""
    values = label_values(spec)
    expected = None if values is None else logp.softmax(1).double().numpy() @ values
    return Predictions([spec.labels[i] for i in logp.argmax(1).tolist()], logp, expected)


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
    return label_predictions(spec, logp)


def _baseline_predictions(method: str, task: TaskData, split: Split, chosen: list[Example],
                          personal: PersonalData) -> Predictions | None:
    """A trivial baseline's predictions for ``chosen``; None (logged) where it does not apply."""
    reason = skip_reason(method, task.spec)
    if reason is not None:
        log.info("skipping %s: %s", method, reason)
        return None
    return baseline_predictions(method, task, split, [(e.user_id, e.query_id) for e in chosen], personal)
