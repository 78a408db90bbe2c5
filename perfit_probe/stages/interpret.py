"""The ``interpret`` stage: ``perfit_probe.evaluation.interpret``'s read-outs of a fitted, cached run.

Writes ``RUN/interpret/``: a CSV per frame of the ``InterpretResult`` (``FILES``),
``interpret.json`` (settings used, notes) and ``report.md``
(``perfit_probe.stages.interpret_report``); the figures of
``perfit_probe.plotting.interpret_figures`` in ``RUN/figures/``; the KL means and alignment
percentiles in ``metrics.json`` under ``interpret``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from perfit_probe._io import atomic_write_text, to_jsonable
from perfit_probe.config import InterpretConfig
from perfit_probe.deltas import Deltas
from perfit_probe.evaluation.interpret import InterpretResult, interpret
from perfit_probe.models import LoadedModel
from perfit_probe.plotting.interpret_figures import save_interpret_figures
from perfit_probe.stages.fitted import load_fitted_run, prompt_settings
from perfit_probe.stages.interpret_report import render_report
from perfit_probe.stages.rundir import RunDir

FILES = ("kl_users", "kl", "angles", "alignment", "energy", "lens_tokens", "lens_labels", "monitoring", "stats")
"""Frames of ``InterpretResult`` written as ``RUN/interpret/{name}.csv``."""


@dataclass(frozen=True)
class InterpretStageResult:
    """What the interpret stage wrote."""

    run: RunDir
    """The run directory."""
    interpret_dir: Path
    """``RUN/interpret``."""
    readouts: InterpretResult
    """The read-outs' frames, notes and settings."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``interpret``."""


def run(config: InterpretConfig, run_dir: Path | str, loaded: LoadedModel, *,
        progress: bool = False, figures: bool = True) -> InterpretStageResult:
    """Run the read-outs on ``run_dir`` (a fit and cached deltas) with the model ``loaded``;
    write ``RUN/interpret/`` and, with ``figures``, ``RUN/figures/interpret_*.png``.

    ``progress`` is accepted for the stages' common signature; this stage shows no progress bar.
    """
    run = RunDir.open(run_dir)
    fitted = load_fitted_run(run.path, loaded)
    deltas = Deltas.load(run.path / "deltas")
    settings = prompt_settings(run.path)
    run.add_stage("interpret", config)
    with run.timed("interpret"):
        result = interpret(loaded, fitted.task, fitted.split, fitted.perfit, deltas, config, settings,
                           fitted.personal)
    out = run.sub("interpret")
    for name in FILES:
        atomic_write_text(out / f"{name}.csv", getattr(result, name).to_csv(index=False))
    atomic_write_text(out / "interpret.json", json.dumps(to_jsonable({"settings": result.settings,
                                                                       "notes": result.notes}), indent=1) + "\n")
    atomic_write_text(out / "report.md", render_report(result))
    metrics = _headline(result)
    run.add_metrics("interpret", metrics)
    if figures:
        save_interpret_figures(out, run.sub("figures"))
    return InterpretStageResult(run, out, result, metrics)


def _headline(result: InterpretResult) -> dict:
    """The KL mean of each site, method and alpha; the mean alignment percentile of each site and bank."""
    out = {}
    if not result.kl.empty:
        for r in result.kl.itertuples():
            out[f"kl/{r.site}/{r.method}/{r.alpha:g}"] = r.mean
    if not result.alignment.empty:
        for (site, bank), part in result.alignment.groupby(["site", "bank"]):
            out[f"alignment/{site}/{bank}/percentile"] = float(part.percentile.mean())
    return out
