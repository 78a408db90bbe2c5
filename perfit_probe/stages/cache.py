"""The ``cache`` stage: a task's prompts -> ``RUN/cache`` (hidden states) -> ``RUN/deltas`` (delta vectors).

Writes, under the run directory: ``run.json`` (created, or extended when resuming),
``cache/`` (``perfit_probe.cache.cache_activations``: shards, index, manifest), ``deltas/``
(``Deltas`` plus ``deltas.csv`` and, for a task, ``history.csv``: what each prompt added, for
the analysis's text baselines; with ``checksums.json``) and ``metrics.json`` under ``cache``.
``deltas/`` is written whole (``staged_dir``): earlier deltas stay until the new ones are
complete.

Under ``torchrun`` every rank caches its share of the shards; rank 0 writes the run
directory and the deltas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perfit_probe._io import atomic_write_text, write_checksums
from perfit_probe.cache import (
    build_task_examples, cache_activations, check_examples, default_sites, load_examples_jsonl,
)
from perfit_probe.config import CacheConfig
from perfit_probe.data.controls import history_frame
from perfit_probe.data.records import Example
from perfit_probe.deltas import Deltas, compute_deltas, delta_frame
from perfit_probe.errors import ConfigError
from perfit_probe.models import LoadedModel, load_model
from perfit_probe.sites import parse_sites
from perfit_probe.stages.distributed import barrier
from perfit_probe.stages.rundir import RunDir, staged_dir


@dataclass(frozen=True)
class CacheStageResult:
    """What the cache stage wrote."""

    run: RunDir
    """The run directory."""
    cache_dir: Path
    """``RUN/cache``: the activation cache."""
    deltas_dir: Path
    """``RUN/deltas``: the delta vectors (written by rank 0 only)."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``cache`` (empty on ranks other than 0)."""


def run(config: CacheConfig, run_dir: Path | str, loaded: LoadedModel | None = None, *,
        progress: bool = True, rank: int = 0, world_size: int = 1) -> CacheStageResult:
    """Cache ``config``'s prompts into ``run_dir`` and compute the delta vectors.

    ``loaded``: the model (loaded from ``config.model`` when None). ``rank``/``world_size``:
    this process under ``torchrun`` (``perfit_probe.stages.distributed``).
    """
    out = Path(run_dir)
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise ConfigError(f"run directory {out} already exists and is not empty: choose another --out or pass --resume")
    config.validate()  # bad options fail before anything is loaded or written
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    if config.examples is not None:
        examples, report = load_examples_jsonl(config.examples), {"task": f"examples:{config.examples}"}
    else:
        examples, report = build_task_examples(config, loaded.tokenizer)
    sites = parse_sites(config.sites if config.sites else default_sites(loaded.n_layers), loaded.n_layers)
    check_examples(examples)  # before run.json exists, so a corrected rerun needs no --resume
    barrier(world_size)
    run = RunDir.create(out, "cache", config, config.seed, loaded.identity, exist_ok=True) if rank == 0 else RunDir(out)
    start = time.perf_counter()
    cache = cache_activations(
        loaded, examples, out / "cache", sites=sites, positions=config.positions,
        storage_dtype=config.storage_dtype, batch_size=config.batch_size, padding_side=config.padding_side,
        shard_rows=config.shard_rows, resume=config.resume, backend=config.backend, progress=progress,
        rank=rank, world_size=world_size,
    )
    if rank != 0:
        return CacheStageResult(run, out / "cache", out / "deltas")
    wall = time.perf_counter() - start
    deltas = compute_deltas(cache, meta={"task": report.get("task"), "seed": config.seed})
    frame = delta_frame(deltas)
    _write_deltas(out / "deltas", deltas, frame, examples if config.examples is None else None)
    last = cache.manifest["runs"][-1]
    metrics = {
        **report,
        "n_examples": len(examples),
        "n_rows": len(cache),
        "sites": cache.sites,
        "positions": cache.positions,
        "storage_dtype": cache.config["storage_dtype"],
        "n_shards": cache.n_shards,
        "computed_rows": last["computed_rows"],
        "skipped_shards": last["skipped_shards"],
        "rows_per_s": last["rows_per_s"],
        "wall_s": round(wall, 3),
        "world_size": world_size,
        **_norms(deltas, frame),
    }
    run.add_metrics("cache", metrics)
    return CacheStageResult(run, out / "cache", out / "deltas", metrics)


def _write_deltas(directory: Path, deltas: Deltas, frame: pd.DataFrame, examples: list[Example] | None) -> None:
    """``deltas/`` as a whole: the artifact, ``deltas.csv`` and (a task's ``examples``) ``history.csv``."""
    with staged_dir(directory) as staged:  # earlier deltas stay until these are whole
        deltas.save(staged)
        atomic_write_text(staged / "deltas.csv", frame.to_csv(index=False))
        written = ["deltas.csv"]
        if examples is not None:  # what each prompt added, for the analysis's text baselines
            atomic_write_text(staged / "history.csv", history_frame(examples).to_csv(index=False))
            written.append("history.csv")
        write_checksums(staged, written)


def _norms(deltas: Deltas, frame: pd.DataFrame) -> dict:
    """Users with deltas and the mean delta (and control) norm per site, for ``metrics.json``."""
    by_site = frame.groupby("site", sort=False)
    return {
        "deltas_users": len(deltas.user_ids),
        "mean_delta_norm": {s: float(v) for s, v in by_site["delta_norm"].mean().items()},
        "mean_control_norm": ({s: float(v) for s, v in by_site["control_norm"].mean().items()}
                              if deltas.control is not None else None),
    }
