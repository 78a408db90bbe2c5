"""Shift estimator, nulls and collective statistics, checked against oracles and planted structure."""

from __future__ import annotations

import numpy as np
import pytest

from perfit_probe.analysis.collective import (
    collective_direction, collective_summary, cosine_matrix, heldout_mask, identify_users,
    per_user_collective, variance_ratio,
)
from perfit_probe.analysis.nulls import (
    bootstrap_ranks, bootstrap_spectra, bootstrap_weights, derangement, gaussian_null,
    shuffled_deltas,
)
from perfit_probe.analysis.shift import ShiftPCA, cumulative_energy, energy_spectrum, rank_at_energy
from perfit_probe.analysis.synthetic import planted_deltas
from perfit_probe.analysis.tables import AnalysisConfig, AnalysisResult, analyze_deltas
from perfit_probe.errors import ConfigError

TAUS = (0.8, 0.9, 0.95)


def _low_rank(n=60, d=64, k=5, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(5.0, 1.0, k)
    return (rng.standard_normal((n, k)) * scales) @ rng.standard_normal((k, d)) + noise * rng.standard_normal((n, d))


def _oracle_rank(x, tau, center):
    """Brute force: count components until the energy share reaches tau."""
    x = x - x.mean(0) if center else x
    s2 = np.linalg.svd(x, compute_uv=False) ** 2
    total, acc = s2.sum(), 0.0
    for k, v in enumerate(s2, start=1):
        acc += v
        if acc / total >= tau - 1e-12:
            return k
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ estimator


@pytest.mark.parametrize("center", [False, True])
def test_shiftpca_matches_numpy_svd(center):
    x = _low_rank(n=30, d=20, k=20, noise=0.1)
    pca = ShiftPCA(center=center, svd="exact").fit(x)
    xc = x - x.mean(0) if center else x
    s = np.linalg.svd(xc, compute_uv=False)
    np.testing.assert_allclose(pca.singular_values_, s, rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance_ratio_, s**2 / (s**2).sum(), rtol=1e-10)
    np.testing.assert_allclose(pca.components_ @ pca.components_.T, np.eye(20), atol=1e-10)
    np.testing.assert_allclose(pca.mean_, x.mean(0) if center else 0.0)
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(x)), x, atol=1e-9)
    assert pca.max_rank_ == 20 and pca.fit(x) is pca
    for tau in TAUS:
        assert pca.rank_at(tau) == _oracle_rank(x, tau, center)
        assert pca.rank_per_mille(tau) == pytest.approx(1000 * _oracle_rank(x, tau, center) / 20)


def test_exact_and_randomized_svd_agree():
    x = _low_rank(n=80, d=64, k=6, noise=0.01)
    for center in (False, True):
        exact = ShiftPCA(center=center, svd="exact", n_components=10).fit(x)
        rand = ShiftPCA(center=center, svd="randomized", n_components=10, random_state=3).fit(x)
        assert rand.svd_used_ == "randomized"
        np.testing.assert_allclose(rand.singular_values_[:6], exact.singular_values_[:6], rtol=1e-6)
        np.testing.assert_allclose(rand.components_[:6], exact.components_[:6], atol=1e-5)
        np.testing.assert_allclose(rand.explained_variance_ratio_, exact.explained_variance_ratio_, atol=1e-6)
        for tau in TAUS:
            assert rand.rank_at(tau) == exact.rank_at(tau)


def test_truncated_fit_refuses_unreached_tau():
    x = np.random.default_rng(1).standard_normal((40, 64))
    pca = ShiftPCA(svd="randomized", n_components=2).fit(x)
    with pytest.raises(ConfigError, match="n_components"):
        pca.rank_at(0.9)
    with pytest.raises(ConfigError):
        rank_at_energy(np.array([0.5, 1.0]), 0.0)


