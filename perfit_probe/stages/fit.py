"""The ``fit`` stage: both PerFit stages of one task on one model, written into a run directory.

Writes, under ``RUN/perfit/``: ``stage1/`` (collective bank), ``bank/`` (personal bank),
``split.json`` (train/test users, held-out queries), ``task.json`` (how to reload the task
and rebuild the prompts), ``curves.csv`` (loss per step, user and stage), ``params.json``
(parameter counts: collective, per user, and LoRA rank 8 on q/v for the same model); wall
times and loss summaries go into ``RUN/metrics.json`` under ``fit`` (the stage-2 model
selection under ``fit.stage2.selection``). What is trained on: ``perfit_probe.interventions.fit``.

``RUN/perfit/`` is written as a whole (``staged_dir``): into ``perfit.tmp-<pid>``, swapped
into place once everything is written, so an interrupted ``--force`` rerun leaves the previous
fit as it was. ``RUN/perfit/checksums.json`` holds the SHA-256 of its files (each bank
directory has its own), verified when evaluation reads them. A run directory made (cached)
with another model is refused before any work.

Several processes (``torchrun``, ``perfit_probe.stages.distributed``): rank 0 trains stage 1
and saves it; the others wait and load it; stage-2 users are sharded across ranks (user i to
rank i mod world_size); rank 0 merges the shards. The ranks exchange stage 1 and the shards
through ``RUN/perfit.exchange/``, deleted at the end.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from perfit_probe._io import atomic_write_text, write_checksums, write_json
from perfit_probe.config import FitConfig
from perfit_probe.data import load_task
from perfit_probe.data.splits import Split, make_split
from perfit_probe.errors import ConfigError
from perfit_probe.interventions.artifact import check_identity, load_bank, save_bank
from perfit_probe.interventions.fit import bank_specs, fit_collective, fit_personal, parameter_counts
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.interventions.train import curve_summary
from perfit_probe.models import LoadedModel, load_model
from perfit_probe.stages.distributed import barrier, check_initialised
from perfit_probe.stages.rundir import RunDir, staged_dir

log = logging.getLogger(__name__)

FIT_FILES = ("split.json", "task.json", "curves.csv", "params.json")
"""Files of ``RUN/perfit/`` besides the banks, covered by its ``checksums.json``."""


@dataclass(frozen=True)
class FitStageResult:
    """What the fit stage wrote."""

    run: RunDir
    """The run directory."""
    perfit_dir: Path
    """``RUN/perfit``: the banks, split, task, curves and parameter counts (rank 0)."""
    metrics: dict = field(default_factory=dict)
    """What the stage added to ``metrics.json`` under ``fit`` (empty on ranks other than 0)."""


def check_run_model(out: Path, loaded: LoadedModel) -> None:
    """Refuse to fit into a run directory whose ``run.json`` records another model.

    The same check (``artifact.check_identity``) that later refuses to load the banks onto
    a different model, made before any work so that a mismatched fit is never written.
    """
    info_path = Path(out) / "run.json"
    if not info_path.is_file():
        return
    recorded = RunDir(Path(out)).info().get("model")
    if recorded:
        check_identity(recorded, loaded.identity, info_path, made="made with")


def run(config: FitConfig, run_dir: Path | str, loaded: LoadedModel | None = None, *, rank: int = 0,
        world_size: int = 1, progress: bool = False, overwrite: bool = False) -> FitStageResult:
    """Fit both stages and write them into ``run_dir``.

    ``loaded``: the model (default: ``load_model(config.model, ...)``). Every option is checked
    (layers in range, ranks <= d_model, ...) before any training. ``overwrite``: replace an
    existing fit (``--force``).
    """
    config.validate()
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    check_initialised(world_size)
    out = Path(run_dir)
    if rank == 0 and (out / "perfit" / "stage1").exists() and not overwrite:
        raise ConfigError(f"{out}/perfit already holds a fit: choose another --out or pass --force")
    check_run_model(out, loaded)
    spec1, spec2 = bank_specs(config, loaded)
    task = load_task(config.task, path=config.task_path, outputs=config.task_outputs, n_users=config.n_users,
                     seed=config.seed, max_queries=config.max_queries)
    split = make_split(task, n_test_users=config.n_test_users, test_fraction=config.test_fraction,
                       n_heldout=config.n_heldout, test_users_by=config.test_users_by, seed=config.seed)
    run = _open_run(out, config, loaded, rank)
    exchange = out / "perfit.exchange"  # stage 1 and stage-2 shards passed between ranks

    t0 = time.perf_counter()
    collective, curve1 = (fit_collective(loaded, task, split, spec1, config, progress=progress)
                          if rank == 0 else (None, pd.DataFrame()))
    if rank == 0 and world_size > 1:
        save_bank(collective, exchange / "stage1", loaded.identity, {"stage": "collective"})
    stage1_s = time.perf_counter() - t0
    barrier(world_size)
    if rank != 0:
        collective, _ = load_bank(exchange / "stage1", loaded.identity, loaded.device)

    t0 = time.perf_counter()
    my_test = [u for i, u in enumerate(split.test_users) if i % world_size == rank]
    personal, curve2 = fit_personal(loaded, task, split, my_test, collective, spec2, config, progress=progress)
    if world_size > 1:
        personal, curve2 = _merge_personal(exchange, rank, world_size, personal, curve2, split, loaded, config)
        if rank != 0:
            return FitStageResult(run, out / "perfit")
    stage2_s = time.perf_counter() - t0

    params = parameter_counts(spec1, spec2, loaded.model)
    _write_fit(run.path / "perfit", config, split, collective, personal, pd.concat([curve1, curve2], ignore_index=True),
               params, (spec1, spec2), loaded)
    shutil.rmtree(exchange, ignore_errors=True)
    n_test = len(split.test_users)
    metrics = {
        "stage1_train_s": stage1_s, "stage2_train_s": stage2_s,
        "stage2_train_s_per_user": stage2_s / n_test if n_test else float("nan"),
        "n_train_users": len(split.train_users), "n_test_users": n_test, "world_size": world_size,
        "params": params,
        "stage1": curve_summary(curve1) if not curve1.empty else {"steps": 0},
        "stage2": curve_summary(curve2) if not curve2.empty else {"steps": 0},
    }
    run.add_metrics("fit", metrics)
    log.info("fit written to %s (stage 1 %.1f s, stage 2 %.1f s)", run.path / "perfit", stage1_s, stage2_s)
    return FitStageResult(run, run.path / "perfit", metrics)


def _open_run(out: Path, config: FitConfig, loaded: LoadedModel, rank: int) -> RunDir:
    """The run directory: created (or the fit recorded in it) by rank 0, which also clears a
    stale exchange directory; opened as it is by the other ranks."""
    if rank != 0:
        return RunDir(out)
    if (out / "run.json").exists():
        run = RunDir.open(out)
        run.add_stage("fit", config)
    else:
        run = RunDir.create(out, "fit", config, config.seed, loaded.identity)
    shutil.rmtree(out / "perfit.exchange", ignore_errors=True)
    return run


def _merge_personal(exchange: Path, rank: int, world_size: int, personal: InterventionBank | None,
                    curve: pd.DataFrame, split: Split, loaded: LoadedModel,
                    config: FitConfig) -> tuple[InterventionBank | None, pd.DataFrame]:
    """Each rank saves its stage-2 shard into ``exchange``; rank 0 returns the merged bank (in
    the split's test-user order) and curves, the other ranks ``(None, empty)``."""
    shard_dir = exchange / "shards" / f"rank{rank}"
    if personal is not None:
        save_bank(personal, shard_dir, loaded.identity, {"stage": "personal", "stacking": config.stacking})
        atomic_write_text(shard_dir / "curve.csv", curve.to_csv(index=False))
    barrier(world_size)
    if rank != 0:
        return None, pd.DataFrame()
    shards, curves = [], []
    for r in range(world_size):
        directory = exchange / "shards" / f"rank{r}"
        if (directory / "intervention.json").exists():
            shards.append(load_bank(directory, loaded.identity)[0])
            curves.append(pd.read_csv(directory / "curve.csv", dtype={"user_id": str}))
    merged = InterventionBank.concat(shards)
    return merged.subset(list(split.test_users)).to(loaded.device), pd.concat(curves, ignore_index=True)


def _write_fit(directory: Path, config: FitConfig, split: Split, collective: InterventionBank,
               personal: InterventionBank | None, curves: pd.DataFrame, params: dict,
               specs: tuple[BankSpec, BankSpec], loaded: LoadedModel) -> None:
    """``RUN/perfit/`` as a whole, with its checksums (see the module docstring)."""
    with staged_dir(directory) as pdir:  # the previous fit stays until this one is whole
        split.save(pdir / "split.json")
        write_json(pdir / "task.json", config.task_json())
        save_bank(collective, pdir / "stage1", loaded.identity, {"stage": "collective"})
        if personal is not None:
            save_bank(personal, pdir / "bank", loaded.identity, {"stage": "personal", "stacking": config.stacking})
        atomic_write_text(pdir / "curves.csv", curves.to_csv(index=False))
        write_json(pdir / "params.json", {**params, "spec_collective": specs[0].to_dict(),
                                          "spec_personal": specs[1].to_dict(), "stacking": config.stacking,
                                          "personal_init": config.personal_init, "config": asdict(config)})
        write_checksums(pdir, FIT_FILES)
