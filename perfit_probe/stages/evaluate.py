"""The ``evaluate`` stage: every method on the held-out queries of a fitted run's test users.

Runs ``perfit_probe.evaluation.evaluate.evaluate_methods`` on the task, split and banks of
``RUN/perfit/`` (``perfit_probe.stages.fitted``) and writes ``RUN/eval/``
(``perfit_probe.stages.eval_results``: results, predictions, intervals, differences, merged
with earlier evaluations of the same basis), the interval figures of
``perfit_probe.plotting.eval_figures`` in ``RUN/figures/``, and ``metrics.json`` under
``evaluate`` (the metrics of each method), ``evaluate_wall_s`` (seconds per method) and
``lora_selection`` (the per-user LoRAs' model selection).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from perfit_probe.config import EvalConfig
from perfit_probe.deltas import Deltas
from perfit_probe.evaluation.evaluate import EvalResult, evaluate_methods
from perfit_probe.evaluation.metrics import METRICS
from perfit_probe.models import LoadedModel
from perfit_probe.plotting.eval_figures import save_eval_figures
from perfit_probe.stages.eval_results import evaluation_basis, verify_results, write_lora_selection, write_results
from perfit_probe.stages.fitted import fit_fingerprint, fit_selection, load_fitted_run
from perfit_probe.stages.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateStageResult:
    """What the evaluate stage wrote."""

    run: RunDir
    """The run directory."""
    eval_dir: Path
    """``RUN/eval``: results, predictions, intervals and differences."""
    evaluation: EvalResult
    """This evaluation's rows and predictions (the methods evaluated now)."""
    table: pd.DataFrame
    """``results.csv``: these rows merged with the earlier ones of the same basis."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``evaluate``."""


def run(config: EvalConfig, run_dir: Path | str, loaded: LoadedModel, *,
        progress: bool = False, figures: bool = True) -> EvaluateStageResult:
    """Evaluate the fitted run ``run_dir`` with the model ``loaded``; write ``RUN/eval/`` (and,
    with ``figures``, ``RUN/figures/eval_*.png``).

    The ``rag`` prompts use the fit's ``k``/``retriever``/``chat`` where ``config`` leaves them
    unset (None); an explicit value always wins. So do the per-user LoRAs' ``val_per_user`` and
    ``val_seed`` (the fit's stage-2 selection, ``fit_selection``): by default they hold out the
    examples PerFit validated on and keep their best epoch, recorded in ``eval/lora_selection.csv``,
    a section of ``results.md`` and ``lora_selection`` in ``metrics.json``.
    """
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
        save_eval_figures(run.sub("eval"), run.sub("figures"))
    metrics = [m for m in METRICS[fitted.task.spec.kind] if m in table.columns]
    values = {row["method"]: {m: row[m] for m in metrics} for row in table.to_dict("records")}
    run.add_metrics("evaluate", values)
    run.add_metrics("evaluate_wall_s", result.wall_s)
    return EvaluateStageResult(run, run.path / "eval", result, table, values)
