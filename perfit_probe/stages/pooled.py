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
recipe when a ``capability.json`` is given). The pooled bootstrap holds each seed's trained models
fixed; ``seeds.csv`` (``across_seeds``) gives each difference seed by seed with a heterogeneity
test and a random-effects interval that lets it vary between seeds, quoted in both markdown files.
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
    seed_heterogeneity,
    with_intervals,
)
from perfit_probe.stages.claims import (
    CLAIM3_METHODS,
    CLAIM_COLUMNS,
    claim3,
    claim_capability,
    claims_markdown,
    headline_metric,
    run_fit_config,
)
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
    table = intervals.pivot_table(index="method", columns="metric", values="estimate", aggfunc="first")
    table = table.reindex(list(dict.fromkeys(predictions["method"]))).dropna(how="all").reset_index()
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
    across = across_seeds(predictions, differences, spec, config, uncertainty.best_baseline)
    atomic_write_text(out / "seeds.csv", across.to_csv(index=False))
    rows = claim3(out, spec.kind, alpha)
    fit = run_fit_config(next(iter(runs.values())))
    if capability is not None and fit is not None:
        rows += claim_capability(capability, fit)
    claims = pd.DataFrame.from_records(rows, columns=CLAIM_COLUMNS)
    atomic_write_text(out / "claims.csv", claims.to_csv(index=False))
    seed_lines = _seed_lines(across, spec, config)
    atomic_write_text(out / "claims.md", claims_markdown(claims) + seed_lines)
    atomic_write_text(out / "results.md", _markdown(table, uncertainty, differences, spec, runs) + seed_lines)
    return out


def across_seeds(predictions: pd.DataFrame, differences: pd.DataFrame, spec: TaskSpec, config: EvalConfig,
                 best: str | None) -> pd.DataFrame:
    """Each pooled difference as each seed measures it alone (against the pooled best baseline), and
    whether the seeds agree (``seed_heterogeneity``: Cochran's Q, a random-effects interval that
    lets the trained models vary between seeds, which the pooled bootstrap over users does not)."""
    per_seed = {}
    for seed, frame in predictions.groupby("seed", sort=True):
        result = evaluation_uncertainty(frame, spec.kind, spec.labels, np.random.default_rng(config.seed),
                                        config.uncertainty, use_stemmer=config.use_stemmer,
                                        baselines=(best,) if best else ())
        per_seed[seed] = result.differences.set_index(["method", "reference", "metric"])
    rows = []
    for row in differences.itertuples(index=False):
        key = (row.method, row.reference, row.metric)
        seeds = {s: d.loc[key] for s, d in per_seed.items() if key in d.index}
        stats = seed_heterogeneity([r["estimate"] for r in seeds.values()], [r["ci_low"] for r in seeds.values()],
                                   [r["ci_high"] for r in seeds.values()], row.level)
        rows.append({"method": row.method, "against": row.against, "reference": row.reference, "metric": row.metric,
                     "pooled": row.estimate, **{f"seed{s}": float(r["estimate"]) for s, r in seeds.items()}, **stats})
    return pd.DataFrame(rows)


def _seed_lines(across: pd.DataFrame, spec: TaskSpec, config: EvalConfig) -> str:
    """The claim-3 comparisons seed by seed, with the heterogeneity test and the random-effects interval."""
    metric = headline_metric(across.get("metric", ()), spec.kind)
    if metric is None:
        return ""
    reference = config.uncertainty.reference
    wanted = across[(across.metric == metric) & (((across.against == "reference") & across.method.isin(CLAIM3_METHODS))
                                                 | ((across.against == "best_baseline") & (across.method == reference)))]
    seeds = [c for c in across.columns if c.startswith("seed")]
    lines = ["", "## Across seeds (the trained models vary too)", "",
             "The pooled intervals above resample users with each seed's trained models held fixed. Here each "
             "seed measures the difference alone; Cochran's Q tests whether the seeds agree beyond their own "
             f"intervals, and a DerSimonian-Laird random-effects interval ({config.uncertainty.level:.0%}, Student's t "
             "with seeds - 1 degrees of freedom) lets the difference vary between seeds (`seeds.csv`).", ""]
    for row in wanted.itertuples(index=False):
        values = ", ".join(f"{getattr(row, c):+.3f}" for c in seeds if np.isfinite(getattr(row, c)))
        side = "contains" if row.re_ci_low <= 0 <= row.re_ci_high else "excludes"
        lines.append(f"- {row.method} minus {row.reference} ({metric}): seeds {values}; Q = {row.q:.2f} "
                     f"(p = {row.q_p:.2g}, {int(row.k)} seeds); random-effects {row.re_estimate:+.3f} "
                     f"(CI {row.re_ci_low:+.3f} to {row.re_ci_high:+.3f}), which {side} 0.")
    return "\n".join(lines) + "\n"


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
    detect = detect.pivot_table(index="method", columns="column", values="detectable", aggfunc="first").fillna("")
    detect = detect.loc[list(dict.fromkeys(shown.method))].reset_index()
    return "\n".join(head + [
        "## Differences from PerFit and from the best trivial baseline", "",
        markdown_table(differences_table(shown)), "",
        "## Detectable differences", "",
        "The true difference this pooled run detects with 80% power in a two-sided test at 5% "
        "(2.80 standard errors, the standard error read off the 95% interval's width), with each seed's "
        "trained models held fixed (the next section lets them vary):", "",
        markdown_table(detect), ""])