def test_spectrum_helpers_match_svd():
    x = _low_rank(n=12, d=30, k=12, noise=0.1)
    for mat in (x, x.T):
        for center in (False, True):
            xc = mat - mat.mean(0) if center else mat
            np.testing.assert_allclose(energy_spectrum(mat, center),
                                       np.linalg.svd(xc, compute_uv=False) ** 2, rtol=1e-8, atol=1e-8)
    cum = cumulative_energy(np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(cum, [[0.75, 1.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(rank_at_energy(cum, 0.8), [2, 0])


def test_rank_recovers_planted_rank():
    """c = 3, s = 1, k = 3: uncentred energies 9:1:1:1, centred 1:1:1 (plus small noise)."""
    deltas, truth = planted_deltas(n_users=40, n_sites=2, d_model=64, rank=3, collective_norm=3.0,
                                   personal_scale=1.0, noise=0.05, seed=1)
    planted_uncentred = np.array([9.0, 1.0, 1.0, 1.0])
    for site in range(2):
        x = deltas.enhanced[:, site].double().numpy()
        for tau in TAUS:
            expected = rank_at_energy(np.cumsum(planted_uncentred) / planted_uncentred.sum(), tau)
            assert ShiftPCA(center=False).fit(x).rank_at(tau) == expected
            assert ShiftPCA(center=True).fit(x).rank_at(tau) == truth.rank
        cos = abs(collective_direction(x) @ truth.collective_direction[site])
        assert cos > 0.99
        pc1 = ShiftPCA(center=False).fit(x).components_[0]
        assert abs(pc1 @ truth.collective_direction[site]) > 0.99


# ------------------------------------------------------------------ nulls


def test_gaussian_null_matches_norms_and_has_high_rank():
    deltas, _ = planted_deltas(n_users=40, n_sites=1, d_model=64, rank=2, seed=2)
    x = deltas.enhanced[:, 0].double().numpy()
    rng = np.random.default_rng(0)
    null = gaussian_null(x, rng)
    np.testing.assert_allclose(np.linalg.norm(null, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    iso = rng.standard_normal((40, 64))
    for tau in TAUS:
        null_rank = ShiftPCA().fit(null).rank_at(tau)
        # an independent isotropic draw is the oracle; the planted deltas are far below it
        assert abs(null_rank - _oracle_rank(iso, tau, False)) <= 3
        assert null_rank >= 0.4 * 40
        assert ShiftPCA().fit(x).rank_at(tau) <= 3


def test_isotropic_deltas_have_high_rank_like_their_null():
    deltas, _ = planted_deltas(n_users=40, n_sites=1, d_model=64, rank=0, collective_norm=0.0,
                               personal_scale=0.0, noise=1.0, seed=3)
    x = deltas.enhanced[:, 0].double().numpy()
    null = gaussian_null(x, np.random.default_rng(4))
    for tau in TAUS:
        assert abs(ShiftPCA().fit(x).rank_at(tau) - ShiftPCA().fit(null).rank_at(tau)) <= 3
        assert ShiftPCA().fit(x).rank_per_mille(tau) > 400


def test_shuffled_deltas_pair_enhanced_with_other_users_plain():
    rng = np.random.default_rng(5)
    enhanced, plain = rng.standard_normal((7, 4)), rng.standard_normal((7, 4))
    shuffled, perm = shuffled_deltas(enhanced, plain, np.random.default_rng(6))
    assert not np.any(perm == np.arange(7)) and sorted(perm) == list(range(7))
    for u in range(7):
        np.testing.assert_allclose(shuffled[u], (plain[u] + enhanced[u]) - plain[perm[u]])
    with pytest.raises(ValueError):
        derangement(1, rng)


@pytest.mark.parametrize("shape", [(8, 20), (20, 6)])
@pytest.mark.parametrize("center", [False, True])
def test_bootstrap_spectra_match_explicit_resamples(shape, center):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    n = shape[0]
    counts = bootstrap_weights(n, 5, rng, "classic")
    np.testing.assert_allclose(counts.sum(1), n)
    spectra = bootstrap_spectra(x, counts, center)
    for b, w in enumerate(counts):
        resampled = np.repeat(x, w.astype(int), axis=0)
        oracle = energy_spectrum(resampled, center)[: min(shape)]
        np.testing.assert_allclose(spectra[b], np.pad(oracle, (0, min(shape) - len(oracle))), atol=1e-8)
    dirichlet = bootstrap_weights(n, 4, rng, "bayesian")
    np.testing.assert_allclose(dirichlet.sum(1), n)
    spectra = bootstrap_spectra(x, dirichlet, center)
    for b, w in enumerate(dirichlet):
        mu = w @ x / n if center else 0.0
        oracle = np.linalg.svd(np.sqrt(w)[:, None] * (x - mu), compute_uv=False) ** 2
        np.testing.assert_allclose(spectra[b], oracle, atol=1e-8)
    ranks = bootstrap_ranks(x, dirichlet, center, TAUS)
    assert ranks.shape == (4, 3) and np.all(np.diff(ranks, axis=1) >= 0)


# ------------------------------------------------------------------ collective vs personal


def test_collective_summary_matches_direct_formulas_and_resamples():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((15, 10)) + 2.0
    mu = x.mean(0)
    point = collective_summary(x)
    energy = ((x @ mu) ** 2).sum() / (mu @ mu) / (x**2).sum()
    cos = x @ mu / (np.linalg.norm(x, axis=1) * np.linalg.norm(mu))
    ratio = np.linalg.norm(x - mu, axis=1) / np.linalg.norm(mu)
    assert point["energy_share"][0] == pytest.approx(energy)
    assert point["cos_to_mean_mean"][0] == pytest.approx(cos.mean())
    assert point["norm_ratio_mean"][0] == pytest.approx(ratio.mean())
    assert point["norm_ratio_rms"][0] == pytest.approx(np.sqrt((ratio**2).mean()))
    users = per_user_collective(x, [str(i) for i in range(15)])
    np.testing.assert_allclose(users["cos_to_mean"], cos)
    np.testing.assert_allclose(users["norm_ratio"], ratio)
    counts = bootstrap_weights(15, 4, rng, "classic")
    boot = collective_summary(x, counts)
    for b, w in enumerate(counts):
        direct = collective_summary(np.repeat(x, w.astype(int), axis=0))
        for stat, values in direct.items():
            assert boot[stat][b] == pytest.approx(values[0])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine_matrix(x), unit @ unit.T)


def _queries(deltas, site=0):
    return deltas.query_delta[:, site].double().numpy(), np.asarray(deltas.query_user_ids)


def test_variance_ratio_matches_anova_oracle_and_detects_personal_shift():
    deltas, _ = planted_deltas(n_users=12, n_sites=1, d_model=16, rank=2, personal_scale=0.3,
                               noise=1.0, n_queries=6, seed=9)
    q, labels = _queries(deltas)
    vr = variance_ratio(q, labels, 99, np.random.default_rng(0))
    grand = q.mean(0)
    users = np.unique(labels)
    ss_b = sum((labels == u).sum() * np.sum((q[labels == u].mean(0) - grand) ** 2) for u in users)
    ss_w = sum(np.sum((q[labels == u] - q[labels == u].mean(0)) ** 2) for u in users)
    oracle = (ss_b / (len(users) - 1)) / (ss_w / (len(q) - len(users)))
    assert vr.f_ratio == pytest.approx(oracle)
    assert vr.p_value == pytest.approx(0.01)  # 1 / (1 + 99): no permutation reaches F
    null_deltas, _ = planted_deltas(n_users=12, n_sites=1, d_model=16, rank=2, personal_scale=0.0,
                                    noise=1.0, n_queries=6, seed=9)
    null = variance_ratio(*_queries(null_deltas), 99, np.random.default_rng(0))
    assert null.p_value > 0.05 and 0.5 < null.f_ratio < 2.0
    with pytest.raises(ConfigError):
        variance_ratio(q[:2], labels[:2], 10, np.random.default_rng(0))


def test_heldout_split_is_deterministic_and_takes_last_queries():
    labels = np.array(["a"] * 5 + ["b"] * 2 + ["c"])
    mask = heldout_mask(labels, 0.3)
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 0, 1, 0])
    with pytest.raises(ConfigError):
        heldout_mask(labels, 1.0)


@pytest.mark.parametrize("classifier", ["centroid", "logistic"])
def test_user_identification_chance_without_and_high_with_personal_shift(classifier):
    kwargs = dict(n_users=20, n_sites=1, d_model=32, rank=4, noise=1.0, n_queries=10, seed=11)
    none, _ = planted_deltas(personal_scale=0.0, **kwargs)
    some, _ = planted_deltas(personal_scale=1.0, **kwargs)
    low = identify_users(*_queries(none), classifier=classifier)
    high = identify_users(*_queries(some), classifier=classifier)
    assert low.n_test == 60 and low.chance == pytest.approx(1 / 20)
    assert low.accuracy <= low.chance + 0.1 and low.p_value > 0.01
    assert high.accuracy >= 0.8 and high.p_value < 1e-6


# ------------------------------------------------------------------ the tables


def test_analyze_deltas_tables_and_round_trip(tmp_path):
    deltas, _ = planted_deltas(n_users=20, n_sites=2, d_model=24, rank=2, n_queries=4, seed=12)
    config = AnalysisConfig(n_boot=20, n_perm=20, max_figure_sites=1)
    result = analyze_deltas(deltas, config)
    ranks = result.ranks
    # one row per site x statistic x source x centring
    assert len(ranks) == 2 * 6 * 4 * 2
    assert not ranks.duplicated(["site", "source", "centered", "statistic"]).any()
    x = deltas.enhanced[:, 1].double().numpy()
    for center in (False, True):
        row = ranks[(ranks.site == deltas.sites[1]) & (ranks.source == "deltas")
                    & (ranks.centered == center) & (ranks.statistic == "rank@0.9")].iloc[0]
        assert row.value == ShiftPCA(center=center).fit(x).rank_at(0.9)
        assert row.ci_low <= row.ci_high
    coll = result.collective
    assert {"energy_share", "f_ratio", "id_accuracy", "id_chance"} <= set(coll.statistic)
    assert set(result.projection.site) == {deltas.sites[0]}
    assert len(result.user_cosine) == 20 * 20
    again = analyze_deltas(deltas, config)
    np.testing.assert_array_equal(again.ranks["ci_low"], ranks["ci_low"])  # seeded
    result.save(tmp_path)
    loaded = AnalysisResult.load(tmp_path)
    for name in ("ranks", "collective", "curves", "user_stats", "projection", "user_cosine"):
        a, b = getattr(result, name), getattr(loaded, name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
    np.testing.assert_allclose(loaded.ranks["value"], ranks["value"])
    assert loaded.summary() == result.summary()


def test_analyze_deltas_skips_missing_nulls():
    deltas, _ = planted_deltas(n_users=10, n_sites=1, d_model=12, rank=1, n_queries=2, seed=13)
    deltas.control = None
    deltas.query_delta, deltas.query_user_ids, deltas.query_ids = None, [], []
    result = analyze_deltas(deltas, AnalysisConfig(n_boot=5, n_perm=5))
    assert set(result.ranks.source) == {"deltas", "gaussian_null", "shuffled"}
    assert result.meta["skipped_sources"] == ["control"]
    assert "f_ratio" not in set(result.collective.statistic)
    with pytest.raises(ConfigError, match="sources"):
        AnalysisConfig(sources=("deltas", "nope"))
