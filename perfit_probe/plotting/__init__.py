"""Figures as pure functions of saved results (CSV / safetensors) to matplotlib figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def save_figures(makers: dict[str, tuple[Callable, bool]], figures_dir: Path, dpi: int = 120) -> list[Path]:
    """Write ``figures_dir/{name}.png`` for each ``name -> (make, available)`` whose data is
    available (``make()`` returns the figure); log the skipped ones. Returns the written paths."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (make, available) in makers.items():
        if not available:
            log.info("no %s data: figure skipped", name)
            continue
        path = figures_dir / f"{name}.png"
        make().savefig(path, dpi=dpi)
        written.append(path)
    return written
