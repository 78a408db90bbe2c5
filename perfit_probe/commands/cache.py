"""``perfit-probe cache``: cache hidden states of a task's prompts and compute delta vectors.

Several processes: ``torchrun --nproc_per_node N -m perfit_probe.cli cache ...``; each rank
reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment torchrun sets, joins a
gloo (CPU) or nccl (CUDA) process group and caches its share of the shards.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from perfit_probe.cache import run_cache
from perfit_probe.commands.common import Flat, load_cli_model
from perfit_probe.config import CacheConfig, ModelSource
from perfit_probe.rundir import seed_everything


def cache(config: Flat[CacheConfig], out: Path, source: Flat[ModelSource] = ModelSource(),
          progress: bool = True) -> int:
    """Cache hidden states of users' prompts and compute delta vectors.

    Args:
        config: What to cache (``perfit_probe.config.CacheConfig``).
        out: Run directory.
        source: Where model weights are looked for.
        progress: Show a progress bar.
    """
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()):
            config = dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
    try:
        seed_everything(config.seed)
        loaded = load_cli_model(config, source)
        run_dir = run_cache(config, out, loaded=loaded, progress=progress and rank == 0,
                            rank=rank, world_size=world_size)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if run_dir is not None:
        metrics = run_dir.metrics()["cache"]
        print(f"cached {metrics['n_rows']} prompts ({metrics['computed_rows']} computed now, "
              f"{metrics['rows_per_s']} rows/s) at {len(metrics['sites'])} sites into {run_dir.path / 'cache'}")
        print(f"delta vectors of {metrics['deltas_users']} users in {run_dir.path / 'deltas'}")
    return 0
