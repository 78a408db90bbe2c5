"""The pipeline's configuration: one run directory, cache -> deltas -> analysis -> fit -> evaluate -> steer -> interpret.

A pipeline is described by a ``PipelineConfig``: a ``[model]`` and a ``[task]`` section shared
by every stage, and one section per stage whose keys are the fields of that stage's own config
dataclass (``CacheConfig``, ``AnalysisConfig``, ``FitConfig``, ``EvalConfig``, ``SteerConfig``).
``perfit-probe run CONFIG.toml`` reads it from TOML; ``perfit-probe demo`` builds it from the
embedded defaults (``demo_config``). Unknown sections or keys, and values of the wrong type,
are refused with a one-line error, so a typo never silently falls back to a default. Every
stage's configuration is checked (against the model too: layers, ranks, sites) before the
first stage runs (``check_stage_configs``), so a bad ``[fit]`` never fails after a long cache.

``perfit_probe.stages.pipeline`` runs a pipeline (``run_pipeline``) or the same pipeline once
per seed (``run_seeds``, with ``seed_config``: the seed of the task, the split and every stage).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perfit_probe.errors import ConfigError


STAGES = ("cache", "analyze", "fit", "evaluate", "steer", "interpret")
"""Stages in the order they run; each reads what the earlier ones wrote."""


@dataclass
class PipelineConfig:
    """A full pipeline run: shared model/task options and per-stage overrides."""

    model: dict = field(default_factory=lambda: {"name": "smollm2", "dtype": "float32", "device": "cpu"})
    """``name`` (alias, local dir, .gguf or hub id), ``dtype``, ``device``."""
    task: dict = field(default_factory=lambda: {"name": "movielens", "n_users": 24, "seed": 0})
    """``name``, ``path``, ``outputs``, ``n_users``, ``max_queries``, ``seed``, and the prompt
    options ``k``, ``retriever``, ``chat`` (shared by cache and fit)."""
    stages: tuple[str, ...] = STAGES
    """Which stages to run (in pipeline order)."""
    cache: dict = field(default_factory=dict)
    """Overrides of ``perfit_probe.cache.CacheConfig``."""
    analyze: dict = field(default_factory=dict)
    """Overrides of ``perfit_probe.analysis.tables.AnalysisConfig``."""
    fit: dict = field(default_factory=dict)
    """Overrides of ``perfit_probe.interventions.fit.FitConfig``."""
    evaluate: dict = field(default_factory=dict)
    """Overrides of ``perfit_probe.evaluation.evaluate.EvalConfig``."""
    steer: dict = field(default_factory=dict)
    """Overrides of ``perfit_probe.evaluation.steer.SteerConfig``."""
    interpret: dict = field(default_factory=dict)
    """Overrides of ``perfit_probe.evaluation.interpret.InterpretConfig``."""

    def __post_init__(self) -> None:
        if isinstance(self.stages, str) or not isinstance(self.stages, (list, tuple)):
            raise ConfigError(f"stages must be a list of stage names such as {list(STAGES[:2])}, "
                              f"got {type(self.stages).__name__} {self.stages!r}")
        self.stages = tuple(self.stages)
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}: choose from {list(STAGES)}")
        for section, expected in (("model", _MODEL_TYPES), ("task", _TASK_TYPES)):
            values = getattr(self, section)
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table, got {type(values).__name__}")
            _check_keys(section, values, tuple(expected))
            for key, value in values.items():
                _coerce(value, expected[key], f"[{section}] {key}")


_MODEL_TYPES = {"name": str, "dtype": str, "device": str}
"""Keys of ``[model]`` and their types."""
_TASK_TYPES = {"name": str, "path": Path | None, "outputs": Path | None, "n_users": int | None,
               "max_queries": int | None, "seed": int, "k": int, "retriever": str, "chat": bool | None}
"""Keys of ``[task]`` and their types."""


def demo_config(n_users: int = 24, model: str = "smollm2", device: str = "cpu", n_layers: int = 30) -> PipelineConfig:
    """The embedded demo: SmolLM2 on MovieLens ratings, sized for under 15 min on 2 CPU cores.

    Costs are set by users x queries x prompt length; ``--users`` scales them. Sites are
    placed at fixed fractions of the depth (for SmolLM2's 30 layers: cache at layers
    2, 5, ..., 20, interventions at 8 and 14), so the same demo runs on any model.
    """
    from perfit_probe.data.records import VARIANTS

    cache_sites = sorted({min(n_layers - 1, round(n_layers * f)) for f in (0.07, 0.17, 0.27, 0.37, 0.47, 0.57, 0.67)})
    fit_layers = tuple(sorted({min(n_layers - 1, int(n_layers * f)) for f in (0.27, 0.47)}))
    return PipelineConfig(
        model={"name": model, "dtype": "float32", "device": device},
        task={"name": "movielens", "n_users": n_users, "seed": 0, "k": 4, "retriever": "bm25"},
        # Every prompt variant, the format-matched controls of claims 1-2 included (one more
        # forward pass per query each).
        cache={"max_queries": 6, "sites": [str(layer) for layer in cache_sites], "batch_size": 16,
               "variants": list(VARIANTS)},
        analyze={"n_boot": 100, "n_perm": 100},
        # Stage 1 on the train users' queries; stage 2 on each test user's 12 latest rated movies
        # other than its 6 held-out queries (OPPU's protocol), 3 of them picking its stage-2
        # epoch (0 = stage 1 alone); 2 stage-2 epochs, as the paper and OPPU's per-user step.
        fit={"max_queries": 12, "n_heldout": 6, "max_profile_examples": 12, "layers": fit_layers,
             "positions": "l2", "collective_rank": 8, "personal_rank": 4, "epochs1": 2, "epochs2": 2,
             "batch_size": 8, "max_prompt_tokens": 160, "val_per_user": 3},
        # OPPU's per-user LoRA at its rank 8 on q/v and its 2 epochs; its lr (1e-4 on a 7B model)
        # barely moves a 135M model in a few steps, so the demo gives it the same order of lr as PerFit.
        evaluate={"max_prompt_tokens": 256, "lora": {"lr": 1e-3, "epochs": 2},
                  "lora_task": {"lr": 1e-3, "epochs": 2}},
        # The checks' defaults: 60 swap pairs, 50 random ablation subspaces, alpha 0, 0.25, ..., 3
        # (every intervention runs on the edited suffix of shared prompt prefixes).
        steer={},
    )


def load_pipeline_config(path: Path | str) -> PipelineConfig:
    """Read a pipeline TOML file; unknown sections and keys are refused."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(known)}")
    base = PipelineConfig()
    merged = {
        "model": {**base.model, **data.get("model", {})},
        "task": {**base.task, **data.get("task", {})},
        "stages": data.get("stages", STAGES),
    }
    for stage in STAGES:
        merged[stage] = dict(data.get(stage, {}))
    return PipelineConfig(**merged)


