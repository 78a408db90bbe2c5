"""``perfit-probe cache``: cache hidden states of a task's prompts and compute delta vectors.

Several processes: ``torchrun --nproc_per_node N -m perfit_probe.cli cache ...``; each rank
reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment torchrun sets, joins a
gloo (CPU) or nccl (CUDA) process group and caches its share of the shards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.cache import CacheConfig
from perfit_probe.commands.common import (
    MAX_QUERIES_HELP, TASK_PATH_HELP, add_model_arguments, csv_items, model_from_args,
)
from perfit_probe.data.records import DEFAULT_VARIANTS, VARIANTS
from perfit_probe.stages import cache as cache_stage
from perfit_probe.stages.distributed import torchrun


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--task", default="movielens", help="task name (movielens, synthetic, LaMP-3, ...)")
    data.add_argument("--task-path", type=Path, default=None, help=TASK_PATH_HELP)
    data.add_argument("--task-outputs", type=Path, default=None, help="gold outputs file of a LaMP task")
    data.add_argument("--examples", type=Path, default=None,
                      help="JSON-lines file of ready prompts (user_id, query_id, variant, prompt); replaces --task")
    data.add_argument("--users", type=int, default=20, help="number of users (0: all)")
    data.add_argument("--max-queries", type=int, default=8, help=MAX_QUERIES_HELP)
    data.add_argument("--variants", type=lambda t: list(csv_items(t)), default=list(DEFAULT_VARIANTS),
                      help=f"comma-separated prompt variants among {','.join(VARIANTS)} "
                           f"(default {','.join(DEFAULT_VARIANTS)})")
    data.add_argument("--k", type=int, default=4, help="history items retrieved into enhanced prompts")
    data.add_argument("--retriever", default="bm25", help="history retriever")
    data.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                      help="apply the chat template (default: when the tokenizer has one)")
    cache = parser.add_argument_group("cache")
    cache.add_argument("--sites", type=lambda t: list(csv_items(t)), default=None,
                       help="comma-separated sites or layer indices (default: a spread of layers)")
    cache.add_argument("--positions", default="last", help="last, mean or f<p>+l<s>")
    cache.add_argument("--storage-dtype", default="float32", help="float32, bfloat16 or float16")
    cache.add_argument("--batch-size", type=int, default=16)
    cache.add_argument("--shard-rows", type=int, default=1024, help="rows per shard file")
    cache.add_argument("--padding-side", choices=("left", "right"), default="left")
    cache.add_argument("--backend", choices=("hooks", "transformer_lens", "nnsight"), default="hooks")
    cache.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    """The ``CacheConfig`` that parsed arguments describe."""
    return CacheConfig(
        task=args.task, task_path=args.task_path, task_outputs=args.task_outputs, examples=args.examples,
        n_users=args.users or None, max_queries=args.max_queries or None, variants=tuple(args.variants),
        k=args.k, retriever=args.retriever, chat=args.chat, sites=args.sites, positions=args.positions,
        storage_dtype=args.storage_dtype, batch_size=args.batch_size, shard_rows=args.shard_rows,
        padding_side=args.padding_side, backend=args.backend, seed=args.seed, resume=args.resume,
        model=args.model, dtype=args.dtype, device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    with torchrun(args.device) as ranks:
        args.device = ranks.device
        seed_everything(args.seed)
        config = config_from_args(args)
        loaded = model_from_args(args)
        result = cache_stage.run(config, args.out, loaded, progress=not args.no_progress and ranks.rank == 0,
                                 rank=ranks.rank, world_size=ranks.world_size)
    if ranks.rank == 0:
        metrics = result.metrics
        print(f"cached {metrics['n_rows']} prompts ({metrics['computed_rows']} computed now, "
              f"{metrics['rows_per_s']} rows/s) at {len(metrics['sites'])} sites into {result.cache_dir}")
        print(f"delta vectors of {metrics['deltas_users']} users in {result.deltas_dir}")
    return 0
