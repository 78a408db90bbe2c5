"""Shift estimator, nulls and collective statistics, checked against oracles and planted structure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perfit_probe.data.controls import derangement
from perfit_probe.errors import ConfigError

from perfit_probe.analysis.collective import (
    collective_direction, collective_summary, cosine_matrix, heldout_mask, identify_users,
    per_user_collective, variance_ratio,
)
from perfit_probe.analysis.nulls import (
    bootstrap_ranks, bootstrap_spectra, bootstrap_weights, gaussian_null,
    shuffled_deltas,
)
from perfit_probe.analysis.shift import ShiftPCA, cumulative_energy, energy_spectrum, rank_at_energy
from perfit_probe.analysis.synthetic import planted_deltas
from perfit_probe.analysis.tables import AnalysisResult, analyze_deltas
from perfit_probe.config import AnalysisConfig
from perfit_probe.errors import ConfigError
from perfit_probe_tests.oracles import oracle_rank

TAUS = (0.8, 0.9, 0.95)


def _low_rank(n=60, d=64, k=5, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(5.0, 1.0, k)
    return (rng.standard_normal((n, k)) * scales) @ rng.standard_normal((k, d)) + noise * rng.standard_normal((n, d))


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
        assert pca.rank_at(tau) == oracle_rank(x, tau, center)
        assert pca.rank_per_mille(tau) == pytest.approx(1000 * oracle_rank(x, tau, center) / 20)


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
        assert abs(null_rank - oracle_rank(iso, tau, False)) <= 3
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
    with pytest.raises(ConfigError, match="at least two"):
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


# ------------------------------------------------------------------ constructed cases


CROSS = np.array([[3.0, 4.0, 0.0], [3.0, -4.0, 0.0], [3.0, 0.0, 4.0], [3.0, 0.0, -4.0]])
"""Four users: a collective shift (3, 0, 0) plus personal shifts of norm 4 orthogonal to it.
By hand: X^T X = diag(36, 32, 32); every ||x_u|| = 5; mu = (3, 0, 0)."""


def test_rank_and_spectrum_of_a_hand_computed_case():
    pca = ShiftPCA(center=False).fit(CROSS)
    np.testing.assert_allclose(pca.singular_values_ ** 2, [36.0, 32.0, 32.0], rtol=1e-12)
    np.testing.assert_allclose(pca.cumulative_ratio_, [0.36, 0.68, 1.0], rtol=1e-12)
    assert abs(pca.components_[0] @ [1.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert [pca.rank_at(t) for t in (0.3, 0.36, 0.5, 0.8)] == [1, 1, 2, 3]
    assert pca.rank_per_mille(0.8) == pytest.approx(1000.0)  # 3 of min(4, 3) = 3
    centred = ShiftPCA(center=True).fit(CROSS)  # the mean direction carries nothing once removed
    np.testing.assert_allclose(centred.singular_values_ ** 2, [32.0, 32.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(centred.mean_, [3.0, 0.0, 0.0])
    assert [centred.rank_at(t) for t in (0.5, 0.8, 1.0)] == [1, 2, 2]
    np.testing.assert_allclose(energy_spectrum(CROSS, True), [32.0, 32.0, 0.0], atol=1e-12)


def test_collective_statistics_of_a_hand_computed_case():
    point = {k: v[0] for k, v in collective_summary(CROSS).items()}
    assert point["energy_share"] == pytest.approx(4 * 9 / (4 * 25))  # (x.mu_hat)^2 = 9, ||x||^2 = 25
    assert point["cos_to_mean_mean"] == pytest.approx(3 / 5)
    assert point["norm_ratio_mean"] == pytest.approx(4 / 3)
    assert point["norm_ratio_rms"] == pytest.approx(4 / 3)
    assert point["collective_norm"] == pytest.approx(3.0)
    assert point["delta_norm_mean"] == pytest.approx(5.0)
    np.testing.assert_allclose(collective_direction(CROSS), [1.0, 0.0, 0.0])
    users = per_user_collective(CROSS, list("abcd"))
    np.testing.assert_allclose(users["cos_to_mean"], 0.6)
    np.testing.assert_allclose(users["personal_norm"], 4.0)
    np.testing.assert_allclose(users["norm"], 5.0)
    # (3,4,0).(3,-4,0) = -7, (3,4,0).(3,0,+-4) = 9, over 25
    expected = np.array([[25, -7, 9, 9], [-7, 25, 9, 9], [9, 9, 25, -7], [9, 9, -7, 25]]) / 25
    np.testing.assert_allclose(cosine_matrix(CROSS), expected, atol=1e-12)
    # a pure collective shift: all energy along the mean, every user on it
    pure = collective_summary(np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))
    assert pure["energy_share"][0] == pytest.approx(1.0) and pure["cos_to_mean_mean"][0] == pytest.approx(1.0)
    assert pure["norm_ratio_rms"][0] == pytest.approx(np.sqrt(2 / 3) / 2)  # personal: -1, 0, +1 times mu


def test_variance_ratio_of_a_hand_computed_case():
    """User a: 1, 3 (mean 2); user b: 5, 7 (mean 6); grand mean 4.
    SS_between = 2*4 + 2*4 = 16 on 1 df; SS_within = 4 * 1 on 4 - 2 = 2 df; F = 16 / 2 = 8.
    The 6 equally likely splits of the 4 values into two labelled pairs give F = 8 twice
    ({1,3}|{5,7} either way) and F = 0.25 or 0 otherwise: the exact permutation p is 1/3."""
    q = np.array([[1.0], [3.0], [5.0], [7.0]])
    labels = ["a", "a", "b", "b"]
    vr = variance_ratio(q, labels, 3000, np.random.default_rng(0))
    assert vr.f_ratio == pytest.approx(8.0)
    assert vr.between == pytest.approx(16.0) and vr.within == pytest.approx(2.0)
    assert (vr.n_users, vr.n_queries) == (2, 4)
    assert vr.p_value == pytest.approx(1 / 3, abs=0.03)
    # labels given in any order describe the same groups
    shuffled = variance_ratio(q[[2, 0, 3, 1]], ["b", "a", "b", "a"], 0, np.random.default_rng(0))
    assert shuffled.f_ratio == pytest.approx(8.0) and shuffled.p_value == 1.0


def test_user_identification_of_hand_computed_cases():
    """Each user's queries sit at their own point: the held-out (last) query of every user is
    named correctly, p = chance ** n_test. When each user's *last* query sits where another user's
    earlier ones are, nearest-centroid names that other user every time: accuracy 0."""
    points = np.eye(4) * 10.0
    labels = np.repeat(["a", "b", "c", "d"], 4)  # 4 queries each: the last 1 held out (0.3 * 4)
    noise = np.random.default_rng(0).standard_normal((16, 4)) * 0.01
    q = points[np.repeat(np.arange(4), 4)] + noise
    ident = identify_users(q, labels)
    assert (ident.accuracy, ident.chance, ident.uniform_chance) == (1.0, 0.25, 0.25)
    assert (ident.n_users, ident.n_train, ident.n_test) == (4, 12, 4)
    assert ident.p_value == pytest.approx(0.25 ** 4)
    moved = q.copy()
    for u in range(4):  # user u's held-out query moves to user (u + 1)'s point
        moved[4 * u + 3] = points[(u + 1) % 4] + noise[4 * u + 3]
    for classifier in ("centroid", "logistic"):
        assert identify_users(moved, labels, classifier=classifier).accuracy == 0.0
    # unequal counts: 10 and 4 queries -> 3 and 1 held out; best constant guess is right 3 of 4
    uneven = identify_users(q[:14], np.array(["a"] * 10 + ["b"] * 4))
    assert uneven.n_test == 4 and uneven.chance == pytest.approx(0.75)


# ------------------------------------------------------------------ the tables


def _table_value(frame, **where):
    sel = frame
    for key, value in where.items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, where
    return sel.iloc[0]


def _nearest_centroid_accuracy(q, labels, heldout_fraction):
    """Hand oracle: the last round(f * n_u) queries of each user are tested against the means
    of every user's earlier queries (Euclidean)."""
    users = sorted(set(labels))
    train, test = [], []
    for u in users:
        rows = [i for i, lab in enumerate(labels) if lab == u]
        k = min(max(1, round(heldout_fraction * len(rows))), len(rows) - 1)
        train += rows[:-k]
        test += rows[-k:]
    centroids = np.stack([q[[i for i in train if labels[i] == u]].mean(0) for u in users])
    hits = [users[int(np.argmin(((centroids - q[i]) ** 2).sum(1)))] == labels[i] for i in test]
    return float(np.mean(hits)), len(test)


