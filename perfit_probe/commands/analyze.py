"""``perfit-probe analyze RUN_DIR``: low-rank and collective/personal analysis of the deltas."""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.analysis.collective import CLASSIFIERS
from perfit_probe.analysis.nulls import BOOTSTRAPS, SOURCES
from perfit_probe.analysis.tables import AnalysisConfig
from perfit_probe.commands.common import csv_items
from perfit_probe.errors import ConfigError
from perfit_probe.stages import analyze as analyze_stage

_CENTERS = {"both": (False, True), "uncentred": (False,), "centred": (True,)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory holding deltas/ (from `perfit-probe cache`)")
    parser.add_argument("--taus", default="0.8,0.9,0.95", help="comma-separated energy shares")
    parser.add_argument("--center", choices=sorted(_CENTERS), default="both",
                        help="analyse uncentred deltas, mean-centred ones, or both")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma-separated sources among {','.join(SOURCES)}")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples over users (0: none)")
    parser.add_argument("--bootstrap", choices=BOOTSTRAPS, default="bayesian")
    parser.add_argument("--n-perm", type=int, default=200, help="permutations for the F-ratio p-value")
    parser.add_argument("--n-null-draws", type=int, default=200,
                        help="draws of each Gaussian null (isotropic, anisotropic) for rank p-values")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level wording the controls' directions in the report")
    parser.add_argument("--classifier", choices=CLASSIFIERS, default="centroid",
                        help="user-identification classifier")
    parser.add_argument("--heldout-fraction", type=float, default=0.3,
                        help="share of each user's last queries held out for user identification")
    parser.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto")
    parser.add_argument("--figure-sites", default=None,
                        help="comma-separated sites for PC projections and heatmaps (default: 4 evenly spaced)")
    parser.add_argument("--no-figures", action="store_true", help="write CSVs and the report only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show a progress bar over sites")


def config_from_args(args: argparse.Namespace) -> AnalysisConfig:
    """The ``AnalysisConfig`` that the parsed options describe."""
    try:
        taus = tuple(float(t) for t in csv_items(args.taus))
    except ValueError:
        raise ConfigError(f"--taus {args.taus!r}: expected comma-separated numbers like 0.8,0.9") from None
    sources = csv_items(args.sources)
    figure_sites = (csv_items(args.figure_sites)
                    if args.figure_sites else None)
    return AnalysisConfig(
        taus=taus, centers=_CENTERS[args.center], sources=sources, n_boot=args.n_boot,
        bootstrap=args.bootstrap, n_perm=args.n_perm, n_null_draws=args.n_null_draws,
        alpha=args.alpha, classifier=args.classifier,
        heldout_fraction=args.heldout_fraction, svd=args.svd, figure_sites=figure_sites,
        seed=args.seed, progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    result = analyze_stage.run(config_from_args(args), args.run_dir, figures=not args.no_figures)
    summary = result.metrics
    print(f"analysed {summary['n_users']} users x {summary['n_sites']} sites (d_model {summary['d_model']})")
    for key in ("uncentred", "centred"):
        if key in summary:
            ranks = ", ".join(f"{source} {values.get('rank@0.9', float('nan')):g}"
                              for source, values in summary[key].items())
            print(f"  {key} rank@0.9 at {summary['best_site']}: {ranks}")
    print(f"wrote {args.run_dir / 'analysis' / 'report.md'}")
    return 0
