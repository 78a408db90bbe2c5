"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from perfit_probe.models import LoadedModel, load_model


def csv_items(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty, stripped items."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_model_arguments(parser: argparse.ArgumentParser, from_run: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--cache-dir``, ``--offline``.

    ``from_run``: the command works on an existing run directory, and ``--model`` defaults to
    the model recorded in its ``run.json``.
    """
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None if from_run else "smollm2",
                       help="'smollm2' (embedded default), a local HF model dir, a .gguf file or a hub id"
                       + (" (default: the model recorded in RUN_DIR/run.json)" if from_run else ""))
    group.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    group.add_argument("--cache-dir", type=Path,
                       default=Path(os.environ.get("PERFIT_PROBE_CACHE", Path.home() / ".cache" / "perfit_probe")),
                       help="where converted model weights are cached (env PERFIT_PROBE_CACHE)")
    group.add_argument("--offline", action="store_true",
                       default=os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
                       help="never try the network for hub ids (default from HF_HUB_OFFLINE)")


def model_from_args(args: argparse.Namespace, run_dir: Path | None = None) -> LoadedModel:
    """Load the model that ``add_model_arguments`` options describe (no weight-loading bars).

    Without ``--model``, the model recorded in ``run_dir``'s ``run.json`` is loaded.
    """
    from transformers.utils import logging as hf_logging

    from perfit_probe.rundir import RunDir

    hf_logging.disable_progress_bar()
    name = args.model
    if name is None:
        recorded = RunDir.open(run_dir).info().get("model") or {}
        name = recorded.get("name") or "smollm2"
    return load_model(name, dtype=args.dtype, device=args.device,
                      cache_dir=args.cache_dir, offline=args.offline)
