"""Controls, repeated nulls, intervals and text baselines of the shift analysis, against oracles."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import wilcoxon

from perfit_probe.analysis.controls import compare_to_control
from perfit_probe.analysis.nulls import (
    anisotropic_null, null_rank_draws, rank_p_value, rank_p_value_randomized,
)
from perfit_probe.analysis.shift import ShiftPCA
from perfit_probe.analysis.synthetic import planted_deltas
from perfit_probe.analysis.tables import AnalysisResult, TEXT_SITE, analyze_deltas
from perfit_probe.analysis.text_baseline import text_identification
from perfit_probe.config import AnalysisConfig
from perfit_probe.stages.analysis_report import render_report

FAST = dict(n_boot=20, n_perm=20, n_null_draws=30, max_figure_sites=1)


def _history(user_ids, query_ids, items_of) -> pd.DataFrame:
    rows = []
    for u, q in zip(user_ids, query_ids):
        ids = items_of(u, q)
        rows.append({"user_id": u, "query_id": q, "variant": "enhanced", "history_ids": json.dumps(ids),
                     "n_items": len(ids), "added_text": "\n".join(f"- movie {i}: 4" for i in ids)})
    return pd.DataFrame(rows)


def test_text_identification_recovers_users_with_disjoint_items():
    users = [f"u{i}" for i in range(6) for _ in range(5)]
    queries = [f"{u}-q{j}" for j, u in enumerate(users)]
    rng = np.random.default_rng(0)
    # each user's queries show 3 of that user's own 6 items: disjoint sets across users
    history = _history(users, queries, lambda u, q: [f"{u}x{k}" for k in rng.choice(6, 3, replace=False)])
    result = text_identification(history, users, queries)
    assert set(result) == {"item_ids", "history_tfidf"}
    for ident in result.values():
        assert ident.accuracy == 1.0 and ident.n_users == 6 and ident.n_test > 0
    # shared items: no user signal in the text, accuracy near chance
    shared = _history(users, queries, lambda u, q: [f"x{k}" for k in rng.choice(6, 3, replace=False)])
    assert text_identification(shared, users, queries)["item_ids"].accuracy < 0.6


def test_repeated_gaussian_p_value_is_uniform_for_gaussian_data_and_small_for_planted():
    rng = np.random.default_rng(1)
    conservative, randomized = [], []
    for _ in range(150):
        x = rng.standard_normal((16, 24))  # the data are themselves draws of the isotropic null
        draws = null_rank_draws(x, "gaussian_null", 39, rng, (False,), (0.9,))[False][:, 0]
        observed = ShiftPCA().fit(x).rank_at(0.9)
        conservative.append(rank_p_value(observed, draws))
        randomized.append(rank_p_value_randomized(observed, draws, rng))
    conservative, randomized = np.array(conservative), np.array(randomized)
    assert np.all(randomized <= conservative)
    for a in (0.1, 0.25, 0.5, 0.75):
        assert abs(np.mean(randomized <= a) - a) < 0.12, a  # uniform (ties broken at random)
        assert np.mean(conservative <= a) <= a + 0.05  # valid (never anti-conservative)
    deltas, _ = planted_deltas(n_users=30, n_sites=1, d_model=48, rank=2, seed=2)
    x = deltas.enhanced[:, 0].double().numpy()
    for kind in ("gaussian_null",):
        for center in (False, True):
            draws = null_rank_draws(x, kind, 99, rng, (center,), (0.9,))[center][:, 0]
            assert rank_p_value(ShiftPCA(center=center).fit(x).rank_at(0.9), draws) == pytest.approx(0.01)
    # uncentred, the anisotropic null lacks the collective shift: the planted rank is far below it
    draws = null_rank_draws(x, "anisotropic_null", 99, rng, (False,), (0.8,))[False][:, 0]
    assert rank_p_value(ShiftPCA().fit(x).rank_at(0.8), draws) == pytest.approx(0.01)


def test_anisotropic_null_reproduces_the_covariance():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 5)) @ np.diag([3.0, 2.0, 1.0, 0.5, 0.1]) + 7.0  # a mean it must drop
    cov = np.cov(x, rowvar=False)
    draws = anisotropic_null(x, rng, n_draws=4000).reshape(-1, 5)
    np.testing.assert_allclose(draws.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(draws.T @ draws / len(draws), cov, atol=0.08 * np.abs(cov).max())
    assert anisotropic_null(x, rng).shape == x.shape


def test_per_mille_uses_n_minus_one_when_centred():
    x = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    # uncentred: 3 equal singular values, r(0.9) = 3 of min(3, 4) = 3 -> 1000
    assert ShiftPCA().fit(x).rank_per_mille(0.9) == pytest.approx(1000.0)
    # centred: 3 points span 2 dimensions with equal energy, r(0.9) = 2 of min(3 - 1, 4) = 2
    pca = ShiftPCA(center=True).fit(x)
    assert pca.max_rank_ == 2 and pca.rank_at(0.9) == 2 and pca.rank_per_mille(0.9) == pytest.approx(1000.0)
    deltas, _ = planted_deltas(n_users=10, n_sites=1, d_model=16, rank=2, n_queries=2, seed=4)
    ranks = analyze_deltas(deltas, AnalysisConfig(**FAST)).ranks
    row = ranks[(ranks.source == "deltas") & ranks.centered & (ranks.statistic == "per_mille@0.9")].iloc[0]
    rank = ranks[(ranks.source == "deltas") & ranks.centered & (ranks.statistic == "rank@0.9")].iloc[0]
    assert row.max_rank == 9 and row.value == pytest.approx(1000 * rank.value / 9)


def test_bootstrap_intervals_contain_the_point_estimate_on_planted_data():
    deltas, _ = planted_deltas(n_users=30, n_sites=2, d_model=32, rank=2, n_queries=4, seed=5)
    result = analyze_deltas(deltas, AnalysisConfig(n_boot=200, n_perm=10, n_null_draws=50))
    for frame in (result.ranks, result.collective):
        sub = frame[(frame.source == "deltas") & frame.ci_low.notna()]
        assert len(sub) > 0
        assert ((sub.ci_low <= sub.value + 1e-9) & (sub.value <= sub.ci_high + 1e-9)).all(), sub
    gauss = result.ranks[result.ranks.source == "gaussian_null"]
    assert set(gauss.interval) == {"null draws"}
    assert ((gauss.ci_low <= gauss.value) & (gauss.value <= gauss.ci_high)).all()
    assert set(result.ranks[result.ranks.source == "deltas"].interval) == {"bootstrap"}


def test_compare_to_control_matches_oracles():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((15, 8)) + 2.0
    control = 0.5 * real + 0.1 * rng.standard_normal((15, 8))
    out = compare_to_control(real, control)
    mu_r, mu_c = real.mean(0), control.mean(0)
    assert out["cos_mean_delta"] == pytest.approx(mu_r @ mu_c / np.linalg.norm(mu_r) / np.linalg.norm(mu_c))
    nr, nc = np.linalg.norm(real, axis=1), np.linalg.norm(control, axis=1)
    assert out["wilcoxon_p"] == pytest.approx(wilcoxon(nr, nc).pvalue)
    assert out["norm_diff_median"] == pytest.approx(np.median(nr - nc))
    assert out["direction"] == "real > control"
    assert compare_to_control(control, real)["direction"] == "control > real"
    same = compare_to_control(real, real)
    assert same["wilcoxon_p"] == 1.0 and same["direction"] == "no clear difference"


def _with_controls(seed=7):
    deltas, _ = planted_deltas(n_users=12, n_sites=2, d_model=16, rank=2, n_queries=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for v, scale in (("other_user", 0.5), ("format_random", 1.5), ("permuted", 1.0)):
        deltas.variant_deltas[v] = scale * deltas.enhanced + 0.01 * torch.randn(deltas.enhanced.shape, generator=g)
    deltas.variant_query_deltas["other_user"] = torch.randn(deltas.query_delta.shape, generator=g)
    history = _history(deltas.query_user_ids, deltas.query_ids, lambda u, q: [f"{u}-a", f"{u}-b"])
    return deltas, history


def test_analysis_reports_controls_nulls_and_text_baselines(tmp_path):
    deltas, history = _with_controls()
    result = analyze_deltas(deltas, AnalysisConfig(**FAST), history)
    assert {"other_user", "format_random", "permuted"} <= set(result.ranks.source)
    assert result.meta["controls_not_cached"] == []
    ctl = result.controls.set_index(["site", "control"])
    row = ctl.loc[(deltas.sites[0], "other_user")]
    assert row.cos_mean_delta == pytest.approx(1.0, abs=1e-3) and row.direction == "real > control"
    assert ctl.loc[(deltas.sites[0], "format_random")].direction == "control > real"
    ident = result.identification
    assert set(ident.loc[ident.site == TEXT_SITE, "features"]) == {"item_ids", "history_tfidf"}
    assert ident.loc[ident.features == "item_ids", "accuracy"].iloc[0] == 1.0
    assert set(ident.loc[ident.site == deltas.sites[0], "features"]) == {"hidden_state", "hidden_state_other_user"}
    hidden = ident[(ident.site == deltas.sites[0]) & (ident.features == "hidden_state")].iloc[0]
    coll = result.collective
    assert hidden.accuracy == coll[(coll.site == deltas.sites[0]) & (coll.statistic == "id_accuracy")].value.iloc[0]
    tests = result.null_tests
    assert set(tests["null"]) == {"gaussian_null", "anisotropic_null"} and (tests.n_draws == 30).all()
    report = render_report(result)
    for section in ("## Controls for claims 1-2", "## Ranks against repeated Gaussian null draws",
                    "## User identification: hidden states against prompt text",
                    "## Intervals that miss their point estimate"):
        assert section in report
    # the verdict sentence is generated from the numbers
    best = ident[ident.site == TEXT_SITE]["accuracy"].max()
    assert f"accuracy {best:.3f}" in report and "names the user of a held-out query" in report
    assert "`other_user` (other-user history deltas): cos of the mean deltas" in report
    result.save(tmp_path)
    loaded = AnalysisResult.load(tmp_path)
    for name in ("null_tests", "controls", "identification"):
        assert len(getattr(loaded, name)) == len(getattr(result, name))
    for name in ("null_tests.csv", "controls.csv", "identification.csv"):  # older analyses load
        (tmp_path / name).unlink()
    assert AnalysisResult.load(tmp_path).controls.empty
