"""``perfit-probe interpret RUN_DIR``: steering with the measured shifts, alignment and read-outs."""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import add_model_arguments, csv_items, model_from_args
from perfit_probe.evaluation.interpret import STEER_METHODS, InterpretConfig
from perfit_probe.stages import interpret as interpret_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = InterpretConfig()
    parser.add_argument("run_dir", type=Path, help="a run directory with deltas (cache) and a fit")
    add_model_arguments(parser, from_run=True)
    parser.add_argument("--sites", type=csv_items, default=None,
                        help="comma-separated sites (default: the fit's sites that were cached)")
    parser.add_argument("--alphas", type=lambda t: tuple(float(x) for x in csv_items(t)), default=defaults.alphas,
                        help="scales of the added delta vectors (default: %(default)s)")
    parser.add_argument("--methods", type=csv_items, default=defaults.methods,
                        help=f"steering vectors, a subset of {','.join(STEER_METHODS)}")
    parser.add_argument("--k", type=int, default=defaults.k, help="top centred delta PCs (default: %(default)s)")
    parser.add_argument("--n-null", type=int, default=defaults.n_null, help="random subspaces in the null")
    parser.add_argument("--n-boot", type=int, default=defaults.n_boot, help="bootstrap resamples of users")
    parser.add_argument("--max-queries", type=int, default=None, help="held-out queries per test user at most")
    parser.add_argument("--no-figures", action="store_true", help="write the CSVs and report only")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    config = InterpretConfig(sites=args.sites, alphas=args.alphas, methods=args.methods, k=args.k,
                             n_null=args.n_null, n_boot=args.n_boot, max_queries_per_user=args.max_queries,
                             seed=args.seed)
    loaded = model_from_args(args, args.run_dir)
    result = interpret_stage.run(config, args.run_dir, loaded, figures=not args.no_figures).readouts
    for note in result.notes:
        print(f"  note: {note}")
    if not result.kl.empty:
        top = result.kl[result.kl.alpha == max(config.alphas)]
        for row in top.itertuples():
            print(f"  KL at alpha={row.alpha:g} {row.site} {row.method:>10}: {row.mean:.4f} [{row.lo:.4f}, {row.hi:.4f}]")
    if not result.alignment.empty:
        for (site, bank), part in result.alignment.groupby(["site", "bank"], sort=False):
            print(f"  {site} {bank}: overlap with the delta subspace {part.overlap.mean():.3f} "
                  f"(random {part.null_overlap.mean():.3f}, percentile {part.percentile.mean():.0f})")
    print(f"wrote {args.run_dir / 'interpret' / 'report.md'}")
    return 0
