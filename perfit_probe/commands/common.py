"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from perfit_probe.models import LoadedModel, load_model
from perfit_probe.stages.rundir import RunDir


def csv_items(text: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty, stripped items."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


TASK_PATH_HELP = ("data of the task: a LaMP questions file or OPPU per-user file (JSON), or the directory "
                  "holding the MovieLens parquet files (default: the embedded MovieLens)")
"""Help of ``--task-path`` (``cache`` and ``fit``)."""
MAX_QUERIES_HELP = "queries per user at most (0: no cap beyond the task's own: MovieLens 40, synthetic 12, LaMP all)"
"""Help of ``--max-queries`` (``cache`` and ``fit``); the meaning is ``perfit_probe.data.query_cap``'s."""


def add_model_arguments(parser: argparse.ArgumentParser, from_run: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--cache-dir``, ``--offline``.

    ``from_run``: the command works on an existing run directory, and ``--model``,
    ``--dtype`` and ``--device`` default to what its ``run.json`` records.
    """
    recorded = " (default: as recorded in RUN_DIR/run.json)" if from_run else ""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None if from_run else "smollm2",
                       help="'smollm2' (embedded default), a local HF model dir, a .gguf file or a hub id"
                       + recorded)
    group.add_argument("--dtype", default=None if from_run else "float32",
                       help="float32, bfloat16, float16 or auto" + recorded)
    group.add_argument("--device", default=None if from_run else "cpu", help="cpu, cuda, cuda:N or auto" + recorded)
    group.add_argument("--cache-dir", type=Path,
                       default=Path(os.environ.get("PERFIT_PROBE_CACHE", Path.home() / ".cache" / "perfit_probe")),
                       help="where converted model weights are cached (env PERFIT_PROBE_CACHE)")
    group.add_argument("--offline", action="store_true",
                       default=os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
                       help="never try the network for hub ids (default from HF_HUB_OFFLINE)")


def recorded_model(run_dir: Path) -> dict:
    """``name``, ``dtype`` and ``device`` of the model a run directory was made with (None if unrecorded).

    Reads ``run.json``: the model identity, and the dtype and device of a ``fit`` run's
    config or of a pipeline run's ``[model]`` table.
    """
    return RunDir.open(run_dir).model_options()


def model_from_args(args: argparse.Namespace, run_dir: Path | None = None) -> LoadedModel:
    """Load the model that ``add_model_arguments`` options describe (no weight-loading bars).

    Options left unset (``from_run``) take the values recorded in ``run_dir``'s ``run.json``,
    then the defaults (``smollm2``, ``float32``, ``cpu``).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    recorded = recorded_model(run_dir) if run_dir is not None and None in (args.model, args.dtype, args.device) else {}
    name = args.model or recorded.get("name") or "smollm2"
    dtype = args.dtype or recorded.get("dtype") or "float32"
    device = args.device or recorded.get("device") or "cpu"
    return load_model(name, dtype=dtype, device=device, cache_dir=args.cache_dir, offline=args.offline)
