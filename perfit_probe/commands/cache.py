"""``perfit-probe cache``: cache hidden states of a task's prompts and compute delta vectors.

Several processes: ``torchrun --nproc_per_node N -m perfit_probe.cli cache ...``; each rank
reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment torchrun sets, joins a
gloo (CPU) or nccl (CUDA) process group and caches its share of the shards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, load_cli_model
from perfit_probe.config import CacheConfig, ModelSource
from perfit_probe.stages import cache as cache_stage
from perfit_probe.stages.distributed import torchrun


def cache(config: Flat[CacheConfig], out: Path, source: Flat[ModelSource] = ModelSource(),
          progress: bool = True) -> int:
    """Cache hidden states of users' prompts and compute delta vectors.

    Args:
        config: What to cache (``perfit_probe.config.CacheConfig``).
        out: Run directory.
        source: Where model weights are looked for.
        progress: Show a progress bar.
    """
    with torchrun(config.device) as ranks:
        config = dataclasses.replace(config, device=ranks.device)
        seed_everything(config.seed)
        loaded = load_cli_model(config, source)
        result = cache_stage.run(config, out, loaded, progress=progress and ranks.rank == 0,
                                 rank=ranks.rank, world_size=ranks.world_size)
    if ranks.rank == 0:
        metrics = result.metrics
        print(f"cached {metrics['n_rows']} prompts ({metrics['computed_rows']} computed now, "
              f"{metrics['rows_per_s']} rows/s) at {len(metrics['sites'])} sites into {result.cache_dir}")
        print(f"delta vectors of {metrics['deltas_users']} users in {result.deltas_dir}")
    return 0
