"""Self-describing run directories, shared by every command.

A run directory holds::

    run.json        what ran: command, resolved config, seed, model identity, versions, times
    metrics.json    headline numbers, merged in by each stage (``RunDir.add_metrics``)
    ...             the stage's artifacts (caches, CSVs, safetensors, figures, reports)

Files are written atomically (temporary file, then rename), so a killed run never leaves a
half-written JSON or CSV behind, and existing results are never overwritten by a failing
stage. A stage that writes a whole directory (``perfit/`` of a fit, ``deltas/``) writes it
through :func:`staged_dir`: into ``NAME.tmp-<pid>`` next to it, swapped into place only when
complete, so an interrupted ``--force`` rerun keeps the previous result.

Artifacts a later stage reads carry SHA-256 checksums in a ``checksums.json`` beside them
(:func:`write_checksums`), verified when they are read back (:func:`verify_checksums`), so a
corrupted file is refused instead of silently changing later numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import perfit_probe
from perfit_probe.errors import ConfigError, PerfitError

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = (
    "torch", "transformers", "transformer-lens", "nnsight", "numpy", "scipy",
    "scikit-learn", "pandas", "safetensors", "peft", "gguf",
)


def package_versions() -> dict[str, str]:
    """Installed versions of perfit-probe and the libraries that shape its numbers."""
    out = {"perfit-probe": perfit_probe.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) once; return a torch generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, numpy and torch scalars to plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """Read JSON, with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents, read in ``chunk``-byte pieces (any size, bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


CHECKSUM_FILE = "checksums.json"
"""Name of the file holding the SHA-256 of a directory's artifacts (``{relative path: hex}``)."""


def write_checksums(directory: Path, names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Record the SHA-256 of ``directory/name`` for each name in ``directory/checksums.json``.

    Entries for other names already in the file are kept (and dropped when their file is
    gone), so several writers may add to one directory's checksums. Returns the entries.
    """
    directory = Path(directory)
    path = directory / CHECKSUM_FILE
    entries = {}
    if path.is_file():
        try:
            entries = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items()
                       if (directory / k).is_file()}
        except (json.JSONDecodeError, AttributeError):
            entries = {}
    for name in names:
        entries[str(name)] = file_sha256(directory / name)
    write_json(path, dict(sorted(entries.items())))
    return entries


def verify_checksums(directory: Path, names: list[str] | tuple[str, ...] | None = None, *,
                     error: type[PerfitError] = ConfigError, fix: str = "recompute it") -> None:
    """Check ``directory``'s files against its ``checksums.json``; raise ``error`` on a mismatch.

    ``names``: the files to check (default: every recorded one); a name without a recorded
    checksum is refused too, unless the directory has no ``checksums.json`` at all (made by
    an older perfit-probe: accepted with a warning). ``fix`` ends the message (what to do).
    """
    directory = Path(directory)
    path = directory / CHECKSUM_FILE
    if not path.is_file():
        log.warning("%s has no %s (written by an older perfit-probe): its files are not verified",
                    directory, CHECKSUM_FILE)
        return
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            raise ValueError
    except (json.JSONDecodeError, ValueError, UnicodeDecodeError):
        raise error(f"{path} is malformed: {fix}") from None
    for name in entries if names is None else names:
        file = directory / name
        if name not in entries:
            raise error(f"{file} has no recorded checksum in {path}: {fix}")
        if not file.is_file():
            raise error(f"{file} is missing: {fix}")
        if file_sha256(file) != entries[name]:
            raise error(f"{file} is corrupt (SHA-256 differs from {CHECKSUM_FILE}): {fix}")


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
