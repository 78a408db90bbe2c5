"""``perfit-probe run CONFIG.toml``: the pipeline on your own model and data."""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe.commands.common import csv_items
from perfit_probe.pipeline import PipelineConfig, load_pipeline_config, seed_config
from perfit_probe.stages.pipeline import main_announce, run_pipeline, run_seeds
from perfit_probe.stages.report import summary_lines
from perfit_probe.stages.seed_summary import headline_lines, seed_summary


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` as a tuple of integers."""
    try:
        return tuple(int(item) for item in csv_items(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def add_seed_arguments(parser: argparse.ArgumentParser, default: int | None) -> None:
    """``--seed N`` (one run in OUT) or ``--seeds 0,1,2`` (one run per seed in OUT/seed{s}, and a summary)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seed", type=int, default=default,
                       help="seed of the task, the split and every stage"
                            + (f" (default {default})" if default is not None else " (default: the config's)"))
    group.add_argument("--seeds", type=seed_list, default=None,
                       help="comma-separated seeds: the whole pipeline once per seed into OUT/seed{s}, then "
                            "OUT/seeds_summary.{csv,md,json} with mean, std, min and max across seeds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pipeline TOML file (see examples/)")
    parser.add_argument("--out", type=Path, required=True, help="run directory to create")
    add_seed_arguments(parser, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def execute(config: PipelineConfig, out: Path, progress: bool = True, loaded=None) -> int:
    """Run a pipeline, printing one line per stage and a final summary."""
    run = run_pipeline(config, out, progress=progress, announce=main_announce, loaded=loaded)
    print()
    for line in summary_lines(run):
        print(line)
    return 0


def execute_seeds(config: PipelineConfig, out: Path, seeds, progress: bool = True, loaded=None) -> int:
    """Run a pipeline once per seed, printing where each run and the across-seed summary are."""
    runs, paths = run_seeds(config, out, seeds, progress=progress, announce=main_announce, loaded=loaded)
    print()
    print(f"{len(runs)} seeds; across seeds (mean +- std (min .. max)):")
    for line in headline_lines(seed_summary({seed: run.metrics() for seed, run in runs.items()})):
        print(line)
    for seed, run in runs.items():
        print(f"seed {seed}: {run.path} (report: {run.path / 'report.md'})")
    for suffix in ("md", "csv", "json"):
        print(f"seeds summary ({suffix}): {paths[suffix]}")
    return 0


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars: stderr is for errors
    config = load_pipeline_config(args.config)
    if args.seeds is not None:
        return execute_seeds(config, args.out, args.seeds, progress=not args.no_progress)
    if args.seed is not None:
        config = seed_config(config, args.seed)
    return execute(config, args.out, progress=not args.no_progress)
