"""``perfit-probe steer RUN_DIR``: user swap, subspace ablation, dose response, control."""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import add_model_arguments, csv_items, model_from_args
from perfit_probe.evaluation.steer import EXPERIMENTS, SteerConfig
from perfit_probe.stages import steer as steer_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory fitted by `perfit-probe fit`")
    add_model_arguments(parser, from_run=True)
    parser.add_argument("--experiments", type=csv_items, default=EXPERIMENTS,
                        help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all)")
    parser.add_argument("--alphas", type=lambda t: tuple(float(x) for x in csv_items(t)),
                        default=SteerConfig().alphas, help="scales of the personal edit (dose response)")
    parser.add_argument("--max-pairs", type=int, default=60, help="user pairs in the swap at most")
    parser.add_argument("--ablate-energy", type=float, default=0.9,
                        help="share of the personal edits' energy the ablated subspace holds")
    parser.add_argument("--ablate-max-k", type=int, default=16)
    parser.add_argument("--ablate-mode", choices=("hidden", "edit"), default="hidden")
    parser.add_argument("--n-random-subspaces", type=int, default=SteerConfig().n_random_subspaces,
                        help="random subspaces of the ablation's control distribution")
    parser.add_argument("--n-boot", type=int, default=SteerConfig().n_boot, help="bootstrap resamples of the users")
    parser.add_argument("--n-perm", type=int, default=SteerConfig().n_perm, help="permutations of the swap tests")
    parser.add_argument("--decoding", choices=("auto", "constrained", "greedy"), default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-figures", action="store_true", help="write the CSVs only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> SteerConfig:
    """The ``SteerConfig`` that parsed arguments describe."""
    return SteerConfig(experiments=args.experiments, alphas=args.alphas, max_pairs=args.max_pairs,
                       ablate_energy=args.ablate_energy, ablate_max_k=args.ablate_max_k,
                       ablate_mode=args.ablate_mode, n_random_subspaces=args.n_random_subspaces,
                       n_boot=args.n_boot, n_perm=args.n_perm, decoding=args.decoding, batch_size=args.batch_size,
                       seed=args.seed)


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    config = config_from_args(args)
    loaded = model_from_args(args, args.run_dir)
    result = steer_stage.run(config, args.run_dir, loaded, figures=not args.no_figures,
                             progress=not args.no_progress).checks
    shown = result.rows[result.rows.experiment != "reference"]
    for row in shown.itertuples():
        print(f"  {row.experiment:>9} {row.setting:>24} {row.metric:>24} = {row.value:.4g}")
    for line in result.verdicts:
        print(f"  {line}")
    print(f"wrote {args.run_dir / 'steer' / 'steer.csv'}")
    return 0