PLANTED_TABLE = dict(n_users=20, n_sites=2, d_model=24, rank=2, collective_norm=4.0, personal_scale=1.0,
                     noise=0.1, n_queries=4, seed=12)
"""Collective norm 4 and two whitened personal directions of unit scale: the uncentred
energies are 16 : 1 : 1 (r@0.8 = 1, r@0.9 = 2, r@0.95 = 3), the centred ones 1 : 1 (r = 2)."""
PLANTED_RANKS = {False: {0.8: 1, 0.9: 2, 0.95: 3}, True: {0.8: 2, 0.9: 2, 0.95: 2}}


@pytest.fixture(scope="module")
def planted_table():
    deltas, truth = planted_deltas(**PLANTED_TABLE)
    config = AnalysisConfig(n_boot=50, n_perm=20, max_figure_sites=1)
    return deltas, truth, config, analyze_deltas(deltas, config)


def test_rank_table_equals_numpy_svd_and_the_planted_rank(planted_table):
    deltas, _, _, result = planted_table
    ranks, curves = result.ranks, result.curves
    # one row per site x statistic x source x centring
    assert len(ranks) == 2 * 6 * 4 * 2
    assert not ranks.duplicated(["site", "source", "centered", "statistic"]).any()
    sources = {"deltas": deltas.enhanced, "control": deltas.control}
    for index, site in enumerate(deltas.sites):
        for source, tensor in sources.items():
            x = tensor[:, index].double().numpy()
            for center in (False, True):
                key = dict(site=site, source=source, centered=center)
                for tau in TAUS:
                    rank = _table_value(ranks, statistic=f"rank@{tau:g}", **key)
                    assert rank.value == oracle_rank(x, tau, center), (key, tau)
                    top = 19 if center else 20  # centred: n - 1 directions at most
                    assert (rank.n_users, rank.d_model, rank.max_rank) == (20, 24, top)
                    mille = _table_value(ranks, statistic=f"per_mille@{tau:g}", **key)
                    assert mille.value == pytest.approx(1000 * rank.value / top)
                    assert (mille.ci_low, mille.ci_high) == pytest.approx(
                        (1000 * rank.ci_low / top, 1000 * rank.ci_high / top))
                    if source == "deltas":
                        planted = PLANTED_RANKS[center][tau]
                        assert rank.value == planted
                        # the interval holds the point estimate and the planted rank
                        assert rank.ci_low <= rank.value <= rank.ci_high
                        assert rank.ci_low <= planted <= rank.ci_high
                        if center:  # two directions, negligible noise: no resample finds a third
                            assert rank.ci_high == 2
                xc = x - x.mean(0) if center else x
                s2 = np.linalg.svd(xc, compute_uv=False) ** 2
                curve = curves[(curves.site == site) & (curves.source == source) & (curves.centered == center)]
                np.testing.assert_array_equal(curve.component, np.arange(1, 21))
                np.testing.assert_allclose(curve.cumulative, np.cumsum(s2) / s2.sum(), atol=1e-10)
    # the noise-only control is far from low rank, the Gaussian null too
    control = ranks[(ranks.source == "control") & (ranks.statistic == "rank@0.9")]
    null = ranks[(ranks.source == "gaussian_null") & (ranks.statistic == "rank@0.9")]
    assert control.value.min() >= 8 and null[~null.centered].value.min() >= 8


