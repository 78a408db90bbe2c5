"""Oracle tests of the cluster bootstrap and the user-blocked permutation test.

The coverage and null-uniformity tests simulate many data sets of clustered users whose true
MAE difference is known in closed form: a user's error on a query is ``c_u + eps`` with a
shared user effect ``c_u ~ N(0, tau^2)`` and ``eps ~ N(0, sigma_m^2)`` for method m, so
``E|error_m| = sqrt(2 / pi) * sqrt(tau^2 + sigma_m^2)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from perfit_probe.config import UncertaintyConfig
from perfit_probe.evaluation.metrics import score_task
from perfit_probe.evaluation.uncertainty import (
    DIFFERENCE_COLUMNS,
    INTERVAL_COLUMNS,
    Scorer,
    detectable_difference,
    seed_heterogeneity,
    evaluation_uncertainty,
    metric_from_sums,
    query_statistics,
    read_predictions_csv,
    resample_weights,
    swap_patterns,
)

RATINGS = ("1", "2", "3", "4", "5")
TAU = 0.5


def true_mae(sigma: float) -> float:
    return float(np.sqrt(2 / np.pi) * np.sqrt(TAU ** 2 + sigma ** 2))


def clustered(rng: np.random.Generator, n_users: int, sigmas: dict[str, float]) -> pd.DataFrame:
    """Predictions of methods with error ``c_u + N(0, sigma_m^2)``; 2-6 queries per user, gold 3."""
    rows = []
    for u in range(n_users):
        c = rng.normal(0, TAU)
        for q in range(int(rng.integers(2, 7))):
            for method, sigma in sigmas.items():
                rows.append({"method": method, "user_id": f"u{u}", "query_id": f"q{q}", "gold": "3",
                             "output": f"{3 + c + rng.normal(0, sigma):.6f}"})
    return pd.DataFrame(rows)


def mae_difference(frame: pd.DataFrame, rng: np.random.Generator, config: UncertaintyConfig) -> pd.Series:
    result = evaluation_uncertainty(frame, "rating", RATINGS, rng, config)
    row = result.differences[(result.differences.metric == "mae") & (result.differences.method == "b")]
    assert len(row) == 1
    return row.iloc[0]


def test_paired_interval_covers_the_true_difference_about_95_percent():
    rng = np.random.default_rng(1)
    truth = true_mae(1.0) - true_mae(0.6)
    config = UncertaintyConfig(n_boot=300, n_perm=1, reference="a")
    covered = []
    for _ in range(200):
        row = mae_difference(clustered(rng, 40, {"a": 0.6, "b": 1.0}), rng, config)
        covered.append(row.ci_low <= truth <= row.ci_high)
    assert 0.90 <= np.mean(covered) <= 0.99


def test_permutation_p_value_is_uniform_under_the_null_and_small_for_a_large_difference():
    rng = np.random.default_rng(2)
    config = UncertaintyConfig(n_boot=1, n_perm=1000, reference="a")
    p = np.array([mae_difference(clustered(rng, 20, {"a": 1.0, "b": 1.0}), rng, config).p_value
                  for _ in range(200)])
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert 0.01 <= np.mean(p < 0.05) <= 0.10
    planted = mae_difference(clustered(rng, 20, {"a": 0.2, "b": 2.0}), rng,
                             UncertaintyConfig(n_boot=500, n_perm=1000, reference="a"))
    assert planted.p_value <= 2 / 1001 and planted.ci_low > 0
    assert planted.estimate == pytest.approx(true_mae(2.0) - true_mae(0.2), abs=0.5)


def test_exact_enumeration_for_few_users():
    # 4 users, b worse than a by the same amount on every user: only the identity and the
    # full swap are as extreme as the observed difference -> p = 2 / 16 exactly
    rows = [{"method": m, "user_id": f"u{u}", "query_id": "q", "gold": "3", "output": "3" if m == "a" else "4"}
            for u in range(4) for m in ("a", "b")]
    result = evaluation_uncertainty(pd.DataFrame(rows), "rating", RATINGS, np.random.default_rng(0),
                                    UncertaintyConfig(n_boot=100, n_perm=1000, reference="a"))
    row = result.differences.set_index("metric").loc["mae"]
    assert bool(row.exact) and row.n_perm == 16 and row.p_value == pytest.approx(2 / 16)
    assert row.estimate == 1.0 and row.ci_low == row.ci_high == 1.0
    patterns, exact = swap_patterns(4, 16, np.random.default_rng(0))
    assert exact and len({tuple(p) for p in patterns}) == 16
    assert not swap_patterns(5, 16, np.random.default_rng(0))[1]


def _pooled(frame: pd.DataFrame, users: list[str], counts: np.ndarray) -> pd.DataFrame:
    """The queries of a resample: every user's queries repeated as often as the user was drawn."""
    return pd.concat([frame[frame.user_id == u] for u, c in zip(users, counts) for _ in range(int(c))])


