"""``perfit-probe analyze RUN_DIR``: low-rank and collective/personal analysis of the deltas."""

from __future__ import annotations

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, RunDirArg
from perfit_probe.config import AnalysisConfig
from perfit_probe.stages import analyze as analyze_stage


def analyze(run_dir: RunDirArg, config: Flat[AnalysisConfig], figures: bool = True) -> int:
    """Low-rank and collective/personal analysis of a run's delta vectors.

    Args:
        run_dir: Run directory holding deltas/ (from `perfit-probe cache`).
        config: How to analyse (``perfit_probe.config.AnalysisConfig``).
        figures: Draw the figures (else the CSVs and the report only).
    """
    seed_everything(config.seed)
    result = analyze_stage.run(config, run_dir, figures=figures)
    summary = result.metrics
    print(f"analysed {summary['n_users']} users x {summary['n_sites']} sites (d_model {summary['d_model']})")
    for key in ("uncentred", "centred"):
        if key in summary:
            ranks = ", ".join(f"{source} {values.get('rank@0.9', float('nan')):g}"
                              for source, values in summary[key].items())
            print(f"  {key} rank@0.9 at {summary['best_site']}: {ranks}")
    print(f"wrote {run_dir / 'analysis' / 'report.md'}")
    return 0
