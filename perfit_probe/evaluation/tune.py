"""A random search of PerFit's and the LoRA baselines' settings, scored on validation data only.

``run_search`` draws the trials of ``perfit_probe.evaluation.search_space`` and runs them in
the fit's two stages:

- **stage 1** (PerFit's collective intervention, trained by the fit's own ``fit_collective``;
  OPPU's task LoRA): each trial trains on the train users' queries *minus*
  ``stage1_val_queries`` held out of each train user (``carve_validation``: a seeded choice),
  and is scored on those held-out queries of the *train* users;
- **stage 2** (PerFit's personal interventions on the chosen stage 1, trained by the fit's own
  ``fit_personal``; OPPU's per-user LoRA on the chosen task LoRA): each trial trains on every
  test user's personal examples (``personal_examples``) minus its ``val_per_user`` validation
  rows (``fit.validation_indices``: the rows PerFit's per-user epoch selection and the LoRA
  baselines' selection use), each user keeping its best epoch on them as in ``fit`` and
  ``evaluate``, and is scored on those rows (as plain prompts, as the evaluation prompts them).

Every searched method gets ``n_trials`` trials per stage. A trial's score is the task's
headline metric (``METRICS[kind][0]``: MAE, accuracy, ROUGE-1) of predictions decoded as the
evaluation decodes them (``EvalConfig``), with the validation loss beside it
(``validation_losses``: per user, the mean next-token cross-entropy of its validation
targets; averaged over users). A stage keeps the trial with the best metric, ties broken by
the lower loss, then by the earlier trial (``select_by = "loss"``: the loss first).

**The test users' evaluation queries are never read**: before anything else the task is
``sealed_task``: each test user is replaced by ``history_user`` (its held-out queries and
their profile items removed, reading only their ids), and only the sealed task is searched.

Caveats, stated where the results are written: stage-2 trials sit on the chosen stage-1 trial,
trained without the held-out train queries (the final fit trains stage 1 on all of them); the
stage-2 validation rows both pick each user's epoch and score the trial, for PerFit and the
LoRAs alike, so stage-2 scores are optimistic.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from perfit_probe.config import EvalConfig, FitConfig, LoraBaselineConfig, TuneConfig
from perfit_probe.data.profile_examples import personal_examples
from perfit_probe.data.prompts import build_examples, continuation
from perfit_probe.data.records import Example, TaskData
from perfit_probe.data.splits import Split, heldout_user, history_user, stable_rank
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.evaluate import predict
from perfit_probe.evaluation.lora import LoraBaseline, UserLora
from perfit_probe.evaluation.metrics import HIGHER_IS_BETTER, METRICS, score_task
from perfit_probe.evaluation.search_space import draw, layer_choices
from perfit_probe.interventions import PerFit
from perfit_probe.interventions.batching import Encoded, collate, continuation_logprobs, encode
from perfit_probe.interventions.fit import bank_specs, fit_collective, fit_personal, validation_split
from perfit_probe.interventions.modules import InterventionBank
from perfit_probe.models import LoadedModel

log = logging.getLogger(__name__)

TRIAL_COLUMNS = ["method", "stage", "trial", "lr", "epochs", "rank", "layers", "positions", "metric", "value",
                 "val_loss", "n_val", "n_users", "seed", "chosen"]
"""Columns of ``TuneResult.frame()`` (``RUN/tune/trials.csv``)."""

_FIELDS = {("perfit", "stage1"): {"lr": "lr1", "epochs": "epochs1", "rank": "collective_rank",
                                  "layers": "layers", "positions": "positions"},
           ("perfit", "stage2"): {"lr": "lr2", "epochs": "epochs2", "rank": "personal_rank"},
           ("lora", "stage1"): {"lr": "lr", "epochs": "epochs", "rank": "rank"},
           ("lora", "stage2"): {"lr": "lr", "epochs": "epochs", "rank": "rank"}}
"""A trial's settings -> the config fields they set (``FitConfig``; ``LoraBaselineConfig`` of
``EvalConfig.lora_task`` in LoRA stage 1, of ``EvalConfig.lora`` in LoRA stage 2)."""


@dataclass(frozen=True)
class Trial:
    """One trial of the search: what it tried and how it scored on validation data."""

    method: str
    """``perfit`` or ``lora``."""
    stage: str
    """``stage1`` (collective / task LoRA) or ``stage2`` (personal / per-user LoRA)."""
    trial: int
    """Index of the trial in its stage (the order it was drawn and run)."""
    settings: dict[str, Any]
    """``lr``, ``epochs``, ``rank`` (and ``layers``, ``positions`` in PerFit's stage 1)."""
    metric: str
    """The task's headline metric."""
    value: float
    """The metric on the stage's validation rows."""
    val_loss: float
    """Mean over users of the mean target-token cross-entropy of their validation rows."""
    n_val: int
    """Validation rows scored."""
    n_users: int
    """Users whose rows were scored."""
    seed: int
    """Seed of the trial's training (the fit's, or the evaluation's for LoRA)."""


@dataclass
class TuneResult:
    """What ``run_search`` returns."""

    trials: list[Trial]
    """Every trial, in the order they ran."""
    chosen: dict[tuple[str, str], Trial]
    """(method, stage) -> the kept trial."""
    fit: FitConfig
    """The base fit config with PerFit's chosen settings."""
    evaluate: EvalConfig
    """The base evaluation config with the LoRA baselines' chosen settings."""
    stage1_validation: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Train user -> query ids held out to score the stage-1 trials."""
    stage2_validation: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Test user -> ids of the personal examples that scored the stage-2 trials."""
    wall_s: dict[str, float] = field(default_factory=dict)
    """``method/stage`` -> seconds its trials took (training and scoring)."""

    def frame(self) -> pd.DataFrame:
        """One row per trial (``TRIAL_COLUMNS``); ``chosen`` marks each stage's kept trial."""
        kept = {(t.method, t.stage, t.trial) for t in self.chosen.values()}
        rows = [{"method": t.method, "stage": t.stage, "trial": t.trial, "lr": t.settings["lr"],
                 "epochs": t.settings["epochs"], "rank": t.settings["rank"],
                 "layers": ",".join(map(str, t.settings["layers"])) if "layers" in t.settings else "",
                 "positions": t.settings.get("positions", ""), "metric": t.metric, "value": t.value,
                 "val_loss": t.val_loss, "n_val": t.n_val, "n_users": t.n_users, "seed": t.seed,
                 "chosen": (t.method, t.stage, t.trial) in kept} for t in self.trials]
        return pd.DataFrame.from_records(rows, columns=TRIAL_COLUMNS)


def config_fields(method: str, stage: str, settings: dict) -> dict:
    """A trial's settings under the names of the config fields they set (see ``_FIELDS``)."""
    return {_FIELDS[(method, stage)][k]: v for k, v in settings.items()}


# ---------------------------------------------------------------------- data
def sealed_task(task: TaskData, split: Split) -> TaskData:
    """``task`` with every test user reduced to ``history_user`` (held-out queries and their
    items gone): what the search may see. Reads only the held-out queries' ids and item ids."""
    test = set(split.test_users)
    users = [history_user(u, split) if u.id in test else u for u in task.users]
    return TaskData(task.spec, users, dict(task.report), task.ground_truth)


def carve_validation(task: TaskData, users: tuple[str, ...], n_val: int, seed: int) -> Split:
    """A split whose ``heldout`` holds, for each of ``users`` with 2 or more queries, the
    ``min(n_val, n - 1)`` queries first in a ``(seed, user, query)``-hashed order."""
    heldout = {}
    for uid in users:
        queries = task.user(uid).queries
        if len(queries) >= 2:
            ranked = sorted(queries, key=lambda q: stable_rank(f"tune/{uid}/{q.id}", seed))
            heldout[uid] = tuple(q.id for q in ranked[:min(n_val, len(queries) - 1)])
    if not heldout:
        raise ConfigError("stage-1 trials are scored on held-out queries of the train users: "
                          "give train users with 2 or more queries (--max-queries)")
    return Split((), tuple(users), heldout, seed)


@dataclass
class SearchData:
    """The data of a search, all from the sealed task."""

    sealed: TaskData
    """``sealed_task(task, split)``: what PerFit's stage-2 trials fit on (``fit_personal``)."""
    stage1: TaskData
    """``sealed`` with each train user's held-out queries and their items removed: what PerFit's
    stage-1 trials fit on (``fit_collective``)."""
    stage1_val: list[Example]
    """The held-out queries of the train users (plain prompts, as evaluated)."""
    lora_task_train: list[Example]
    """The train users' other queries, plain (what OPPU's task LoRA trains on)."""
    lora_train: dict[str, list[Example]]
    """Test user -> its personal examples minus its validation rows, plain (the per-user LoRAs)."""
    lora_val: dict[str, list[Example]]
    """Test user -> its validation rows, plain (what every stage-2 trial is scored on)."""
    carve: Split
    """The split of the train users' queries (``carve_validation``)."""


def search_data(loaded: LoadedModel, task: TaskData, split: Split, fit: FitConfig, n_val1: int) -> SearchData:
    """Build the data of the search from ``sealed_task(task, split)``."""
    sealed = sealed_task(task, split)
    carve = carve_validation(sealed, split.train_users, n_val1, fit.seed)
    tok, opts = loaded.tokenizer, dict(k=fit.k, retriever=fit.retriever, chat=fit.chat, seed=fit.seed)
    train = set(split.train_users)
    stage1 = TaskData(sealed.spec, [history_user(u, carve) if u.id in train else u for u in sealed.users],
                      dict(sealed.report), sealed.ground_truth)
    val_users = [heldout_user(sealed.user(u), carve) for u in carve.heldout]
    personal = personal_examples(tok, sealed, split, split.test_users, fit.personal(), variant="plain", **opts)
    lora_train, lora_val = validation_split(personal, fit.val_per_user, fit.seed)
    if not any(lora_val.values()):
        raise ConfigError("stage-2 trials are scored on each test user's validation rows: set val_per_user >= 1 "
                          "(--val-per-user) and give test users 2 or more personal examples")
    return SearchData(sealed, stage1, build_examples(val_users, sealed.spec, tok, variants=("plain",), **opts),
                      build_examples([stage1.user(u) for u in split.train_users], sealed.spec, tok,
                                     variants=("plain",), **opts), lora_train, lora_val, carve)


def _encode(loaded: LoadedModel, examples: list[Example], chat: bool | None,
            max_prompt_tokens: int | None) -> dict[str, list[Encoded]]:
    """Examples as rows by user: the prompt, ``continuation(target)`` and end-of-text."""
    out: dict[str, list[Encoded]] = {}
    for e in examples:
        target = continuation(e.target, loaded.tokenizer, chat)
        out.setdefault(e.user_id, []).append(encode(loaded.tokenizer, e.prompt, target, eos=True,
                                                    max_prompt_tokens=max_prompt_tokens))
    return out


# ---------------------------------------------------------------------- scoring
@torch.no_grad()
def validation_losses(loaded: LoadedModel, rows: dict[str, list[Encoded]], perfit: PerFit | None = None,
                      stage: str = "none", batch_size: int = 16) -> dict[str, float]:
    """User -> mean next-token cross-entropy over the target tokens of its ``rows``, under the
    model with ``perfit`` at ``stage`` (each row with its user's personal slot)."""
    iv = perfit.intervention(stage) if perfit is not None and stage != "none" else None
    pad, out = int(loaded.tokenizer.pad_token_id), {}
    with iv.attached(loaded.model) if iv is not None else nullcontext():
        for uid, user_rows in rows.items():
            nll, tokens = 0.0, 0.0
            for start in range(0, len(user_rows), batch_size):
                batch = collate(user_rows[start:start + batch_size], pad, padding_side="left", device=loaded.device)
                if iv is not None:
                    n = batch.input_ids.shape[0]
                    iv.set_batch(batch.prompt_mask, iv.personal.slot_indices([uid] * n) if iv.personal else None)
                logp, mask = continuation_logprobs(loaded.model, batch)
                if iv is not None:
                    iv.clear()
                nll -= float(logp.sum())
                tokens += float(mask.sum())
            out[uid] = nll / tokens
    return out


class _Scorer:
    """Scores predictions of validation examples with the task's headline metric."""

    def __init__(self, task: TaskData, evaluate: EvalConfig) -> None:
        self.spec, self.evaluate = task.spec, evaluate
        self.metric = METRICS[task.spec.kind][0]
        self.opts = dict(decoding=evaluate.decoding, chat=evaluate.chat, batch_size=evaluate.batch_size,
                         max_new_tokens=evaluate.max_new_tokens, max_prompt_tokens=evaluate.max_prompt_tokens)

    def outputs(self, loaded: LoadedModel, examples: list[Example], perfit: PerFit | None = None,
                stage: str = "none") -> list[str]:
        """Predicted outputs of ``examples`` (``evaluate.predict``)."""
        return predict(loaded, [e.prompt for e in examples], self.spec, perfit=perfit,
                       user_ids=[e.user_id for e in examples], stage=stage, **self.opts).outputs

    def value(self, examples: list[Example], outputs: list[str]) -> float:
        """The headline metric of ``outputs`` against the examples' targets."""
        row = score_task(self.spec.kind, [e.target for e in examples], outputs, self.spec.labels,
                         use_stemmer=self.evaluate.use_stemmer)
        return float(row[self.metric])

    def rows(self, loaded: LoadedModel, examples: list[Example]) -> dict[str, list[Encoded]]:
        """Validation examples encoded for ``validation_losses``."""
        return _encode(loaded, examples, self.evaluate.chat, self.evaluate.max_prompt_tokens)


def selection_key(trial: Trial, select_by: str) -> tuple:
    """Sort key of a trial, best first: the metric (oriented), then the loss, then the trial index
    (``select_by = "loss"``: the loss first). NaN sorts last."""
    sign = -1.0 if HIGHER_IS_BETTER[trial.metric] else 1.0
    metric = sign * trial.value if np.isfinite(trial.value) else float("inf")
    loss = trial.val_loss if np.isfinite(trial.val_loss) else float("inf")
    return (metric, loss, trial.trial) if select_by == "metric" else (loss, metric, trial.trial)


# ---------------------------------------------------------------------- trials
@dataclass
class _Outcome:
    """What a trial function returns: its scores and what a later stage builds on."""

    value: float
    val_loss: float
    n_val: int
    n_users: int
    seed: int
    state: Any = None


def _flat(by_user: dict[str, list[Example]], users: tuple[str, ...]) -> list[Example]:
    return [e for u in users for e in by_user.get(u, [])]


def _lora_config(base: LoraBaselineConfig, settings: dict) -> LoraBaselineConfig:
    """``base`` with a trial's lr, epochs and rank; ``alpha`` keeps ``base.alpha / base.rank``."""
    return replace(base, lr=settings["lr"], epochs=settings["epochs"], rank=settings["rank"],
                   alpha=base.alpha / base.rank * settings["rank"])


def _fit_lora(baseline: LoraBaseline, key: str, examples: list[Example], chat: bool | None, seed: int,
              validation: list[Example] = ()) -> UserLora:
    """A LoRA adapter on ``examples`` (prompt -> gold continuation), as the evaluation trains it."""
    tok = baseline.loaded.tokenizer
    return baseline.fit_user(key, [e.prompt for e in examples], [continuation(e.target, tok, chat) for e in examples],
                             seed=seed, val_prompts=[e.prompt for e in validation],
                             val_targets=[continuation(e.target, tok, chat) for e in validation])


class _Search:
    """The trials of one search: its data, the validation rows and the scorer."""

    def __init__(self, loaded: LoadedModel, task: TaskData, split: Split, data: SearchData, fit: FitConfig,
                 evaluate: EvalConfig, config: TuneConfig, progress: bool) -> None:
        self.loaded, self.split, self.data, self.fit, self.evaluate = loaded, split, data, fit, evaluate
        self.config, self.progress = config, progress
        self.wall_s: dict[str, float] = {}
        self.scorer = _Scorer(task, evaluate)
        self.val1 = data.stage1_val
        self.val2 = _flat(data.lora_val, split.test_users)
        self.score_rows1 = self.scorer.rows(loaded, self.val1)
        self.score_rows2 = self.scorer.rows(loaded, self.val2)

    def run_stage(self, method: str, stage: str, candidates: list[dict],
                  trial: Callable[[dict], _Outcome]) -> tuple[list[Trial], Trial, Any]:
        """Run ``trial`` on each candidate; returns the trials, the kept one and its state."""
        trials, best, best_state = [], None, None
        bar = tqdm(candidates, desc=f"tune {method} {stage}", unit="trial", disable=not self.progress)
        start = time.perf_counter()
        for index, settings in enumerate(bar):
            t0 = time.perf_counter()
            out = trial(settings)
            record = Trial(method, stage, index, dict(settings), self.scorer.metric, out.value, out.val_loss,
                           out.n_val, out.n_users, out.seed)
            trials.append(record)
            by = self.config.select_by
            if best is None or selection_key(record, by) < selection_key(best, by):
                best, best_state = record, out.state
            log.info("tune %s %s trial %d %s: %s %.4f, validation loss %.4f (%.1f s)", method, stage, index,
                     settings, record.metric, record.value, record.val_loss, time.perf_counter() - t0)
            bar.set_postfix({f"best {record.metric}": f"{best.value:.4f}"})
        self.wall_s[f"{method}/{stage}"] = time.perf_counter() - start
        return trials, best, best_state

    def _stage1_outcome(self, model: LoadedModel, perfit: PerFit | None, stage: str, seed: int,
                        state: Any) -> _Outcome:
        outputs = self.scorer.outputs(model, self.val1, perfit, stage)
        losses = validation_losses(model, self.score_rows1, perfit, stage, self.evaluate.batch_size)
        return _Outcome(self.scorer.value(self.val1, outputs), float(np.mean(list(losses.values()))),
                        len(self.val1), len(losses), seed, state)

    def perfit_stage1(self, settings: dict) -> _Outcome:
        """The fit's stage 1 (``fit_collective``) with ``settings`` on the train users' queries
        minus the held-out ones; scored on those."""
        cfg = replace(self.fit, **config_fields("perfit", "stage1", settings))
        spec1, _ = bank_specs(cfg, self.loaded)
        bank, _ = fit_collective(self.loaded, self.data.stage1, self.split, spec1, cfg)
        return self._stage1_outcome(self.loaded, PerFit(bank, None, cfg.stacking), "collective", cfg.seed, bank)

    def perfit_stage2(self, settings: dict, fit1: FitConfig, collective: InterventionBank) -> _Outcome:
        """The fit's stage 2 (``fit_personal``: each user keeping its best epoch on its validation
        rows) with ``settings`` on the chosen stage 1; scored on those rows."""
        cfg = replace(fit1, **config_fields("perfit", "stage2", settings))
        _, spec2 = bank_specs(cfg, self.loaded)
        personal, _ = fit_personal(self.loaded, self.data.sealed, self.split, list(self.split.test_users),
                                   collective, spec2, cfg)
        perfit = PerFit(collective, personal, cfg.stacking)
        outputs = self.scorer.outputs(self.loaded, self.val2, perfit, "perfit")
        losses = validation_losses(self.loaded, self.score_rows2, perfit, "perfit", self.evaluate.batch_size)
        return _Outcome(self.scorer.value(self.val2, outputs), float(np.mean(list(losses.values()))),
                        len(self.val2), len(losses), cfg.seed)

    def lora_stage1(self, settings: dict) -> _Outcome:
        """OPPU's task LoRA with ``settings`` on the train users' queries; scored on their held-out ones."""
        shared = LoraBaseline(self.loaded, _lora_config(self.evaluate.lora_task, settings))
        seed = self.evaluate.seed + 10_000  # the evaluation's seed of the task LoRA
        adapter = _fit_lora(shared, "task", self.data.lora_task_train, self.evaluate.chat, seed)
        with shared.merged(adapter) as model:
            return self._stage1_outcome(model, None, "none", seed, (shared, adapter))

    def lora_stage2(self, settings: dict, task_lora: tuple[LoraBaseline, UserLora] | None) -> _Outcome:
        """Per-user LoRAs with ``settings`` on the chosen task LoRA, each keeping its best epoch
        on the user's validation rows; scored on those rows."""
        cfg = _lora_config(self.evaluate.lora, settings)
        outputs, examples, losses = [], [], {}
        with task_lora[0].merged(task_lora[1]) if task_lora else nullcontext(self.loaded) as model:
            baseline = LoraBaseline(model, cfg)
            for i, uid in enumerate(self.split.test_users):
                train, val = self.data.lora_train.get(uid), self.data.lora_val.get(uid)
                if not (train and val):
                    continue
                adapter = _fit_lora(baseline, uid, train, self.evaluate.chat, self.evaluate.seed + i, val)
                with baseline.applied(adapter) as adapted:
                    outputs += self.scorer.outputs(adapted, val)
                    losses.update(validation_losses(adapted, {uid: self.score_rows2[uid]},
                                                    batch_size=self.evaluate.batch_size))
                examples += val
        return _Outcome(self.scorer.value(examples, outputs), float(np.mean(list(losses.values()))),
                        len(examples), len(losses), self.evaluate.seed)


# ---------------------------------------------------------------------- the search
def _seed(config: TuneConfig, fit: FitConfig) -> int:
    """Seed of the draw of the trials: ``sampler_seed``, else the fit's seed."""
    return fit.seed if config.sampler_seed is None else config.sampler_seed


def _perfit_choices(config: TuneConfig, fit: FitConfig, loaded: LoadedModel) -> list[dict]:
    """PerFit's stage-1 trials, each checked against the model (layers, ranks) before any training."""
    space = config.perfit
    candidates = draw({"lr": space.lrs, "epochs": space.epochs, "rank": space.collective_ranks,
                       "layers": layer_choices(space, fit.layers, loaded.n_layers), "positions": space.positions},
                      config.n_trials, _seed(config, fit), "perfit/stage1")
    for settings in candidates:
        cfg = replace(fit, **config_fields("perfit", "stage1", settings))
        if cfg.personal_init == "stage1":
            cfg = replace(cfg, personal_rank=cfg.collective_rank)
        cfg.validate()
        bank_specs(cfg, loaded)
    return candidates


def _personal_choices(config: TuneConfig, fit: FitConfig, collective_rank: int) -> list[dict]:
    """PerFit's stage-2 trials (``personal_init = "stage1"``: the personal rank is the collective one)."""
    space = config.perfit
    ranks = (collective_rank,) if fit.personal_init == "stage1" else space.personal_ranks
    return draw({"lr": space.lrs, "epochs": space.epochs, "rank": ranks}, config.n_trials, _seed(config, fit),
                "perfit/stage2")


def _lora_choices(config: TuneConfig, fit: FitConfig, stage: str) -> list[dict]:
    space = config.lora
    return draw({"lr": space.lrs, "epochs": space.epochs, "rank": space.ranks}, config.n_trials, _seed(config, fit),
                f"lora/{stage}")


def _search_perfit(search: _Search, config: TuneConfig, candidates: list[dict]) -> tuple[list[Trial], dict, FitConfig]:
    """PerFit's two stages; returns the trials, the kept ones and the fit config they make."""
    trials1, best1, collective = search.run_stage("perfit", "stage1", candidates, search.perfit_stage1)
    fit1 = replace(search.fit, **config_fields("perfit", "stage1", best1.settings))
    trials2, best2, _ = search.run_stage("perfit", "stage2", _personal_choices(config, fit1, fit1.collective_rank),
                                         lambda s: search.perfit_stage2(s, fit1, collective))
    fit2 = replace(fit1, **config_fields("perfit", "stage2", best2.settings))
    return trials1 + trials2, {("perfit", "stage1"): best1, ("perfit", "stage2"): best2}, fit2


def _search_lora(search: _Search, config: TuneConfig) -> tuple[list[Trial], dict, EvalConfig]:
    """OPPU's task LoRA, then its per-user LoRA on the kept one; returns the trials, the kept ones
    and the evaluation config they make."""
    trials1, best1, task_lora = search.run_stage("lora", "stage1", _lora_choices(config, search.fit, "stage1"),
                                                 search.lora_stage1)
    trials2, best2, _ = search.run_stage("lora", "stage2", _lora_choices(config, search.fit, "stage2"),
                                         lambda s: search.lora_stage2(s, task_lora))
    evaluate = replace(search.evaluate, lora_task=_lora_config(search.evaluate.lora_task, best1.settings),
                       lora=_lora_config(search.evaluate.lora, best2.settings))
    return trials1 + trials2, {("lora", "stage1"): best1, ("lora", "stage2"): best2}, evaluate


def run_search(loaded: LoadedModel, task: TaskData, split: Split, fit: FitConfig, config: TuneConfig, *,
               progress: bool = False) -> TuneResult:
    """The random search of ``config`` on ``task``/``split`` (see the module docstring).

    ``fit`` and ``config.evaluate`` are the base configs: what is not searched (prompts, batch
    sizes, ``val_per_user``, decoding, ...) comes from them. Every option and every trial's
    settings are checked (ranks against ``d_model``, layers, budget) before any training.
    """
    config.validate()
    fit.validate()
    config.check_model(loaded.d_model, loaded.n_layers)
    evaluate = config.evaluate.with_fit({"k": fit.k, "retriever": fit.retriever, "chat": fit.chat})
    perfit_candidates = _perfit_choices(config, fit, loaded) if "perfit" in config.searches else []
    if "perfit" in config.searches:
        _personal_choices(config, fit, fit.collective_rank)  # the budget fits stage 2 too
    if "lora" in config.searches:
        _lora_choices(config, fit, "stage1")
    data = search_data(loaded, task, split, fit, config.stage1_val_queries)
    search = _Search(loaded, task, split, data, fit, evaluate, config, progress)
    trials, chosen, tuned_fit, tuned_eval = [], {}, fit, evaluate
    if "perfit" in config.searches:
        found, kept, tuned_fit = _search_perfit(search, config, perfit_candidates)
        trials, chosen = trials + found, {**chosen, **kept}
    if "lora" in config.searches:
        found, kept, tuned_eval = _search_lora(search, config)
        trials, chosen = trials + found, {**chosen, **kept}
    return TuneResult(trials, chosen, tuned_fit, tuned_eval, dict(data.carve.heldout),
                      {u: tuple(e.query_id for e in rows) for u, rows in data.lora_val.items() if rows},
                      dict(search.wall_s))
