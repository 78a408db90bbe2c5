"""``perfit-probe demo``: the whole pipeline on the embedded SmolLM2 and MovieLens ratings."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Annotated

from perfit_probe.commands.run import SEEDS, execute, execute_seeds
from perfit_probe.config import STAGES, Stage, seed_config
from perfit_probe.models import load_model
from perfit_probe.pipeline import demo_config


PUBLISHED_CAPABILITY = Path("figures/capability.json")
"""The capability check of the demo's recipe, as published in the repository."""


def demo(users: int = 24, model: str = "smollm2", device: str = "cpu", task: str = "movielens",
         stages: tuple[Stage, ...] = STAGES, out: Path | None = None, seed: Annotated[int, SEEDS] = 0,
         seeds: Annotated[tuple[int, ...] | None, SEEDS] = None, capability: Path = PUBLISHED_CAPABILITY,
         progress: bool = True) -> int:
    """Run the whole pipeline on the embedded model and MovieLens data.

    Args:
        users: MovieLens users (default 24: about 14 min on 2 CPU cores); half are test users.
        model: Model to use instead of the embedded SmolLM2.
        device: cpu, cuda or auto.
        task: Task instead of movielens (e.g. synthetic).
        stages: Comma-separated stages to run.
        out: Run directory (default runs/demo-<time>).
        seed: Seed of the task, the split and every stage.
        seeds: Comma-separated seeds: the whole pipeline once per seed into OUT/seed{s}, then
            OUT/seeds_summary.{csv,md,json} with mean, std, min and max across seeds.
        capability: A capability check's capability.json whose verdict for the demo's recipe the
            claims quote (default: the published one, skipped when absent from the working directory).
        progress: Show progress bars.
    """
    # deferred: transformers' logging module only matters once a model loads
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars: stderr is for errors
    print(f"loading model {model!r}", flush=True)
    loaded = load_model(model, device=device)
    config = demo_config(n_users=users, model=model, device=device, n_layers=loaded.n_layers, task=task)
    if capability == PUBLISHED_CAPABILITY and not capability.is_file():
        capability = None  # run outside the repository: no published check to quote
    config = dataclasses.replace(config, stages=stages, capability=capability)
    out = out or Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if seeds is not None:
        return execute_seeds(config, out, seeds, progress=progress, loaded=loaded)
    return execute(seed_config(config, seed), out, progress=progress, loaded=loaded)
