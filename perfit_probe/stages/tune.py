"""The ``tune`` stage: a random search of PerFit's and the LoRA baselines' settings, on validation only.

Loads the task and split of the base ``FitConfig`` (as the fit stage does), runs
``perfit_probe.evaluation.tune.run_search`` (what is trained and scored on what: its
docstring) and writes ``RUN/tune/`` as a whole (``staged_dir``):

- ``trials.csv``: every trial (method, stage, settings, validation metric and loss, seed, chosen);
- ``chosen.json``: the kept trial of each stage, the tuned settings, the equivalent ``fit`` and
  ``evaluate`` flags, and how the trials were scored (``NOTES``);
- ``tuned.toml``: the tuned ``[fit]``, ``[evaluate.lora]`` and ``[evaluate.lora_task]`` keys, to
  merge into a pipeline config (``perfit-probe run``);
- ``validation.json``: the ids of every row the trials were scored on;

and ``metrics.json`` under ``tune`` (wall times, the kept trials' scores). With ``apply`` it
then runs the fit and evaluate stages on ``RUN`` with the tuned settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from perfit_probe._io import atomic_write_text, write_json
from perfit_probe._repro import seed_everything
from perfit_probe.data import load_task
from perfit_probe.data.splits import make_split
from perfit_probe.errors import ConfigError
from perfit_probe.config import FitConfig, LoraBaselineConfig, TuneConfig
from perfit_probe.evaluation.metrics import HIGHER_IS_BETTER
from perfit_probe.evaluation.tune import TuneResult, config_fields, run_search
from perfit_probe.models import LoadedModel
from perfit_probe.stages import evaluate as evaluate_stage
from perfit_probe.stages import fit as fit_stage
from perfit_probe.stages.rundir import RunDir, staged_dir

FILES = ("trials.csv", "chosen.json", "tuned.toml", "validation.json")
"""Files of ``RUN/tune/``."""

NOTES = (
    ("stage-1 trials (PerFit's collective, OPPU's task LoRA) train on the train users' queries minus the "
     "held-out ones and are scored on those held-out queries of the train users"),
    ("stage-2 trials (PerFit's personal, the per-user LoRA on the chosen task LoRA) train on each test user's "
     "personal examples minus its validation rows, keep each user's best epoch on them and are scored on them: "
     "stage-2 scores are optimistic, for every method alike"),
    "stage-2 trials sit on the chosen stage-1 trial, trained without the held-out train queries",
    "the test users' evaluation queries were never read",
    "the per-user LoRA settings are those of both the lora and the oppu methods",
)
"""What ``chosen.json`` says about how the trials were scored."""


@dataclass(frozen=True)
class TuneStageResult:
    """What the tune stage wrote."""

    run: RunDir
    """The run directory."""
    tune_dir: Path
    """``RUN/tune``: trials, choices, TOML fragment, validation ids."""
    search: TuneResult
    """The trials and the tuned configs."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``tune``."""
    fit: fit_stage.FitStageResult | None = None
    """With ``apply``: the fit with the tuned settings."""
    evaluation: evaluate_stage.EvaluateStageResult | None = None
    """With ``apply``: the evaluation with the tuned settings."""


def run(config: TuneConfig, run_dir: Path | str, loaded: LoadedModel, *, fit: FitConfig,
        progress: bool = False, overwrite: bool = False, apply: bool = False) -> TuneStageResult:
    """Search on the task of ``fit`` and write ``RUN/tune/``; with ``apply``, then fit and evaluate.

    ``fit`` and ``config.evaluate`` are the base configs (what is not searched). Every option is checked
    before any training; nothing is written before the search has finished. ``overwrite``:
    replace an earlier ``tune/`` (and, with ``apply``, the fit).
    """
    config.validate()
    fit.validate()
    out = Path(run_dir)
    check_out(out, loaded, overwrite, apply)
    task = load_task(fit.task, path=fit.task_path, outputs=fit.task_outputs, n_users=fit.n_users, seed=fit.seed,
                     max_queries=fit.max_queries)
    split = make_split(task, n_test_users=fit.n_test_users, test_fraction=fit.test_fraction,
                       n_heldout=fit.n_heldout, test_users_by=fit.test_users_by, seed=fit.seed)
    start = time.perf_counter()
    search = run_search(loaded, task, split, fit, config, progress=progress)
    run_ = _open_run(out, {"tune": config, "fit": fit}, fit.seed, loaded)
    metrics = write_tune(search, run_, config, time.perf_counter() - start)
    fitted = evaluated = None
    if apply:
        fitted = fit_stage.run(search.fit, run_.path, loaded, progress=progress, overwrite=overwrite)
        seed_everything(config.evaluate.seed)
        evaluated = evaluate_stage.run(search.evaluate, run_.path, loaded, progress=progress)
    return TuneStageResult(run_, run_.path / "tune", search, metrics, fitted, evaluated)


def check_out(out: Path, loaded: LoadedModel, overwrite: bool, apply: bool) -> None:
    """Refuse, before the search, an ``out`` whose results it would replace without ``overwrite``,
    that is not a run directory, or that was made with another model."""
    if (out / "tune").exists() and not overwrite:
        raise ConfigError(f"{out}/tune already holds a search: choose another --out or pass --force")
    if apply and (out / "perfit" / "stage1").exists() and not overwrite:
        raise ConfigError(f"{out}/perfit already holds a fit that --apply would replace: pass --force")
    if out.exists() and any(out.iterdir()) and not (out / "run.json").is_file():
        raise ConfigError(f"{out} exists and is not a run directory: choose another --out")
    fit_stage.check_run_model(out, loaded)