def test_collective_table_equals_planted_truth_and_hand_formulas(planted_table):
    deltas, truth, config, result = planted_table
    coll = result.collective
    for index, site in enumerate(deltas.sites):
        # noise-free truth from the planted coefficients: x_u = 4 c + a_u, a_u orthogonal to c, sum_u a_u = 0
        a2 = np.square(truth.coefficients[:, index]).sum(1)  # ||a_u||^2
        expected = {
            "energy_share": 16 * 20 / (16 * 20 + a2.sum()),
            "cos_to_mean_mean": np.mean(4 / np.sqrt(16 + a2)),
            "norm_ratio_mean": np.mean(np.sqrt(a2) / 4),
            "norm_ratio_rms": np.sqrt(a2.mean()) / 4,  # = sqrt(rank) * scale / 4
            "collective_norm": 4.0,
            "delta_norm_mean": np.mean(np.sqrt(16 + a2)),
            "cos_to_mean_median": np.median(4 / np.sqrt(16 + a2)),
        }
        assert expected["energy_share"] == pytest.approx(16 / 18)
        assert expected["norm_ratio_rms"] == pytest.approx(np.sqrt(2) / 4)
        for stat, value in expected.items():
            row = _table_value(coll, site=site, source="deltas", statistic=stat)
            assert row.value == pytest.approx(value, rel=0.03, abs=0.01), stat
            # (||mean|| of a resample is biased upward, so collective_norm's interval may sit
            # just above the point estimate; the other intervals hold it)
            if stat not in ("cos_to_mean_median", "collective_norm"):
                assert row.ci_low <= row.value <= row.ci_high, stat
            if stat in ("energy_share", "cos_to_mean_mean", "norm_ratio_rms", "delta_norm_mean"):
                assert row.ci_low <= value <= row.ci_high, stat
        # per-query statistics: a one-way ANOVA and a nearest-centroid classifier by hand
        q = deltas.query_delta[:, index].double().numpy()
        labels = list(deltas.query_user_ids)
        users = sorted(set(labels))
        grand = q.mean(0)
        groups = [q[[i for i, lab in enumerate(labels) if lab == u]] for u in users]
        ss_b = sum(len(g) * np.sum((g.mean(0) - grand) ** 2) for g in groups)
        ss_w = sum(np.sum((g - g.mean(0)) ** 2) for g in groups)
        between, within = ss_b / (20 - 1), ss_w / (80 - 20)
        f_row = _table_value(coll, site=site, statistic="f_ratio")
        assert f_row.value == pytest.approx(between / within)
        assert f_row.p_value == pytest.approx(1 / (1 + config.n_perm))  # no permutation comes near
        assert _table_value(coll, site=site, statistic="between_ms").value == pytest.approx(between)
        assert _table_value(coll, site=site, statistic="within_ms").value == pytest.approx(within)
        # planted: between = n_q * sum ||a_u||^2 / (U - 1) = 4 * 40 / 19; within = noise^2 = 0.01
        assert between == pytest.approx(4 * a2.sum() / 19, rel=0.05)
        assert within == pytest.approx(0.01, rel=0.25)
        accuracy, n_test = _nearest_centroid_accuracy(q, labels, config.heldout_fraction)
        assert n_test == 20 and accuracy >= 0.9
        ident = _table_value(coll, site=site, statistic="id_accuracy")
        assert ident.value == pytest.approx(accuracy)
        assert _table_value(coll, site=site, statistic="id_n_test").value == n_test
        assert _table_value(coll, site=site, statistic="id_chance").value == pytest.approx(1 / 20)
        # one-sided binomial test of the hits out of 20 at chance 1/20, summed by hand
        hits = round(accuracy * n_test)
        tail = sum(math.comb(n_test, k) * 0.05**k * 0.95 ** (n_test - k) for k in range(hits, n_test + 1))
        assert ident.p_value == pytest.approx(tail, rel=1e-6)


