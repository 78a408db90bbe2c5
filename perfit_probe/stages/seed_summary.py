"""Across-seed summaries: the spread of every headline number of runs that differ only in seed.

A multi-seed pipeline (``perfit_probe.stages.pipeline.run_seeds``) writes one run directory per
seed; this module reads their ``metrics.json`` and summarises them. ``flatten_metrics``
turns a ``metrics.json`` into ``{path: value}`` over its numeric leaves (paths joined with
``/``, e.g. ``evaluate/perfit/mae``, ``fit/stage2/last_epoch_loss``,
``analysis/uncentred/personal/rank@0.9``), skipping wall times and memory (the ``timings``
and ``pipeline`` sections, keys ending in ``_s`` or containing ``_s_``), booleans and lists.

``seed_summary`` gives one row per path: ``n`` (seeds with a finite value), ``mean``,
``std`` (the sample standard deviation across seeds, ``ddof=1``; NaN with one seed),
``min``, ``max``, and the value of each seed (columns ``seed{s}``). ``write_seed_summary``
writes it as ``seeds_summary.csv``, ``seeds_summary.md`` and ``seeds_summary.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from perfit_probe._io import atomic_write_text, write_json
from perfit_probe.stages.markdown import markdown_table

SKIPPED_SECTIONS = ("timings", "pipeline")
"""Top-level sections of ``metrics.json`` that hold costs, not results."""

SUMMARY_FILES = ("seeds_summary.csv", "seeds_summary.md", "seeds_summary.json")
"""What ``write_seed_summary`` writes into the multi-seed directory."""


def _is_timing(key: str) -> bool:
    return key.endswith("_s") or "_s_" in key


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """``{"a/b/c": value}`` for every numeric leaf of ``metrics`` (see the module docstring)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        key = str(key)
        if not prefix and key in SKIPPED_SECTIONS or _is_timing(key):
            continue
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, path))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            out[path] = float(value)
    return out


def seed_summary(metrics_by_seed: Mapping[int, Mapping]) -> pd.DataFrame:
    """One row per metric path found in any seed's metrics: n, mean, std, min, max, per-seed values."""
    flat = {seed: flatten_metrics(metrics) for seed, metrics in metrics_by_seed.items()}
    paths = list(dict.fromkeys(path for values in flat.values() for path in values))
    rows = []
    for path in paths:
        values = {seed: flat[seed].get(path, float("nan")) for seed in flat}
        finite = np.array([v for v in values.values() if math.isfinite(v)])
        n = len(finite)
        rows.append({"metric": path, "n": n,
                     "mean": float(finite.mean()) if n else float("nan"),
                     "std": float(finite.std(ddof=1)) if n > 1 else float("nan"),
                     "min": float(finite.min()) if n else float("nan"),
                     "max": float(finite.max()) if n else float("nan"),
                     **{f"seed{seed}": value for seed, value in values.items()}})
    columns = ["metric", "n", "mean", "std", "min", "max", *(f"seed{seed}" for seed in flat)]
    return pd.DataFrame.from_records(rows, columns=columns)


def write_seed_summary(summary: pd.DataFrame, directory: Path, runs: Mapping[int, Path]) -> dict[str, Path]:
    """Write ``seeds_summary.csv``/``.md``/``.json`` into ``directory``; returns their paths by suffix."""
    directory = Path(directory)
    paths = {name.rsplit(".", 1)[1]: directory / name for name in SUMMARY_FILES}
    atomic_write_text(paths["csv"], summary.to_csv(index=False))
    seeds = list(runs)
    lines = ["# Across seeds", "",
             f"{len(seeds)} runs of the same pipeline, seeds {', '.join(map(str, seeds))} (the seed of the "
             "task, the split and every stage): "
             + ", ".join(f"seed {seed} in `{Path(path).name}/`" for seed, path in runs.items()) + ".",
             "", "Every numeric result of each run's `metrics.json` (wall times left out): the mean, the sample "
             "standard deviation (ddof=1), the minimum and maximum across seeds, and each seed's value. A number "
             "that a run does not report (a skipped method, an epoch count of 0 that is not listed) is left out "
             "of that run's statistics: `n` says how many seeds had it.", ""]
    atomic_write_text(paths["md"], "\n".join(lines) + "\n" + markdown_table(summary))
    write_json(paths["json"], {
        "seeds": seeds, "runs": {str(seed): str(path) for seed, path in runs.items()},
        "metrics": {row["metric"]: {"n": int(row["n"]), **{key: _number(row[key]) for key in ("mean", "std", "min", "max")},
                                    "values": {str(seed): _number(row[f"seed{seed}"]) for seed in seeds}}
                    for row in summary.to_dict("records")}})
    return paths


def _number(value: float) -> float | None:
    """A float for JSON; None for NaN (strict JSON has no NaN)."""
    return float(value) if math.isfinite(value) else None


def headline_lines(summary: pd.DataFrame, prefix: str = "evaluate/") -> list[str]:
    """``metric: mean +- std (min .. max)`` for the metrics under ``prefix`` (what the CLI prints)."""
    rows = summary[summary["metric"].str.startswith(prefix)]
    return [f"  {row.metric[len(prefix):]}: {row.mean:.3f} +- {row.std:.3f} ({row.min:.3f} .. {row.max:.3f})"
            for row in rows.itertuples(index=False)]
