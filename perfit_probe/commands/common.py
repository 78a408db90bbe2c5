"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from perfit_probe.models import LoadedModel, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--cache-dir``, ``--offline``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2",
                       help="'smollm2' (embedded default), a local HF model dir, a .gguf file or a hub id")
    group.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    group.add_argument("--cache-dir", type=Path,
                       default=Path(os.environ.get("PERFIT_PROBE_CACHE", Path.home() / ".cache" / "perfit_probe")),
                       help="where converted model weights are cached (env PERFIT_PROBE_CACHE)")
    group.add_argument("--offline", action="store_true",
                       default=os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
                       help="never try the network for hub ids (default from HF_HUB_OFFLINE)")


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    """Load the model that ``add_model_arguments`` options describe (no weight-loading bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_model(args.model, dtype=args.dtype, device=args.device,
                      cache_dir=args.cache_dir, offline=args.offline)
