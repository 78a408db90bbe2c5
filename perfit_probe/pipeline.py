"""The demo pipeline and the checks made before a pipeline's first stage runs.

A pipeline is described by a ``perfit_probe.config.PipelineConfig``: a ``[model]`` and a
``[task]`` section shared by every stage, and one section per stage whose keys are the fields of
that stage's own config (``CacheConfig``, ``AnalysisConfig``, ``FitConfig``, ``EvalConfig``,
``SteerConfig``, ``InterpretConfig``). ``perfit-probe run CONFIG.toml`` reads it from TOML
(``perfit_probe.config.load_pipeline_config``); ``perfit-probe demo`` builds it from the embedded
defaults (``demo_config``). Unknown sections or keys, and values of the wrong type, are refused
with a one-line error, so a typo never silently falls back to a default. Every stage's
configuration is checked (against the model too: layers, ranks, sites) before the first stage
runs (``check_stage_configs``), so a bad ``[fit]`` never fails after a long cache.

``perfit_probe.stages.pipeline`` runs a pipeline (``run_pipeline``) or the same pipeline once
per seed (``run_seeds``, with ``perfit_probe.config.seed_config``: the seed of the task, the
split and every stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perfit_probe.config import DEMO_FIT_RECIPE, PipelineConfig, demo_fit_layers, pipeline_config
from perfit_probe.data.records import VARIANTS
from perfit_probe.errors import ConfigError
from perfit_probe.interventions.fit import bank_specs


def demo_config(n_users: int = 24, model: str = "smollm2", device: str = "cpu", n_layers: int = 30,
                task: str = "movielens") -> PipelineConfig:
    """The embedded demo: SmolLM2 on MovieLens ratings, sized for under 15 min on 2 CPU cores.

    Costs are set by users x queries x prompt length; ``--users`` scales them. Sites are
    placed at fixed fractions of the depth (for SmolLM2's 30 layers: cache at layers
    2, 5, ..., 20, interventions at 8 and 14), so the same demo runs on any model. ``task``
    replaces MovieLens (``synthetic`` for a quick check).
    """
    cache_sites = sorted({min(n_layers - 1, round(n_layers * f)) for f in (0.07, 0.17, 0.27, 0.37, 0.47, 0.57, 0.67)})
    return pipeline_config(dict(
        model={"name": model, "dtype": "float32", "device": device},
        task={"name": task, "n_users": n_users, "seed": 0, "k": 4, "retriever": "bm25"},
        # Every prompt variant, the format-matched controls of claims 1-2 included (one more
        # forward pass per query each).
        cache={"max_queries": 6, "sites": [str(layer) for layer in cache_sites], "batch_size": 16,
               "variants": list(VARIANTS)},
        analyze={"n_boot": 100, "n_perm": 100},
        # Stage 1 on the train users' queries; stage 2 on each test user's 12 latest rated movies
        # other than its 6 held-out queries (OPPU's protocol), 3 of them picking its stage-2
        # epoch (0 = stage 1 alone); 2 stage-2 epochs, as the paper and OPPU's per-user step.
        fit={"max_queries": 12, "n_heldout": 6, "layers": demo_fit_layers(n_layers), **DEMO_FIT_RECIPE},
        # OPPU's per-user LoRA at its rank 8 on q/v and its 2 epochs; its lr (1e-4 on a 7B model)
        # barely moves a 135M model in a few steps, so the demo gives it the same order of lr as PerFit.
        evaluate={"max_prompt_tokens": 256, "lora": {"lr": 1e-3, "epochs": 2},
                  "lora_task": {"lr": 1e-3, "epochs": 2}},
        # The checks' defaults: 60 swap pairs, 50 random ablation subspaces, alpha 0, 0.25, ..., 3
        # (every intervention runs on the edited suffix of shared prompt prefixes).
        steer={},
    ))


def check_capability(path: Path | None) -> None:
    """A configured capability check's file must exist (``ConfigError`` before any work)."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"capability file {path} not found (analyses/capability.py writes one)")


def check_stage_configs(resolved: dict[str, Any], stages: tuple[str, ...], loaded=None) -> None:
    """Every check of the configured ``stages`` that can be made before the first one runs:
    each config's own ``validate`` and, with the model ``loaded``, layers, ranks and sites.

    A ``ConfigError`` (or ``SiteError``) here means nothing has been written yet.
    """
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
