"""``perfit-probe run CONFIG.toml``: the pipeline on your own model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from tyro.conf import Positional, arg, create_mutex_group

from perfit_probe.config import PipelineConfig, load_pipeline_config, seed_config
from perfit_probe.stages.pipeline import main_announce, run_pipeline, run_seeds
from perfit_probe.stages.report import summary_lines
from perfit_probe.stages.seed_summary import headline_lines, seed_summary

SEEDS = create_mutex_group(required=False, title="seeds (one of)")
"""``--seed N`` (one run in OUT) or ``--seeds 0,1,2`` (one run per seed in OUT/seed{s}, and a summary)."""


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
    if "pooled" in paths:
        print(f"the seeds' test users pooled (intervals, differences, claim 3): {paths['pooled']}")
    return 0


def run(config: Annotated[Path, Positional, arg(metavar="CONFIG")], out: Path,
        seed: Annotated[int | None, SEEDS] = None, seeds: Annotated[tuple[int, ...] | None, SEEDS] = None,
        progress: bool = True) -> int:
    """Run the pipeline described by a TOML config file.

    Args:
        config: Pipeline TOML file (see examples/).
        out: Run directory to create.
        seed: Seed of the task, the split and every stage (default: the config's).
        seeds: Comma-separated seeds: the whole pipeline once per seed into OUT/seed{s}, then
            OUT/seeds_summary.{csv,md,json} with mean, std, min and max across seeds.
        progress: Show progress bars.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars: stderr is for errors
    pipeline = load_pipeline_config(config)
    if seeds is not None:
        return execute_seeds(pipeline, out, seeds, progress=progress)
    if seed is not None:
        pipeline = seed_config(pipeline, seed)
    return execute(pipeline, out, progress=progress)
