"""``perfit-probe backends``: read hidden states through every backend and compare them."""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.backends.agreement import backend_agreement
from perfit_probe.commands.common import add_model_arguments, model_from_args
from perfit_probe.sites import parse_sites
from perfit_probe.stages.rundir import RunDir

DEFAULT_PROMPTS = [
    "I loved Star Wars (1977) and Fargo (1996). How would I rate Toy Story (1995)?",
    "Give me a one-word tag for a movie about a boy and his dog.",
    "Rate the movie Heat (1995) from 1 to 5.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--sites", default=None,
                        help="comma-separated sites or layer indices (default: every layer's resid_post)")
    parser.add_argument("--prompt", action="append", help="prompt to run (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory to write (optional)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    loaded = model_from_args(args)
    sites = parse_sites(args.sites or list(range(loaded.n_layers)), loaded.n_layers)
    prompts = args.prompt or DEFAULT_PROMPTS
    frame = backend_agreement(loaded, prompts, sites)
    worst = frame.groupby("backend")["max_abs_diff"].max()
    print(f"model {loaded.identity.name}: {loaded.n_layers} layers, d_model {loaded.d_model}; "
          f"{len(prompts)} prompts, {len(sites)} sites, left-padded batch vs reference hooks")
    for backend, value in worst.items():
        print(f"  {backend:>17}: max |difference| over all sites and positions = {value:.2e}")
    if args.out is not None:
        run_dir = RunDir.create(args.out, "backends", vars_for_json(args), args.seed, loaded.identity, exist_ok=True)
        frame.to_csv(run_dir.path / "backend_agreement.csv", index=False)
        run_dir.add_metrics("backends", worst.to_dict())
        print(f"wrote {run_dir.path / 'backend_agreement.csv'}")
    return 0 if worst.max() < 1e-4 else 1


def vars_for_json(args: argparse.Namespace) -> dict:
    """Arguments of a parsed command as a JSON-able dict."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
