"""The ``analyze`` stage: the shift analysis of a run directory's delta vectors.

Reads ``RUN/deltas`` (written by the cache stage), runs
:func:`perfit_probe.analysis.tables.analyze_deltas`, and writes::

    RUN/analysis/*.csv, analysis.json   the tidy tables (see ``AnalysisResult``)
    RUN/analysis/report.md             paper-style rank tables next to the nulls, collective stats
    RUN/figures/shift_*.png            figures drawn from the saved CSVs only
    RUN/metrics.json ["analysis"]      headline numbers (``AnalysisResult.summary``)

``RUN/analysis/`` is written whole (``staged_dir``): an earlier analysis stays until the new
one is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from perfit_probe._io import atomic_write_text
from perfit_probe.analysis.tables import AnalysisResult, analyze_deltas
from perfit_probe.config import AnalysisConfig
from perfit_probe.deltas import Deltas
from perfit_probe.models import LoadedModel
from perfit_probe.plotting.shift_figures import save_shift_figures
from perfit_probe.stages.analysis_report import render_report
from perfit_probe.stages.rundir import RunDir, staged_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyzeStageResult:
    """What the analyze stage wrote."""

    run: RunDir
    """The run directory."""
    analysis: AnalysisResult
    """The tables, as saved in ``RUN/analysis/``."""
    report: Path
    """``RUN/analysis/report.md``."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``analysis``."""


def run(config: AnalysisConfig, run_dir: Path | str, loaded: LoadedModel | None = None, *,
        progress: bool = False, figures: bool = True) -> AnalyzeStageResult:
    """Analyse ``RUN/deltas``; write the tables, ``report.md``, figures and metrics.

    ``loaded`` is not used (the analysis needs no model). ``progress`` turns on the progress
    bar over sites (as ``config.progress``). ``figures=False`` skips the PNGs
    (``analyses/shift_figures.py`` can draw them later from the CSVs).
    """
    if progress and not config.progress:
        config = replace(config, progress=True)
    run = RunDir.open(run_dir)
    deltas = Deltas.load(run.path / "deltas")
    history_path = run.path / "deltas" / "history.csv"
    history = (pd.read_csv(history_path, dtype={"user_id": str, "query_id": str}, keep_default_na=False)
               if history_path.is_file() else None)
    log.info("analysing %d users x %d sites (d_model %d)", len(deltas.user_ids),
             len(deltas.sites), deltas.d_model)
    run.add_stage("analyze", config)
    with run.timed("analyze"):
        result = analyze_deltas(deltas, config, history)
    with staged_dir(run.path / "analysis") as staged:  # an earlier analysis stays until this one is whole
        result.save(staged)
        atomic_write_text(staged / "report.md", render_report(result, model=run.info().get("model")))
    out = run.path / "analysis"
    if figures:  # drawn from the CSVs just saved
        save_shift_figures(out, run.sub("figures"))
    metrics = result.summary()
    run.add_metrics("analysis", metrics)
    log.info("wrote %s", out / "report.md")
    return AnalyzeStageResult(run, result, out / "report.md", metrics)
