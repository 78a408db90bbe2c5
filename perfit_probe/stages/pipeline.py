"""Running a pipeline: the configured stages, one after another, into one run directory.

``run_pipeline`` checks every stage's configuration (``perfit_probe.pipeline``) before the
first stage runs, runs the stages in order (``RUNNERS``: each stage's ``run(config, run_dir,
loaded)``), then writes ``claims.csv``/``claims.md`` and ``report.md``
(``perfit_probe.stages.report``), which links every stage's report, table and figure.

``run_seeds`` runs the same pipeline once per seed (``seed_config``: the seed of the task,
the split and every stage), each into ``OUT/seed{s}/``, then writes the spread of every
headline number across seeds into ``OUT/seeds_summary.{csv,md,json}``
(``perfit_probe.stages.seed_summary``).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from perfit_probe._io import atomic_write_text
from perfit_probe._repro import seed_everything
from perfit_probe.config import STAGES, PipelineConfig, seed_config, stage_configs
from perfit_probe.data.tasks import task_spec
from perfit_probe.errors import ConfigError
from perfit_probe.models import LoadedModel, load_model
from perfit_probe.pipeline import check_capability, check_stage_configs
from perfit_probe.stages import analyze, cache, evaluate, fit, interpret, steer
from perfit_probe.stages.pooled import write_pooled
from perfit_probe.stages.report import render_report, write_claims
from perfit_probe.stages.rundir import RunDir
from perfit_probe.stages.seed_summary import seed_summary, write_seed_summary

log = logging.getLogger(__name__)

RUNNERS: dict[str, Callable[..., object]] = {
    "cache": cache.run,
    "analyze": analyze.run,
    "fit": fit.run,
    "evaluate": evaluate.run,
    "steer": steer.run,
    "interpret": interpret.run,
}
"""Each stage's ``run(config, run_dir, loaded, *, progress)``, by the names of ``pipeline.STAGES``."""


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_pipeline(
    config: PipelineConfig,
    out: Path | str,
    loaded: LoadedModel | None = None,
    *,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> RunDir:
    """Run the configured stages into ``out`` and write ``report.md``; return the run directory.

    ``loaded``: the model (default: the one ``config.model`` names). ``announce`` receives one
    line per stage start/end (the CLI prints them); without it they are logged.
    """
    say = announce or log.info
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run directory {out} already exists and is not empty: choose another --out")
    resolved = stage_configs(config)  # validates every section before any work
    check_stage_configs(resolved, config.stages)
    check_capability(config.capability)
    seed = config.task.seed
    seed_everything(seed)
    start = time.perf_counter()
    if loaded is None:
        say(f"loading model {config.model.name!r}")
        loaded = load_model(config.model.name, dtype=config.model.dtype, device=config.model.device)
    check_stage_configs(resolved, config.stages, loaded)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for index, stage in enumerate(s for s in STAGES if s in config.stages):
        say(f"[{index + 1}/{len(config.stages)}] {stage} ...")
        t0 = time.perf_counter()
        RUNNERS[stage](resolved[stage], out, loaded, progress=progress)
        timings[stage] = time.perf_counter() - t0
        say(f"[{index + 1}/{len(config.stages)}] {stage} done in {timings[stage]:.0f} s "
            f"(peak memory so far {peak_rss_gib():.2f} GiB)")
    total = time.perf_counter() - start
    run = RunDir.open(out)
    run.update_info(command="pipeline", config={"pipeline": config, "resolved": resolved})
    run.add_metrics("pipeline", {"stage_wall_s": timings, "total_wall_s": total,
                                 "peak_rss_gib": peak_rss_gib()})
    write_claims(run, resolved["fit"].task, config.capability)
    atomic_write_text(run.path / "report.md", render_report(run))
    return run


def run_seeds(
    config: PipelineConfig,
    out: Path | str,
    seeds: Sequence[int],
    loaded: LoadedModel | None = None,
    *,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> tuple[dict[int, RunDir], dict[str, Path]]:
    """Run the pipeline once per seed into ``out/seed{s}`` and summarise the runs across seeds.

    Returns the run directory of each seed and the paths of ``seeds_summary.csv``/``.md``/``.json``
    (keys ``csv``, ``md``, ``json``) written into ``out``, and of ``pooled/results.md`` (key
    ``pooled``; ``perfit_probe.stages.pooled``) when the seeds evaluated. The model is loaded once and shared.
    """
    say = announce or log.info
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ConfigError("give at least one seed (--seeds 0,1,2)")
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"seeds {seeds} repeat a seed: each seed gets its own run directory")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run directory {out} already exists and is not empty: choose another --out")
    configs = {seed: seed_config(config, seed) for seed in seeds}
    for seeded in configs.values():
        stage_configs(seeded)  # validates every section before any work
    if loaded is None:
        say(f"loading model {config.model.name!r}")
        loaded = load_model(config.model.name, dtype=config.model.dtype, device=config.model.device)
    runs = {}
    for index, seed in enumerate(seeds):
        say(f"== seed {seed} ({index + 1}/{len(seeds)}) into {out / f'seed{seed}'}")
        runs[seed] = run_pipeline(configs[seed], out / f"seed{seed}", loaded=loaded, progress=progress,
                                  announce=announce)
    summary = seed_summary({seed: run.metrics() for seed, run in runs.items()})
    paths = write_seed_summary(summary, out, {seed: run.path for seed, run in runs.items()})
    say(f"summary of {len(seeds)} seeds: {paths['md']}")
    pooled = write_pooled({seed: run.path for seed, run in runs.items()}, out, task_spec(config.task.name),
                          stage_configs(config)["evaluate"], capability=config.capability)
    if pooled is not None:
        paths["pooled"] = pooled / "results.md"
        say(f"the seeds' test users pooled: {paths['pooled']}")
    return runs, paths


def main_announce(line: str) -> None:  # pragma: no cover - used by the CLI only
    """Print a progress line to stdout (the CLI's ``announce``)."""
    print(line, file=sys.stdout, flush=True)
