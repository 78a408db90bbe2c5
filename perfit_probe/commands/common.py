"""What several sub-commands share: loading the model their options describe."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, TypeVar

from tyro.conf import Positional, arg

from perfit_probe.config import ModelFields, ModelSource, RecordedModel
from perfit_probe.models import LoadedModel, default_cache_dir, load_model
from perfit_probe.stages.rundir import RunDir

T = TypeVar("T")
Flat = Annotated[T, arg(name="")]
"""A command parameter whose config fields are options of their own (``--k``, not ``--config.k``)."""
RunDirArg = Annotated[Path, Positional, arg(metavar="RUN_DIR")]
"""The run directory a command works on, its first positional argument."""


def recorded_model(run_dir: Path) -> dict:
    """``name``, ``dtype`` and ``device`` of the model a run directory was made with (None if
    unrecorded; ``RunDir.model_options``)."""
    return RunDir.open(run_dir).model_options()


def load_cli_model(model: ModelFields | RecordedModel, source: ModelSource, run_dir: Path | None = None,
                   device: str | None = None) -> LoadedModel:
    """Load the model that a command's options describe (no weight-loading bars).

    Options left unset (``RecordedModel``'s None) take the values recorded in ``run_dir``'s
    ``run.json``, then ``ModelFields``'s defaults; ``device`` (a torchrun rank's) overrides.
    ``source``'s unset cache directory reads ``$PERFIT_PROBE_CACHE``; ``$HF_HUB_OFFLINE`` set means offline.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    wanted = (model.model, model.dtype, model.device)
    recorded = recorded_model(run_dir) if run_dir is not None and None in wanted else {}
    defaults = ModelFields()
    cache_dir = source.cache_dir or Path(os.environ.get("PERFIT_PROBE_CACHE", default_cache_dir()))
    offline = source.offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    return load_model(model.model or recorded.get("name") or defaults.model,
                      dtype=model.dtype or recorded.get("dtype") or defaults.dtype,
                      device=device or model.device or recorded.get("device") or defaults.device,
                      cache_dir=cache_dir, offline=offline)