def test_user_tables_equal_hand_formulas(planted_table):
    deltas, _, _, result = planted_table
    site = deltas.sites[0]
    x = deltas.enhanced[:, 0].double().numpy()
    mu = x.mean(0)
    stats = result.user_stats[(result.user_stats.site == site) & (result.user_stats.source == "deltas")]
    assert list(stats.user_id) == deltas.user_ids
    np.testing.assert_allclose(stats.cos_to_mean, x @ mu / np.linalg.norm(x, axis=1) / np.linalg.norm(mu))
    np.testing.assert_allclose(stats.norm_ratio, np.linalg.norm(x - mu, axis=1) / np.linalg.norm(mu))
    assert set(result.projection.site) == {site}  # max_figure_sites=1
    users = result.projection[result.projection.kind == "user"]
    # PC1-PC2 coordinates (uncentred) up to sign: compare |coordinates| with numpy's SVD
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(np.abs(users[["pc1", "pc2"]].to_numpy()), np.abs(x @ vt[:2].T), atol=1e-8)
    assert users.ratio1.iloc[0] == pytest.approx(s[0] ** 2 / (s**2).sum())
    cos = result.user_cosine
    assert len(cos) == 20 * 20
    a, b = deltas.user_ids[3], deltas.user_ids[7]
    row = cos[(cos.user_a == a) & (cos.user_b == b)].cosine.iloc[0]
    assert row == pytest.approx(x[3] @ x[7] / np.linalg.norm(x[3]) / np.linalg.norm(x[7]))


def test_analysis_is_seeded_and_round_trips(planted_table, tmp_path):
    deltas, _, config, result = planted_table
    again = analyze_deltas(deltas, config)
    pd_equal = np.testing.assert_array_equal
    pd_equal(again.ranks["ci_low"], result.ranks["ci_low"])
    pd_equal(again.collective["value"], result.collective["value"])
    result.save(tmp_path)
    loaded = AnalysisResult.load(tmp_path)
    for name in ("ranks", "collective", "curves", "user_stats", "projection", "user_cosine"):
        a, b = getattr(result, name), getattr(loaded, name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
    np.testing.assert_allclose(loaded.ranks["value"], result.ranks["value"])
    summary = loaded.summary()
    assert summary == result.summary()
    # headline: the planted r@0.9 (2, uncentred) at the lowest-rank site
    assert summary["uncentred"]["deltas"]["rank@0.9"] == 2.0 and summary["centred"]["deltas"]["rank@0.9"] == 2.0
    assert summary["collective"]["energy_share"] == pytest.approx(16 / 18, rel=0.03)


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