@pytest.mark.parametrize("kind", ["rating", "classification", "generation"])
def test_a_resample_scores_as_score_task_on_its_pooled_queries(kind):
    rng = np.random.default_rng(3)
    labels = {"rating": RATINGS, "classification": ("x", "y", "z", "never"), "generation": None}[kind]
    golds = {"rating": RATINGS, "classification": ("x", "y", "z"),
             "generation": ("a cat sat", "the dog ran far", "big red bus")}[kind]
    outputs = {"rating": ("1", "3", "5", "4 stars", "no idea"), "classification": ("x", "y", "z", "other"),
               "generation": ("a cat", "dog ran", "red bus big", "")}[kind]
    frame = pd.DataFrame([{"user_id": f"u{u}", "query_id": f"q{q}", "gold": str(rng.choice(golds)),
                           "output": str(rng.choice(outputs))}
                          for u in range(6) for q in range(int(rng.integers(1, 4)))])
    scorer = Scorer(kind, labels)
    qs = query_statistics(frame, scorer)
    users = sorted(set(frame.user_id))
    codes = np.array([users.index(u) for u in frame.user_id])
    for counts in resample_weights(len(users), 5, rng):
        pooled = _pooled(frame, users, counts)
        official = score_task(kind, list(pooled.gold), list(pooled.output), labels)
        for metric, per_query in qs.stats.items():
            sums = (counts[codes][:, None] * per_query).sum(0)
            assert float(metric_from_sums(metric, sums)) == pytest.approx(official[metric], abs=1e-12)


def test_frames_references_and_best_baseline(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for u in range(8):
        for q in range(3):
            gold = str(rng.choice(["x", "y"]))
            for method, hit in (("perfit", 0.9), ("base", 0.5), ("user_majority", 0.7), ("global_majority", 0.6)):
                out = gold if rng.random() < hit else ("y" if gold == "x" else "x")
                rows.append({"method": method, "user_id": str(u), "query_id": f"q{q}", "gold": gold, "output": out})
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "predictions.csv", index=False)
    again = read_predictions_csv(tmp_path / "predictions.csv")
    result = evaluation_uncertainty(again, "classification", ("x", "y"), rng, UncertaintyConfig(n_boot=200, n_perm=200))
    assert list(result.intervals.columns) == list(INTERVAL_COLUMNS)
    assert list(result.differences.columns) == list(DIFFERENCE_COLUMNS)
    assert len(result.intervals) == 4 * 2  # method x (accuracy, f1)
    acc = result.intervals[result.intervals.metric == "accuracy"].set_index("method").estimate
    assert result.best_baseline == acc[["user_majority", "global_majority"]].idxmax()
    diffs = result.differences
    # vs perfit: 3 methods x 2 metrics; vs the best baseline: 3 methods x 2 metrics
    vs_perfit = diffs[diffs.against == "reference"]
    assert len(vs_perfit) == 6 and set(vs_perfit.reference) == {"perfit"}
    assert len(diffs[diffs.against == "best_baseline"]) == 6
    assert ((diffs.p_value > 0) & (diffs.p_value <= 1)).all()
    base = diffs[(diffs.method == "base") & (diffs.against == "reference") & (diffs.metric == "accuracy")].iloc[0]
    assert base.estimate == pytest.approx(acc["base"] - acc["perfit"])
    # only the methods present are analysed; no reference -> only best-baseline rows
    subset = evaluation_uncertainty(again[again.method != "perfit"], "classification", ("x", "y"), rng,
                                    UncertaintyConfig(n_boot=50, n_perm=50))
    assert set(subset.differences.against) == {"best_baseline"}


def test_detectable_difference_is_2_8_standard_errors():
    """Oracle: hand-computed normal quantiles (1.959964 for 97.5%, 0.841621 for 80%) and a
    simulation: a true difference of that size is detected (|d| / se > 1.96) about 80% of the time."""
    se = 0.1
    width = 2 * 1.959964 * se
    assert detectable_difference(-width / 2, width / 2) == pytest.approx((1.959964 + 0.841621) * se, rel=1e-5)
    assert detectable_difference(0.3, 0.3 + width, level=0.95, alpha=0.05, power=0.5) == pytest.approx(1.959964 * se, rel=1e-5)
    rng = np.random.default_rng(0)
    draws = rng.normal(detectable_difference(0, width), se, 20000)
    assert np.mean(np.abs(draws) / se > 1.959964) == pytest.approx(0.8, abs=0.01)


def test_seed_heterogeneity_by_hand():
    """Oracles computed by hand: two runs with standard error 1 (95% interval +-1.959964)."""
    z = 1.959964
    agree = seed_heterogeneity([0.0, 1.0], [-z, 1 - z], [z, 1 + z])
    assert agree["q"] == pytest.approx(0.5) and agree["tau2"] == 0.0  # Q = 0.25 + 0.25 < df = 1
    assert agree["q_p"] == pytest.approx(stats.chi2.sf(0.5, 1))
    assert agree["re_estimate"] == pytest.approx(0.5)
    assert agree["re_ci_high"] - 0.5 == pytest.approx(stats.t.ppf(0.975, 1) * np.sqrt(0.5), rel=1e-5)
    apart = seed_heterogeneity([0.0, 4.0], [-z, 4 - z], [z, 4 + z])
    # Q = 4 + 4 = 8; tau2 = (8 - 1) / (2 - 2 / 2) = 7; weights 1/8 each; se = sqrt(1 / (2 / 8)) = 2
    assert apart["q"] == pytest.approx(8.0) and apart["tau2"] == pytest.approx(7.0, rel=1e-5)
    assert apart["re_estimate"] == pytest.approx(2.0)
    assert apart["re_ci_low"] == pytest.approx(2.0 - stats.t.ppf(0.975, 1) * 2.0, rel=1e-5)
    assert np.isnan(seed_heterogeneity([1.0], [0.0], [2.0])["q"])
