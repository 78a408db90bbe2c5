"""Reading a fitted run directory back: the task, split, banks and settings later stages need.

``load_fitted_run`` reloads what ``perfit-probe fit`` wrote under ``RUN/perfit/`` (checked
against its checksums and the model); ``fit_selection`` and ``fit_fingerprint`` give the
fit's stage-2 model selection and a fingerprint that changes whenever the fit does;
``prompt_settings`` the prompts as ``evaluate`` built them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from perfit_probe._io import file_sha256, read_json, verify_checksums
from perfit_probe.config import PersonalData
from perfit_probe.data import load_task
from perfit_probe.data.records import TaskData
from perfit_probe.data.splits import Split
from perfit_probe.errors import ArtifactError, ConfigError
from perfit_probe.evaluation.interpret import PromptSettings
from perfit_probe.interventions import PerFit
from perfit_probe.interventions.artifact import TENSOR_FILE, load_perfit, perfit_dir
from perfit_probe.models import LoadedModel
from perfit_probe.stages.rundir import RunDir


@dataclass
class FittedRun:
    """What evaluation and steering read from a fitted run directory."""

    task: TaskData
    """The task, reloaded with the fit's load options (``RUN/perfit/task.json``)."""
    split: Split
    """Train/test users and held-out queries (``RUN/perfit/split.json``)."""
    perfit: PerFit
    """The fitted banks (``RUN/perfit/stage1``, ``RUN/perfit/bank``)."""
    prompt_options: dict
    """``k``, ``retriever``, ``chat`` of the fit's prompts."""
    personal: PersonalData
    """What the fit's stage 2 trained on (the per-user LoRA baselines train on the same)."""
    costs: dict
    """``stage1_train_s`` and ``stage2_train_s_per_user`` when the fit recorded them."""


_LOAD_KEYS = {"name": ("name", "task"), "path": ("path", "task_path"), "outputs": ("outputs", "task_outputs"),
              "n_users": ("n_users",), "seed": ("seed",), "max_queries": ("max_queries",)}


def _first(mapping: dict, keys: Sequence[str]):
    for key in keys:
        if key in mapping and not isinstance(mapping[key], dict):
            return mapping[key]
    return None


def task_load_options(data: dict) -> tuple[dict, dict]:
    """``load_task`` keyword arguments and prompt options from a fit's ``task.json``.

    Accepts a flat mapping (``task``/``name``, ``task_path``/``path``, ``n_users``, ``k``, ...)
    or one nested under ``load``/``task`` and ``prompts``.
    """
    load = data.get("load") if isinstance(data.get("load"), dict) else \
        data.get("task") if isinstance(data.get("task"), dict) else data
    prompts = data.get("prompts") if isinstance(data.get("prompts"), dict) else data
    kwargs = {key: _first(load, names) for key, names in _LOAD_KEYS.items()}
    if not kwargs["name"]:
        raise ConfigError("task.json of the fit names no task: re-run `perfit-probe fit`")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    options = {k: prompts[k] for k in ("k", "retriever", "chat") if k in prompts}
    return kwargs, options


def _fit_costs(run_dir: Path, n_users: int) -> dict:
    """Training times the fit recorded in ``metrics.json`` (keys looked up leniently)."""
    metrics = RunDir(run_dir).metrics()
    fit = metrics.get("fit", {}) if isinstance(metrics.get("fit"), dict) else {}
    timings = metrics.get("timings", {})
    out = {}
    for key, names in (("stage1_train_s", ("stage1_train_s", "stage1_s", "collective_s")),
                       ("stage2_train_s", ("stage2_train_s", "stage2_s", "personal_s"))):
        value = _first(fit, names)
        if value is None:
            value = _first(timings, names)
        if value is not None:
            out[key] = float(value)
    per_user = _first(fit, ("stage2_train_s_per_user",))
    if per_user is not None:
        out["stage2_train_s_per_user"] = float(per_user)
    elif "stage2_train_s" in out and n_users:
        out["stage2_train_s_per_user"] = out["stage2_train_s"] / n_users
    return out


def load_fitted_run(run_dir: Path, loaded: LoadedModel) -> FittedRun:
    """Reload the task, split and fitted interventions of ``run_dir`` (checked against the model)."""
    directory = perfit_dir(Path(run_dir))
    verify_checksums(directory, ("split.json", "task.json"), error=ArtifactError,
                     fix="refit with `perfit-probe fit --force`")
    recorded = read_json(directory / "task.json")
    kwargs, options = task_load_options(recorded)
    personal = PersonalData(**recorded["personal"]) if isinstance(recorded.get("personal"), dict) else \
        PersonalData(source="queries")
    name = kwargs.pop("name")
    task = load_task(name, **kwargs)
    split = Split.load(directory / "split.json")
    perfit = load_perfit(directory, loaded)
    return FittedRun(task, split, perfit, options, personal, _fit_costs(Path(run_dir), len(split.test_users)))


def fit_selection(run_dir: Path) -> tuple[int, int]:
    """The fit's stage-2 model selection: ``(val_per_user, seed)`` from ``RUN/perfit/params.json``
    (the fit's config), the seed else from ``task.json``; ``(0, 0)`` for fits that recorded none."""
    directory = perfit_dir(Path(run_dir))
    params = directory / "params.json"
    recorded = read_json(params).get("config", {}) if params.is_file() else {}
    seed = recorded.get("seed")
    if seed is None and (directory / "task.json").is_file():
        seed = (read_json(directory / "task.json").get("load") or {}).get("seed")
    return int(recorded.get("val_per_user") or 0), int(seed or 0)


def fit_fingerprint(run_dir: Path) -> str:
    """SHA-256 prefix over the fit's split, task and banks: changes whenever the fit does."""
    directory = perfit_dir(Path(run_dir))
    digest = hashlib.sha256()
    for rel in ("split.json", "task.json", f"stage1/{TENSOR_FILE}", f"bank/{TENSOR_FILE}"):
        path = directory / rel
        digest.update(f"{rel}:{file_sha256(path) if path.is_file() else '-'}\n".encode())
    return digest.hexdigest()[:16]


def prompt_settings(run_dir: Path) -> PromptSettings:
    """The run's prompt settings: ``RUN/perfit/task.json``'s prompts, overridden by what the last
    ``evaluate`` stage recorded in ``run.json`` (non-null values), as ``evaluate`` resolves them."""
    run = RunDir.open(run_dir)
    recorded = read_json(perfit_dir(run.path) / "task.json")
    _, options = task_load_options(recorded)
    prompts = recorded.get("prompts") if isinstance(recorded.get("prompts"), dict) else {}
    values = {"k": options.get("k"), "retriever": options.get("retriever"), "chat": options.get("chat"),
              "max_prompt_tokens": prompts.get("max_prompt_tokens"),
              "seed": (recorded.get("load") or {}).get("seed")}
    evaluations = [s for s in run.info().get("stages", []) if s.get("command") == "evaluate"]
    if evaluations:
        config = evaluations[-1].get("config") or {}
        values.update({key: config[key] for key in ("k", "retriever", "chat", "seed") if config.get(key) is not None})
        if "max_prompt_tokens" in config:  # evaluate's own value, None included
            values["max_prompt_tokens"] = config["max_prompt_tokens"]
    defaults = PromptSettings()
    for key in ("k", "retriever", "seed"):
        if values[key] is None:
            values[key] = getattr(defaults, key)
    return PromptSettings(**values)
