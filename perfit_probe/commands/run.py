"""``perfit-probe run CONFIG.toml``: the pipeline on your own model and data."""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe.pipeline import PipelineConfig, load_pipeline_config, main_announce, run_pipeline, summary_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pipeline TOML file (see examples/)")
    parser.add_argument("--out", type=Path, required=True, help="run directory to create")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def execute(config: PipelineConfig, out: Path, progress: bool = True, loaded=None) -> int:
    """Run a pipeline, printing one line per stage and a final summary."""
    run = run_pipeline(config, out, progress=progress, announce=main_announce, loaded=loaded)
    print()
    for line in summary_lines(run):
        print(line)
    return 0


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars: stderr is for errors
    return execute(load_pipeline_config(args.config), args.out, progress=not args.no_progress)
