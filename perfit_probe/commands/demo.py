"""``perfit-probe demo``: the whole pipeline on the embedded SmolLM2 and MovieLens ratings."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from perfit_probe.commands.common import csv_items
from perfit_probe.commands.run import add_seed_arguments, execute, execute_seeds
from perfit_probe.pipeline import STAGES, demo_config, seed_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=24,
                        help="MovieLens users (default 24: about 10 min on 2 CPU cores); half are test users")
    parser.add_argument("--model", default="smollm2", help="model to use instead of the embedded SmolLM2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--task", default=None, help="task instead of movielens (e.g. synthetic)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo-<time>)")
    add_seed_arguments(parser, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from perfit_probe.models import load_model

    hf_logging.disable_progress_bar()  # no weight-loading bars: stderr is for errors
    print(f"loading model {args.model!r}", flush=True)
    loaded = load_model(args.model, device=args.device)
    config = demo_config(n_users=args.users, model=args.model, device=args.device, n_layers=loaded.n_layers)
    if args.task:
        config.task["name"] = args.task
    config.stages = csv_items(args.stages)
    config.__post_init__()
    out = args.out or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.seeds is not None:
        return execute_seeds(config, out, args.seeds, progress=not args.no_progress, loaded=loaded)
    return execute(seed_config(config, args.seed), out, progress=not args.no_progress, loaded=loaded)
