"""Self-describing run directories, shared by every stage and command.

A run directory holds::

    run.json        what ran: command, resolved config, seed, model identity, versions, times
    metrics.json    headline numbers, merged in by each stage (``RunDir.add_metrics``)
    ...             the stage's artifacts (caches, CSVs, safetensors, figures, reports)

Files are written atomically (``perfit_probe._io``), so existing results are never
overwritten by a failing stage. A stage that writes a whole directory (``perfit/`` of a fit,
``deltas/``) writes it through :func:`staged_dir`: into ``NAME.tmp-<pid>`` next to it,
swapped into place only when complete, so an interrupted ``--force`` rerun keeps the previous
result.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from perfit_probe._io import read_json, to_jsonable, write_json
from perfit_probe._repro import package_versions
from perfit_probe.errors import ConfigError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Write a directory as a whole: yields ``NAME.tmp-<pid>`` (empty), renamed to ``path`` on success.

    The previous ``path``, if any, stays untouched until the block has finished: it is then
    moved aside to ``NAME.old-<pid>``, the new directory renamed into place, and the old one
    deleted. If the block raises (or is interrupted, ``KeyboardInterrupt`` included), the
    temporary directory is deleted and ``path`` is left as it was. Leftovers of a killed
    process (``NAME.tmp-<pid>`` of a dead pid) are deleted on entry, and a directory a kill
    left moved aside between the two renames is moved back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    for old in path.parent.glob(f"{path.name}.old-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, path)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f"{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class RunDir:
    """A run directory: ``RunDir.create`` for a new run, ``RunDir.open`` for an existing one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(
        cls,
        path: Path | str,
        command: str,
        config: Any,
        seed: int,
        model_identity: Any = None,
        exist_ok: bool = False,
    ) -> RunDir:
        """Create (or, with ``exist_ok``, reuse) a run directory and write ``run.json``."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not exist_ok:
            raise ConfigError(
                f"run directory {path} already exists and is not empty: choose another --out "
                "or pass --resume/--force"
            )
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        info = run.info() if (path / "run.json").exists() else {}
        stages = info.get("stages", [])
        stages.append({"command": command, "started": _now()})
        write_json(
            path / "run.json",
            {
                "command": info.get("command", command),
                "config": to_jsonable(config),
                "seed": seed,
                "model": to_jsonable(model_identity) if model_identity is not None else info.get("model"),
                "versions": package_versions(),
                "host": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                         "cuda": torch.cuda.is_available()},
                "stages": stages,
                "created": info.get("created", _now()),
            },
        )
        return run

    @classmethod
    def open(cls, path: Path | str) -> RunDir:
        """Open an existing run directory (it must contain ``run.json``)."""
        path = Path(path)
        if not (path / "run.json").is_file():
            raise ConfigError(f"{path} is not a perfit-probe run directory (no run.json)")
        return cls(path)

    def info(self) -> dict:
        """Contents of ``run.json``."""
        return read_json(self.path / "run.json")

    def update_info(self, **fields: Any) -> None:
        """Merge top-level fields into ``run.json``."""
        info = self.info()
        info.update(to_jsonable(fields))
        write_json(self.path / "run.json", info)

    def add_stage(self, command: str, config: Any = None) -> None:
        """Record that a later stage (analyze, fit, evaluate, ...) ran on this directory."""
        info = self.info()
        info.setdefault("stages", []).append(
            {"command": command, "started": _now(), "config": to_jsonable(config),
             "versions": package_versions()}
        )
        write_json(self.path / "run.json", info)

    def model_options(self) -> dict:
        """``name``, ``dtype`` and ``device`` of the model the run was made with (None if unrecorded).

        From ``run.json``: the model identity, and the dtype and device of a stage's config
        (``cache``, ``fit``) or of a pipeline run's ``[model]`` table.
        """
        info = self.info()
        config = info.get("config") or {}
        table = (config.get("pipeline") or {}).get("model") or {}
        return {"name": (info.get("model") or {}).get("name") or table.get("name"),
                "dtype": config.get("dtype") or table.get("dtype"),
                "device": config.get("device") or table.get("device")}

    def metrics(self) -> dict:
        """Contents of ``metrics.json`` (empty when none yet)."""
        path = self.path / "metrics.json"
        return read_json(path) if path.exists() else {}

    def add_metrics(self, section: str, values: dict) -> None:
        """Merge ``values`` under ``section`` of ``metrics.json``."""
        metrics = self.metrics()
        metrics[section] = to_jsonable(values)
        write_json(self.path / "metrics.json", metrics)

    def sub(self, name: str) -> Path:
        """A sub-directory of the run (created)."""
        path = self.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def timed(self, section: str) -> Iterator[dict]:
        """Time a block; its wall time is merged into ``metrics.json`` under ``timings``."""
        record: dict = {}
        start = time.perf_counter()
        yield record
        record["wall_s"] = time.perf_counter() - start
        metrics = self.metrics()
        metrics.setdefault("timings", {})[section] = record["wall_s"]
        write_json(self.path / "metrics.json", metrics)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