def _check_keys(section: str, values: dict, allowed: tuple[str, ...]) -> None:
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ConfigError(f"[{section}]: unknown key(s) {bad}; allowed: {list(allowed)}")


def _type_name(annotation: Any) -> str:
    """A type as a config file's reader names it (``an integer``, ``a list of strings``)."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             Path: "a path (string)", dict: "a table"}
    if annotation in names:
        return names[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list):
        return f"a list, each {_type_name(args[0])}" if args and args[0] is not Ellipsis else "a list"
    if dataclasses.is_dataclass(annotation):
        return f"a table of {annotation.__name__} fields"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return str(annotation)


def _coerce(value: Any, annotation: Any, where: str = "value") -> Any:
    """A TOML value as a dataclass field's type (lists -> tuples, strings -> paths, integers ->
    floats); ``ConfigError`` naming ``where`` when the value has the wrong type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None or annotation is Any:
        return value
    wrong = ConfigError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise wrong
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise wrong
        hints = typing.get_type_hints(annotation)
        bad = sorted(set(value) - set(hints))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} for {annotation.__name__}")
        try:
            return annotation(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in value.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise wrong
        return Path(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong
        inner = args[0] if args and args[0] is not Ellipsis else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if annotation is int:
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if annotation in (str, dict) and not isinstance(value, annotation):
        raise wrong
    return value


def build_stage_config(cls: type, section: str, values: dict, shared: dict) -> Any:
    """``cls()`` with the shared values it has fields for, then the section's overrides."""
    hints = typing.get_type_hints(cls)
    names = set(hints)
    bad = sorted(set(values) - names)
    if bad:
        raise ConfigError(f"[{section}]: unknown key(s) {bad}; see the fields of {cls.__name__}")
    merged = {**{k: v for k, v in shared.items() if k in names}, **values}
    kwargs = {k: _coerce(v, hints[k], f"[{section}] {k}") for k, v in merged.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}]: {exc}") from None


def check_stage_configs(resolved: dict[str, Any], stages: tuple[str, ...], loaded=None) -> None:
    """Every check of the configured ``stages`` that can be made before the first one runs:
    each config's own ``validate`` and, with the model ``loaded``, layers, ranks and sites.

    A ``ConfigError`` (or ``SiteError``) here means nothing has been written yet.
    """
    from perfit_probe.interventions.fit import bank_specs

    for stage in stages:
        validate = getattr(resolved[stage], "validate", None)
        if validate is not None:
            validate()
    if "analyze" in stages:
        n_users = resolved["cache"].n_users
        if n_users is not None and n_users < 2:
            raise ConfigError(f"the shift analysis needs at least 2 users, the task gives n_users={n_users}")
    held = resolved["fit"].n_heldout
    if {"evaluate", "steer", "interpret"} & set(stages) and held is not None and held < 1:
        raise ConfigError("evaluate, steer and interpret score held-out queries: give [fit] n_heldout >= 1 "
                          "(or leave it unset: every query of a test user)")
    if loaded is not None:
        if "cache" in stages:
            resolved["cache"].validate(loaded.n_layers)
        if "fit" in stages:
            bank_specs(resolved["fit"], loaded)


def stage_configs(config: PipelineConfig) -> dict[str, Any]:
    """The resolved config dataclass of every stage."""
    from perfit_probe.analysis.tables import AnalysisConfig
    from perfit_probe.cache import CacheConfig
    from perfit_probe.evaluation.evaluate import EvalConfig
    from perfit_probe.evaluation.interpret import InterpretConfig
    from perfit_probe.evaluation.steer import SteerConfig
    from perfit_probe.interventions.fit import FitConfig

    task, model = config.task, config.model
    seed = int(task.get("seed", 0))
    common = {"task": task.get("name", "movielens"), "task_path": task.get("path"),
              "task_outputs": task.get("outputs"), "n_users": task.get("n_users"), "seed": seed,
              "max_queries": task.get("max_queries"), "model": model.get("name", "smollm2"),
              "device": model.get("device", "cpu")}
    prompts = {k: task[k] for k in ("k", "retriever", "chat") if k in task}
    return {
        "cache": build_stage_config(CacheConfig, "cache", config.cache,
                                    {**common, **prompts, "dtype": model.get("dtype", "float32")}),
        "analyze": build_stage_config(AnalysisConfig, "analyze", config.analyze, {"seed": seed}),
        "fit": build_stage_config(FitConfig, "fit", config.fit,
                                  {**common, **prompts, "dtype": model.get("dtype", "float32")}),
        "evaluate": build_stage_config(EvalConfig, "evaluate", config.evaluate, {"seed": seed, **prompts}),
        "steer": build_stage_config(SteerConfig, "steer", config.steer, {"seed": seed}),
        "interpret": build_stage_config(InterpretConfig, "interpret", config.interpret, {"seed": seed}),
    }


def seed_config(config: PipelineConfig, seed: int) -> PipelineConfig:
    """A copy of ``config`` whose task and every stage run with ``seed`` (a stage section's own
    ``seed`` is replaced too, so one number sets them all)."""
    sections = {stage: {**getattr(config, stage), **({"seed": seed} if "seed" in getattr(config, stage) else {})}
                for stage in STAGES}
    return dataclasses.replace(config, model=dict(config.model), task={**config.task, "seed": seed}, **sections)
