"""``OUT/pooled/``: the evaluation of a multi-seed run with every seed's test users together.

Each seed of ``run_seeds`` draws its own users and trains its own models, so one seed's
intervals are as wide as its test users allow. ``pool_predictions`` stacks the seeds'
``eval/predictions.csv`` (query ids prefixed with the seed; user ids kept, so a user drawn by
several seeds stays one bootstrap cluster), and ``write_pooled`` runs the evaluation's own
uncertainty (``perfit_probe.evaluation.uncertainty.evaluation_uncertainty``: cluster bootstrap
over users, paired differences from PerFit and from the best trivial baseline, user-blocked
permutation p) on the stack. It writes ``results.csv`` (each method's metric on all pooled
queries), ``uncertainty.csv``, ``differences.csv`` (with ``detectable``: the difference the
pooled run detects with 80% power at its level), ``results.md`` and the claim-3 verdicts
``claims.csv``/``claims.md`` (``perfit_probe.stages.claims.claim3``, and the capability of the
recipe when a ``capability.json`` is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from perfit_probe._io import atomic_write_text
from perfit_probe.config import EvalConfig
from perfit_probe.data.tasks import TaskSpec
from perfit_probe.evaluation.metrics import METRICS
from perfit_probe.evaluation.uncertainty import (
    Uncertainty,
    describe_uncertainty,
    detectable_difference,
    differences_table,
    evaluation_uncertainty,
    read_predictions_csv,
    with_intervals,
)
from perfit_probe.stages.claims import CLAIM_COLUMNS, claim3, claim_capability, claims_markdown, run_fit_config
from perfit_probe.stages.markdown import markdown_table

POOLED_DIR = "pooled"
"""Where ``write_pooled`` writes, inside the multi-seed directory."""


def pool_predictions(runs: Mapping[int, Path]) -> pd.DataFrame:
    """Every seed's ``eval/predictions.csv`` stacked, with a ``seed`` column and seed-prefixed query ids
    (empty when no seed has predictions)."""
    frames = []
    for seed, run_dir in runs.items():
        path = Path(run_dir) / "eval" / "predictions.csv"
        if path.is_file():
            frame = read_predictions_csv(path)
            frame.insert(0, "seed", seed)
            frame["query_id"] = f"seed{seed}/" + frame["query_id"]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _results(intervals: pd.DataFrame, predictions: pd.DataFrame, runs: Mapping[int, Path]) -> pd.DataFrame:
    """One row per method: its pooled metrics, queries, and parameters per user (from the seeds' tables)."""
    table = intervals.pivot(index="method", columns="metric", values="estimate")
    table = table.loc[list(dict.fromkeys(predictions["method"]))].reset_index()
    table["n_queries"] = table["method"].map(predictions.groupby("method").size())
    params = {}
    for run_dir in runs.values():
        results = Path(run_dir) / "eval" / "results.csv"
        if results.is_file():
            frame = pd.read_csv(results)
            if "params_per_user" in frame:
                params.update(frame.dropna(subset=["params_per_user"]).set_index("method")["params_per_user"])
    table["params_per_user"] = table["method"].map(params)
    return table


def write_pooled(runs: Mapping[int, Path], directory: Path, spec: TaskSpec, config: EvalConfig,
                 alpha: float = 0.05, capability: Path | None = None) -> Path | None:
    """Write ``directory/pooled/`` (see the module docstring); None (nothing written) without
    predictions. With a ``capability.json``, the claims add its verdict for the seeds' fit recipe
    (the first seed's; seeds differ only in data and seed)."""
    predictions = pool_predictions(runs)
    if predictions.empty:
        return None
    out = Path(directory) / POOLED_DIR
    out.mkdir(parents=True, exist_ok=True)
    uncertainty = evaluation_uncertainty(predictions, spec.kind, spec.labels, np.random.default_rng(config.seed),
                                         config.uncertainty, use_stemmer=config.use_stemmer)
    differences = uncertainty.differences.copy()
    differences["detectable"] = [detectable_difference(row.ci_low, row.ci_high, row.level, alpha)
                                 for row in differences.itertuples()]
    table = _results(uncertainty.intervals, predictions, runs)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    atomic_write_text(out / "uncertainty.csv", uncertainty.intervals.to_csv(index=False))
    atomic_write_text(out / "differences.csv", differences.to_csv(index=False))
    rows = claim3(out, spec.kind, alpha)
    fit = run_fit_config(next(iter(runs.values())))
    if capability is not None and fit is not None:
        rows += claim_capability(capability, fit)
    claims = pd.DataFrame.from_records(rows, columns=CLAIM_COLUMNS)
    atomic_write_text(out / "claims.csv", claims.to_csv(index=False))
    atomic_write_text(out / "claims.md", claims_markdown(claims))
    atomic_write_text(out / "results.md", _markdown(table, uncertainty, differences, spec, runs))
    return out


def _markdown(table: pd.DataFrame, uncertainty: Uncertainty, differences: pd.DataFrame, spec: TaskSpec,
              runs: Mapping[int, Path]) -> str:
    """``results.md``: pooled metrics with intervals, the paired differences, the detectable differences."""
    metrics = [m for m in METRICS[spec.kind] if m in table.columns]
    seeds = ", ".join(f"{seed} (`{Path(path).name}/`)" for seed, path in runs.items())
    head = [f"# Pooled evaluation on {spec.name}: seeds {seeds}", "",
            "Every seed's held-out predictions together (a user drawn by several seeds is one cluster). "
            + describe_uncertainty(uncertainty), "",
            markdown_table(with_intervals(table[["method", *metrics, "n_queries"]], uncertainty.intervals)), ""]
    shown = differences[differences.metric.isin(metrics)]
    detect = shown.assign(column=shown.metric + " vs " + shown.reference,
                          detectable=shown.detectable.map(lambda v: f"{v:.3f}"))
    detect = detect.pivot(index="method", columns="column", values="detectable").fillna("")
    detect = detect.loc[list(dict.fromkeys(shown.method))].reset_index()
    return "\n".join(head + [
        "## Differences from PerFit and from the best trivial baseline", "",
        markdown_table(differences_table(shown)), "",
        "## Detectable differences", "",
        "The true difference this pooled run detects with 80% power in a two-sided test at 5% "
        "(2.80 standard errors, the standard error read off the 95% interval's width):", "",
        markdown_table(detect), ""])
