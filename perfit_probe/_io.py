"""Files written whole and checked when read back: atomic writes, JSON, SHA-256 checksums.

Files are written atomically (temporary file in the same directory, then rename), so a killed
run never leaves a half-written JSON or CSV behind. Artifacts a later stage reads carry SHA-256
checksums in a ``checksums.json`` beside them (:func:`write_checksums`), verified when they are
read back (:func:`verify_checksums`), so a corrupted file is refused instead of silently
changing later numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perfit_probe.errors import ConfigError, PerfitError

log = logging.getLogger(__name__)


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
