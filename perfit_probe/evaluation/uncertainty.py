"""Uncertainty of the evaluation metrics: cluster-bootstrap intervals and paired tests over users.

Input: the per-query predictions frame of ``evaluate_methods`` (``RUN/eval/predictions.csv``;
columns ``method, user_id, query_id, gold, output`` and, for some methods, ``expected``).
Queries of one user are not independent, so the unit of resampling is the *test user*:

- **interval of a metric** (``metric_intervals``): B cluster-bootstrap resamples; each draws
  the n test users with replacement, keeps all queries of every drawn user (a user drawn
  twice counts twice), and recomputes the metric on the pooled queries. The interval is the
  percentile interval ``[q_(1-level)/2, q_(1+level)/2]`` of the B values; ``se`` is their
  standard deviation.
- **difference of two methods** (``metric_differences``), ``d = metric(method) -
  metric(reference)`` on the queries both predicted: the same B resampled user sets for both
  methods give a paired percentile interval of d. The p-value is a user-blocked sign-flip
  permutation test of "the two methods are exchangeable": for each user, the two methods'
  predictions for all of that user's queries are swapped or not, and d is recomputed;
  two-sided, ``p = (1 + #{|d_perm| >= |d_obs|}) / (1 + n_perm)`` over ``n_perm`` random
  swap patterns, or, when ``2^n_users <= n_perm``, the exact share over all ``2^n_users``
  patterns (the identity included).

Each method is compared with the reference method (``perfit``) and with the best trivial
baseline (``perfit_probe.evaluation.baselines``; the best one on the task's headline metric,
lowest MAE / highest accuracy / highest ROUGE-1).

Metrics are those of the task kind (``METRICS``: MAE and RMSE; accuracy and macro-F1;
ROUGE-1 and ROUGE-L), plus ``expected_mae`` for methods with an ``expected`` rating. Every
metric is a function of per-user sums of per-query statistics (absolute and squared errors,
hits, ROUGE F-measures, per-label true/false positives and false negatives for macro-F1),
so a resample costs a matrix product; the full-sample value is checked against ``score_task``
of ``perfit_probe.evaluation.metrics`` and reported from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from perfit_probe.config import UncertaintyConfig
from perfit_probe.errors import DataError
from perfit_probe.evaluation.baselines import BASELINES
from perfit_probe.evaluation.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    label_indices,
    primary_metric,
    rating_values,
    score_task,
)

log = logging.getLogger(__name__)

INTERVAL_COLUMNS = ("method", "metric", "estimate", "ci_low", "ci_high", "se", "level", "n_boot",
                    "n_users", "n_queries")
"""Columns of ``uncertainty.csv`` (one row per method x metric)."""
DIFFERENCE_COLUMNS = ("method", "against", "reference", "metric", "estimate", "ci_low", "ci_high",
                      "p_value", "n_perm", "exact", "level", "n_boot", "n_users", "n_queries")
"""Columns of ``differences.csv`` (one row per method x reference x metric); ``against`` is
``reference`` (the reference method) or ``best_baseline``."""
_TIE = 1e-12


@dataclass(frozen=True)
class Uncertainty:
    """What ``evaluation_uncertainty`` returns."""

    intervals: pd.DataFrame
    """One row per method x metric (``INTERVAL_COLUMNS``)."""
    differences: pd.DataFrame
    """One row per method x reference x metric (``DIFFERENCE_COLUMNS``)."""
    best_baseline: str | None
    """The best trivial baseline on the headline metric (None when no baseline ran)."""


@dataclass(frozen=True)
class Scorer:
    """How the predictions of one task are scored (the arguments of ``score_task``)."""

    kind: str
    """Task kind."""
    labels: tuple[str, ...] | None
    """Label set (classification; the rating scale's ends for ratings)."""
    use_stemmer: bool = False
    """ROUGE with the Porter stemmer."""

    def score(self, golds: list[str], outputs: list[str]) -> dict:
        """``score_task`` of these golds and outputs."""
        return score_task(self.kind, golds, outputs, self.labels, use_stemmer=self.use_stemmer)


@dataclass
class QueryStats:
    """Per-query statistics of one method's predictions, in the order of ``keys``."""

    keys: pd.MultiIndex
    """(user_id, query_id) of each query."""
    stats: dict[str, np.ndarray]
    """metric -> ``[n_queries, s]`` statistics whose column sums determine the metric."""
    official: dict[str, float]
    """The full-sample metrics of ``score_task`` (and ``expected_mae``)."""


# ---------------------------------------------------------------------- metrics from sums
def metric_from_sums(metric: str, sums: np.ndarray) -> np.ndarray:
    """A metric from summed per-query statistics (``[..., s]`` -> ``[...]``).

    ``mae``/``expected_mae``: sum|e| / n; ``rmse``: sqrt(sum e^2 / n); ``accuracy``,
    ``rouge1``, ``rougeL``: sum / n; ``f1``: the sums are per-label TP, FP, FN (L each) and
    macro-F1 = mean over labels of 2 TP / (2 TP + FP + FN), a label with no gold and no
    prediction scoring 0 (sklearn's ``zero_division=0``).
    """
    sums = np.asarray(sums, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "f1":
            n_labels = sums.shape[-1] // 3
            tp, fp, fn = sums[..., :n_labels], sums[..., n_labels:2 * n_labels], sums[..., 2 * n_labels:]
            denom = 2 * tp + fp + fn
            per_label = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
            return per_label.mean(-1)
        value = sums[..., 0] / sums[..., 1]
        return np.sqrt(value) if metric == "rmse" else value


def _texts(series: pd.Series) -> list[str]:
    return ["" if pd.isna(v) else str(v) for v in series]


def query_statistics(frame: pd.DataFrame, scorer: Scorer) -> QueryStats:
    """Per-query statistics of one method's predictions (see ``metric_from_sums``)."""
    golds, outputs = _texts(frame["gold"]), _texts(frame["output"])
    official = {m: float(v) for m, v in scorer.score(golds, outputs).items() if m in METRICS[scorer.kind]}
    n = len(frame)
    ones = np.ones(n)
    stats: dict[str, np.ndarray] = {}
    if scorer.kind == "rating":
        scale = (1.0, 5.0)
        if scorer.labels:
            values = [float(label) for label in scorer.labels]
            scale = (min(values), max(values))
        gold_v, pred_v, _ = rating_values(golds, outputs, "lamp", scale)  # the headline parse
        err = pred_v - gold_v
        stats["mae"] = np.stack([np.abs(err), ones], 1)
        stats["rmse"] = np.stack([err ** 2, ones], 1)
        if "expected" in frame.columns:
            expected = pd.to_numeric(frame["expected"], errors="coerce").to_numpy(dtype=np.float64)
            if np.isfinite(expected).all():
                stats["expected_mae"] = np.stack([np.abs(expected - gold_v), ones], 1)
                official["expected_mae"] = float(np.abs(expected - gold_v).mean())
    elif scorer.kind == "classification":
        labels = [str(label).strip() for label in scorer.labels]
        gold_i, pred_i = label_indices(golds, labels), label_indices(outputs, labels)
        hit = gold_i == pred_i
        stats["accuracy"] = np.stack([hit.astype(np.float64), ones], 1)
        eye = np.eye(len(labels))
        gold_hot = eye[gold_i]
        pred_hot = np.where((pred_i >= 0)[:, None], eye[np.maximum(pred_i, 0)], 0.0)
        tp = gold_hot * hit[:, None]
        stats["f1"] = np.concatenate([tp, pred_hot - tp, gold_hot - tp], 1)
    else:
        rows = [scorer.score([g], [o]) for g, o in zip(golds, outputs)]
        for metric in METRICS["generation"]:
            stats[metric] = np.stack([np.array([r[metric] for r in rows]), ones], 1)
    for metric, value in official.items():
        mine = float(metric_from_sums(metric, stats[metric].sum(0)))
        if not np.isclose(mine, value, rtol=1e-9, atol=1e-12):
            raise RuntimeError(f"{metric} from per-query statistics ({mine}) differs from score_task ({value})")
    keys = pd.MultiIndex.from_arrays([_texts(frame["user_id"]), _texts(frame["query_id"])],
                                     names=["user_id", "query_id"])
    if keys.has_duplicates:
        raise DataError("a method predicts a (user_id, query_id) twice: predictions must be one row per query")
    return QueryStats(keys, stats, official)


def _user_sums(stats: np.ndarray, users: np.ndarray, n_users: int) -> np.ndarray:
    """``[n_users, s]`` sums of per-query statistics by user index."""
    out = np.zeros((n_users, stats.shape[1]))
    np.add.at(out, users, stats)
    return out


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


# ---------------------------------------------------------------------- the analysis
def resample_weights(n_users: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_users]`` counts: how often each user is drawn in each cluster-bootstrap resample."""
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)


def swap_patterns(n_users: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """``([n, n_users] 0/1 swap indicators, exact)``: all 2^n_users when that is <= ``n_perm``."""
    if n_users < 63 and 2 ** n_users <= n_perm:
        codes = np.arange(2 ** n_users)[:, None]
        return ((codes >> np.arange(n_users)) & 1).astype(np.float64), True
    return rng.integers(0, 2, size=(n_perm, n_users)).astype(np.float64), False


def _method_stats(predictions: pd.DataFrame, scorer: Scorer) -> dict[str, QueryStats]:
    required = {"method", "user_id", "query_id", "gold", "output"}
    missing = sorted(required - set(predictions.columns))
    if missing:
        raise DataError(f"predictions frame lacks column(s) {missing}: expected {sorted(required)}")
    return {str(method): query_statistics(frame, scorer)
            for method, frame in predictions.groupby("method", sort=False)}


def metric_intervals(stats: dict[str, QueryStats], users: pd.Index, weights: np.ndarray,
                     level: float) -> pd.DataFrame:
    """Cluster-bootstrap percentile interval of every metric of every method."""
    rows = []
    for method, ms in stats.items():
        codes = users.get_indexer(ms.keys.get_level_values(0))
        n_users = len(set(codes))
        for metric, per_query in ms.stats.items():
            boot = metric_from_sums(metric, weights @ _user_sums(per_query, codes, len(users)))
            low, high = _percentile(boot, level)
            rows.append({"method": method, "metric": metric, "estimate": ms.official[metric],
                         "ci_low": low, "ci_high": high, "se": float(np.nanstd(boot, ddof=1)) if len(boot) > 1
                         else float("nan"), "level": level, "n_boot": len(weights), "n_users": n_users,
                         "n_queries": len(ms.keys)})
    return pd.DataFrame(rows, columns=list(INTERVAL_COLUMNS))


def paired_difference(a: QueryStats, b: QueryStats, metric: str, users: pd.Index, weights: np.ndarray,
                      patterns: np.ndarray, level: float) -> dict:
    """``metric(a) - metric(b)`` on their common queries: estimate, paired bootstrap interval, p-value."""
    common = a.keys.intersection(b.keys, sort=False)
    ia, ib = a.keys.get_indexer(common), b.keys.get_indexer(common)
    codes = users.get_indexer(common.get_level_values(0))
    sa = _user_sums(a.stats[metric][ia], codes, len(users))
    sb = _user_sums(b.stats[metric][ib], codes, len(users))
    observed = float(metric_from_sums(metric, sa.sum(0)) - metric_from_sums(metric, sb.sum(0)))
    boot = metric_from_sums(metric, weights @ sa) - metric_from_sums(metric, weights @ sb)
    low, high = _percentile(boot, level)
    delta = sb - sa  # swapping user u moves delta[u] from b to a
    perm = (metric_from_sums(metric, sa.sum(0) + patterns @ delta)
            - metric_from_sums(metric, sb.sum(0) - patterns @ delta))
    extreme = int((np.abs(perm) >= abs(observed) - _TIE * max(1.0, abs(observed))).sum())
    return {"estimate": observed, "ci_low": low, "ci_high": high, "n_users": len(set(codes)),
            "n_queries": len(common), "extreme": extreme}


def standard_error_of_interval(low, high, level: float = 0.95):
    """The standard error a normal ``level`` interval ``[low, high]`` implies: ``(high - low) / (2 z)``."""
    from scipy.stats import norm  # deferred: scipy.stats is slow to import

    return (high - low) / (2 * norm.ppf((1 + level) / 2))


def detectable_difference(ci_low: float, ci_high: float, level: float = 0.95, alpha: float = 0.05,
                          power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at ``alpha`` detects with probability ``power``,
    given a difference's ``level`` interval: ``(z_{1-alpha/2} + z_power) * se``, with the standard
    error read off the interval's width as ``(high - low) / (2 z_{(1+level)/2})`` (the normal
    approximation; for 95% and 80%, 2.80 standard errors, about 0.71 of the interval's width)."""
    from scipy.stats import norm  # deferred: scipy.stats is slow to import

    se = standard_error_of_interval(ci_low, ci_high, level)
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * se)


def seed_heterogeneity(estimates: Sequence[float], ci_lows: Sequence[float], ci_highs: Sequence[float],
                       level: float = 0.95) -> dict:
    """Do runs that differ in seed agree on a difference, and what is it once they may not?

    Each run's standard error is read off its ``level`` interval (``(high - low) / (2 z)``).
    Returns Cochran's ``q`` with its chi-square p-value (``q_p``, ``k - 1`` degrees of freedom:
    small means the seeds disagree beyond their own uncertainty), the DerSimonian-Laird
    between-seed variance ``tau2``, and the random-effects estimate with a ``level`` interval
    from Student's t with ``k - 1`` degrees of freedom (``re_estimate``, ``re_ci_low``,
    ``re_ci_high``; wide with 3 seeds, as it should be). NaN with fewer than 2 usable runs.
    """
    from scipy.stats import chi2, t  # deferred: scipy.stats is slow to import

    d, low, high = (np.asarray(x, dtype=float) for x in (estimates, ci_lows, ci_highs))
    se = standard_error_of_interval(low, high, level)
    keep = np.isfinite(d) & np.isfinite(se) & (se > 0)
    d, se = d[keep], se[keep]
    k = len(d)
    nan = float("nan")
    if k < 2:
        return {"k": k, "q": nan, "q_p": nan, "tau2": nan, "re_estimate": nan, "re_ci_low": nan, "re_ci_high": nan}
    w = 1 / se**2
    fixed = float((w * d).sum() / w.sum())
    q = float((w * (d - fixed) ** 2).sum())
    tau2 = max(0.0, (q - (k - 1)) / float(w.sum() - (w**2).sum() / w.sum()))
    w_re = 1 / (se**2 + tau2)
    estimate = float((w_re * d).sum() / w_re.sum())
    half = float(t.ppf((1 + level) / 2, k - 1) * np.sqrt(1 / w_re.sum()))
    return {"k": k, "q": q, "q_p": float(chi2.sf(q, k - 1)), "tau2": tau2, "re_estimate": estimate,
            "re_ci_low": estimate - half, "re_ci_high": estimate + half}


def best_baseline(intervals: pd.DataFrame, kind: str, baselines: Sequence[str] = tuple(BASELINES)) -> str | None:
    """The baseline with the best headline metric in ``intervals`` (None when none ran)."""
    metric = primary_metric(kind)
    rows = intervals[(intervals.metric == metric) & intervals.method.isin(list(baselines))]
    rows = rows[np.isfinite(rows.estimate.astype(float))]
    if rows.empty:
        return None
    best = rows.estimate.idxmax() if HIGHER_IS_BETTER[metric] else rows.estimate.idxmin()
    return str(rows.loc[best, "method"])


def evaluation_uncertainty(predictions: pd.DataFrame, kind: str, labels: Sequence[str] | None,
                           rng: np.random.Generator, config: UncertaintyConfig = UncertaintyConfig(), *,
                           use_stemmer: bool = False,
                           baselines: Sequence[str] = tuple(BASELINES)) -> Uncertainty:
    """Intervals of every method's metrics and its differences from the reference and the best baseline.

    Works on whatever methods ``predictions`` holds; rows against a missing reference (or
    when no baseline ran) are left out. ``use_stemmer`` must be the one the metrics were
    computed with; ratings are read with LaMP's rule, as the headline metrics are.
    """
    scorer = Scorer(kind, tuple(labels) if labels is not None else None, use_stemmer)
    stats = _method_stats(predictions, scorer) if len(predictions) else {}
    if not stats:
        return Uncertainty(pd.DataFrame(columns=list(INTERVAL_COLUMNS)),
                           pd.DataFrame(columns=list(DIFFERENCE_COLUMNS)), None)
    users = pd.Index(sorted({u for ms in stats.values() for u in ms.keys.get_level_values(0)}))
    weights = resample_weights(len(users), config.n_boot, rng)
    intervals = metric_intervals(stats, users, weights, config.level)
    best = best_baseline(intervals, kind, baselines)
    patterns, exact = swap_patterns(len(users), config.n_perm, rng)
    rows = []
    for against, reference in (("reference", config.reference), ("best_baseline", best)):
        if reference is None or reference not in stats:
            log.info("no %s (%s) among the methods: its differences are left out", against, reference)
            continue
        for method, ms in stats.items():
            if method == reference:
                continue
            for metric in ms.stats:
                if metric not in stats[reference].stats:
                    continue
                d = paired_difference(ms, stats[reference], metric, users, weights, patterns, config.level)
                n_perm = len(patterns)
                extreme = d.pop("extreme")
                p = extreme / n_perm if exact else (1 + extreme) / (1 + n_perm)
                rows.append({"method": method, "against": against, "reference": reference, "metric": metric,
                             **{k: d[k] for k in ("estimate", "ci_low", "ci_high")}, "p_value": float(p),
                             "n_perm": n_perm, "exact": exact, "level": config.level,
                             "n_boot": config.n_boot, "n_users": d["n_users"], "n_queries": d["n_queries"]})
    return Uncertainty(intervals, pd.DataFrame(rows, columns=list(DIFFERENCE_COLUMNS)), best)


def read_predictions_csv(path: Path) -> pd.DataFrame:
    """``predictions.csv`` with ids, golds and outputs as text (an empty output stays ``""``)."""
    frame = pd.read_csv(path, dtype={"method": str, "user_id": str, "query_id": str, "gold": str, "output": str},
                        keep_default_na=False)
    if "expected" in frame.columns:
        frame["expected"] = pd.to_numeric(frame["expected"], errors="coerce")
    return frame


# ---------------------------------------------------------------------- presentation
def _fmt(value: float, digits: int = 3, sign: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def with_intervals(table: pd.DataFrame, intervals: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``table`` (one row per method) with each metric cell as ``estimate [low, high]`` where known."""
    out = table.copy()
    index = intervals.set_index(["method", "metric"])
    for column in out.columns:
        if column == "method" or not (intervals.metric == column).any():
            continue
        cells = []
        for method, value in zip(out["method"], out[column]):
            if (method, column) in index.index:
                row = index.loc[(method, column)]
                cells.append(f"{_fmt(value, digits)} [{_fmt(row.ci_low, digits)}, {_fmt(row.ci_high, digits)}]")
            else:
                cells.append(_fmt(value, digits))
        out[column] = cells
    return out


def differences_table(differences: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per method x reference, one column per metric: ``d [low, high] p=...``."""
    if differences.empty:
        return pd.DataFrame(columns=["method", "vs"])
    metrics = list(dict.fromkeys(differences.metric))
    order = {"reference": 0, "best_baseline": 1}
    rows = []
    for (method, against, reference), part in differences.groupby(["method", "against", "reference"], sort=False):
        row = {"_order": order.get(against, 2), "method": method,
               "vs": reference if against == "reference" else f"{reference} (best baseline)"}
        for metric in metrics:
            hit = part[part.metric == metric]
            if hit.empty:
                row[metric] = ""
                continue
            r = hit.iloc[0]
            row[metric] = (f"{_fmt(r.estimate, digits, sign=True)} [{_fmt(r.ci_low, digits, sign=True)}, "
                           f"{_fmt(r.ci_high, digits, sign=True)}] p={r.p_value:.3g}")
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def describe_uncertainty(result: Uncertainty) -> str:
    """Markdown sentences saying how the intervals and p-values were computed."""
    iv, df = result.intervals, result.differences
    if iv.empty:
        return ""
    n_users = int(iv.n_users.max())
    text = (f"Brackets: {iv.level.iloc[0]:.0%} percentile interval of a cluster bootstrap over the "
            f"{n_users} test users ({int(iv.n_boot.iloc[0])} resamples; a resample draws users with "
            "replacement and keeps all their queries).")
    if not df.empty:
        exact = bool(df.exact.iloc[0])
        n_perm = int(df.n_perm.iloc[0])
        perms = f"all {n_perm} swap patterns" if exact else f"{n_perm} random swap patterns"
        text += (" Differences d = metric(method) - metric(vs) on the same queries, with a paired bootstrap "
                 "interval (the same resampled users for both) and the two-sided p-value of a user-blocked "
                 f"permutation test (each user's predictions swapped between the two methods; {perms}).")
    if result.best_baseline:
        text += f" Best trivial baseline: `{result.best_baseline}`."
    return text