def _open_run(out: Path, config: dict, seed: int, loaded: LoadedModel) -> RunDir:
    """The run directory to write ``tune/`` into (new, or an existing run of the same model)."""
    if (out / "run.json").is_file():
        run_ = RunDir.open(out)
        run_.add_stage("tune", config)
        return run_
    return RunDir.create(out, "tune", config, seed, loaded.identity)


# ---------------------------------------------------------------------- what is written
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_fragment(tables: dict[str, dict]) -> str:
    """``tables`` (``"fit"``, ``"evaluate.lora"``, ...) as TOML tables of scalar and list values."""
    lines = ["# perfit-probe tune: the settings chosen on validation data (see chosen.json, trials.csv).",
             "# Merge these keys into the same tables of a pipeline config (`perfit-probe run`); the other",
             "# [fit] keys must be those of the tuning run (its run.json).", ""]
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def _lora_keys(config: LoraBaselineConfig) -> dict:
    return {"lr": config.lr, "epochs": config.epochs, "rank": config.rank, "alpha": config.alpha}


def tuned_tables(result: TuneResult) -> dict[str, dict]:
    """The tuned keys of ``[fit]``, ``[evaluate.lora]`` and ``[evaluate.lora_task]`` (the searched ones)."""
    tables = {}
    if ("perfit", "stage1") in result.chosen:
        keys = {**config_fields("perfit", "stage1", result.chosen[("perfit", "stage1")].settings),
                **config_fields("perfit", "stage2", result.chosen[("perfit", "stage2")].settings)}
        tables["fit"] = {**{k: getattr(result.fit, k) for k in keys}, "val_per_user": result.fit.val_per_user}
    if ("lora", "stage1") in result.chosen:
        tables["evaluate.lora"] = _lora_keys(result.evaluate.lora)
        tables["evaluate.lora_task"] = _lora_keys(result.evaluate.lora_task)
    return tables


def command_flags(result: TuneResult) -> dict[str, str]:
    """The tuned settings as ``perfit-probe fit`` and ``evaluate`` flags."""
    out = {}
    if ("perfit", "stage1") in result.chosen:
        f = result.fit
        out["fit"] = (f"--lr1 {f.lr1} --lr2 {f.lr2} --epochs1 {f.epochs1} --epochs2 {f.epochs2} "
                      f"--collective-rank {f.collective_rank} --personal-rank {f.personal_rank} "
                      f"--layers {','.join(map(str, f.layers))} --positions {f.positions} "
                      f"--val-per-user {f.val_per_user}")
    if ("lora", "stage1") in result.chosen:
        out["evaluate"] = " ".join(f"--{prefix}.{key} {value}"
                                   for prefix, config in (("lora", result.evaluate.lora),
                                                          ("lora-task", result.evaluate.lora_task))
                                   for key, value in _lora_keys(config).items())
    return out


def chosen_json(result: TuneResult, config: TuneConfig) -> dict:
    """What ``RUN/tune/chosen.json`` holds."""
    metric = result.trials[0].metric
    chosen: dict = {}
    for (method, stage), trial in result.chosen.items():
        chosen.setdefault(method, {})[stage] = {
            "trial": trial.trial, "settings": config_fields(method, stage, trial.settings), "value": trial.value,
            "val_loss": trial.val_loss, "n_val": trial.n_val, "n_users": trial.n_users}
    counts = {f"{m}/{s}": sum(1 for t in result.trials if (t.method, t.stage) == (m, s)) for m, s in result.chosen}
    return {"metric": metric, "higher_is_better": HIGHER_IS_BETTER[metric], "select_by": config.select_by,
            "n_trials": config.n_trials, "searches": list(config.searches),
            "sampler_seed": result.fit.seed if config.sampler_seed is None else config.sampler_seed,
            "trials_per_method_stage": counts, "chosen": chosen, "tuned": tuned_tables(result),
            "flags": command_flags(result), "notes": list(NOTES)}


def write_tune(result: TuneResult, run_: RunDir, config: TuneConfig, wall_s: float) -> dict:
    """Write ``RUN/tune/`` (as a whole) and the ``tune`` section of ``metrics.json``; returns the section."""
    with staged_dir(run_.path / "tune") as directory:
        atomic_write_text(directory / "trials.csv", result.frame().to_csv(index=False))
        write_json(directory / "chosen.json", chosen_json(result, config))
        atomic_write_text(directory / "tuned.toml", toml_fragment(tuned_tables(result)))
        write_json(directory / "validation.json", {
            "stage1": {"what": "held-out queries of the train users", "ids": result.stage1_validation},
            "stage2": {"what": "validation rows of each test user's personal examples (fit.validation_indices)",
                       "ids": result.stage2_validation}})
    metrics = {"wall_s": wall_s, "n_trials": config.n_trials, "stage_wall_s": result.wall_s,
               **{f"{m}/{s}": {"value": t.value, "val_loss": t.val_loss, "trial": t.trial}
                  for (m, s), t in result.chosen.items()}}
    run_.add_metrics("tune", metrics)
    return metrics
