"""The ``steer`` stage: the causal checks of ``perfit_probe.evaluation.steer`` on a fitted run.

Writes ``RUN/steer/``: ``steer.csv`` (tidy rows), ``swap_pairs.csv`` (one row per pair),
``ablation_random.csv`` (one row per random subspace) and ``personal_subspace.safetensors``
(when the ablation ran), and ``verdicts.md`` (one line per check, for the report); the figures
of ``perfit_probe.plotting.steer_figures`` in ``RUN/figures/``; every row of ``steer.csv`` in
``metrics.json`` under ``steer`` (keys ``experiment/setting/metric``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from safetensors.torch import save_file

from perfit_probe._io import atomic_write_text
from perfit_probe.config import SteerConfig
from perfit_probe.evaluation.steer import SteerResult, steer_checks
from perfit_probe.models import LoadedModel
from perfit_probe.plotting.steer_figures import save_steer_figures
from perfit_probe.stages.fitted import load_fitted_run
from perfit_probe.stages.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SteerStageResult:
    """What the steer stage wrote."""

    run: RunDir
    """The run directory."""
    steer_dir: Path
    """``RUN/steer``."""
    checks: SteerResult
    """The checks' rows, swap pairs, ablated subspace and verdicts."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``steer``."""


def run(config: SteerConfig, run_dir: Path | str, loaded: LoadedModel, *,
        progress: bool = False, figures: bool = True) -> SteerStageResult:
    """Run the configured checks on the fitted run ``run_dir``; write ``RUN/steer/`` and, with
    ``figures``, ``RUN/figures/steer_*.png``. The prompts use the fit's chat setting unless
    ``config.chat`` is set."""
    run = RunDir.open(run_dir)
    fitted = load_fitted_run(run.path, loaded)
    if "chat" in fitted.prompt_options and config.chat is None:
        config = replace(config, chat=fitted.prompt_options["chat"])
    run.add_stage("steer", config)
    with run.timed("steer"):
        result = steer_checks(loaded, fitted.task, fitted.split, fitted.perfit, config, fitted.personal,
                              progress=progress)
    out = run.sub("steer")
    atomic_write_text(out / "steer.csv", result.rows.to_csv(index=False))
    atomic_write_text(out / "swap_pairs.csv", result.pairs.to_csv(index=False))
    if result.basis is not None:
        save_file({"basis": result.basis.contiguous()}, str(out / "personal_subspace.safetensors"))
        atomic_write_text(out / "ablation_random.csv", result.random_subspaces.to_csv(index=False))
    atomic_write_text(out / "verdicts.md", "".join(f"- {line}\n" for line in result.verdicts))
    for line in result.verdicts:
        log.info("%s", line)
    summary = {f"{r.experiment}/{r.setting}/{r.metric}": r.value for r in result.rows.itertuples()}
    run.add_metrics("steer", summary)
    if figures:
        save_steer_figures(out, run.sub("figures"))
    return SteerStageResult(run, out, result, summary)
