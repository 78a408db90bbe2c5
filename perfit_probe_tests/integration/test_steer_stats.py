"""Oracles for the causal checks' statistics, the shared-prefix scorer and a planted swap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from perfit_probe.config import SteerConfig
from perfit_probe.data.prompts import continuation
from perfit_probe.evaluation.shared_prefix import PrefixStore, score_label_variants, single_token_labels
from perfit_probe.evaluation.steer import random_subspace, steer_checks
from perfit_probe.evaluation.steer_stats import (
    dose_intervals,
    random_percentile,
    swap_tests,
    verdicts,
    within_group_permutations,
)
from perfit_probe.evaluation.uncertainty import QueryStats
from perfit_probe.interventions import PerFit, score_labels
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.planted import planted_task, random_perfit
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(rng, n_rec: int = 12, donors_per: int = 3, effect: float = 0.0, rating: bool = False) -> pd.DataFrame:
    """Random swap pairs; ``effect`` > 0 makes the swap distance smaller than the own one."""
    rows = []
    for b in range(n_rec):
        own = rng.random()
        for a in rng.choice([x for x in range(n_rec) if x != b], donors_per, replace=False):
            swap = rng.random() - effect
            rec = {"donor": f"u{a}", "recipient": f"u{b}", "own_distance": own, "swap_distance": swap,
                   "own_distance_pred": own, "swap_distance_pred": rng.random() - effect}
            if rating:
                gap = rng.normal()
                rec.update(donor_mean=gap, recipient_mean=0.0, own_pred=0.0, swap_pred=effect * gap + rng.normal())
            rows.append(rec)
    return pd.DataFrame(rows)


def _metric(rows: list[dict], name: str) -> float:
    return next(r["value"] for r in rows if r["metric"] == name)


def test_swap_p_values_are_uniform_under_the_null_and_small_under_a_planted_effect():
    rng = np.random.default_rng(0)
    ps, corr_ps = [], []
    for _ in range(200):
        rows = swap_tests(_pairs(rng, rating=True), rng, n_boot=20, n_perm=400)
        ps.append(_metric(rows, "toward_donor_share_p"))
        corr_ps.append(_metric(rows, "shift_gap_correlation_p"))
    for values in (np.array(ps), np.array(corr_ps)):  # the sign statistic is discrete: slightly conservative
        assert 0.03 <= (values <= 0.1).mean() <= 0.17  # nominal 0.1
        assert 0.36 <= (values <= 0.5).mean() <= 0.62
        assert 0.4 <= values.mean() <= 0.63
    planted = swap_tests(_pairs(rng, effect=1.0, rating=True), rng, n_boot=200, n_perm=2000)
    assert _metric(planted, "n_toward_donor") == 36 and _metric(planted, "toward_donor_share_ci_low") == 1.0
    assert _metric(planted, "toward_donor_share_p") < 0.002  # every recipient moved: 2 / 2^12 patterns at most
    assert _metric(planted, "shift_gap_correlation_p") < 0.01
    assert _metric(planted, "n_recipients") == 12


def test_recipient_bootstrap_interval_covers_the_population_share():
    rng = np.random.default_rng(1)
    covered = []
    for _ in range(200):
        rows = []
        for b in range(40):
            p_b = rng.uniform(0.3, 0.9)  # population share of pairs moving toward the donor: 0.6
            for a in range(3):
                toward = rng.random() < p_b
                rows.append({"donor": f"d{a}", "recipient": f"r{b}", "own_distance": 1.0,
                             "swap_distance": 0.0 if toward else 2.0, "own_distance_pred": 1.0,
                             "swap_distance_pred": 0.0})
        out = swap_tests(pd.DataFrame(rows), rng, n_boot=300, n_perm=10)
        covered.append(_metric(out, "toward_donor_share_ci_low") <= 0.6 <= _metric(out, "toward_donor_share_ci_high"))
    assert 0.89 <= np.mean(covered) <= 0.99


def test_dose_intervals_cover_the_mean_and_find_the_planted_best_alpha():
    rng = np.random.default_rng(2)
    covered = []
    for _ in range(150):
        users = np.repeat(np.arange(30), 4)
        expected = 3.0 + np.repeat(rng.normal(0, 0.5, 30), 4) + rng.normal(0, 0.3, len(users))
        keys = pd.MultiIndex.from_arrays([[f"u{u}" for u in users], [str(i) for i in range(len(users))]])
        ones = np.ones(len(users))
        stats = {0.0: QueryStats(keys, {"mae": np.stack([ones, ones], 1),
                                        "mean_pred": np.stack([expected, ones], 1)}, {})}
        rows = dose_intervals(stats, "mae", False, rng, n_boot=300)
        low = next(r["value"] for r in rows if r["metric"] == "mean_pred_ci_low")
        high = next(r["value"] for r in rows if r["metric"] == "mean_pred_ci_high")
        covered.append(low <= 3.0 <= high)
    assert 0.88 <= np.mean(covered) <= 0.99
    # every user's error is smallest at alpha 1: best alpha 1, interval [1, 1]
    keys = pd.MultiIndex.from_arrays([[f"u{i % 5}" for i in range(20)], [str(i) for i in range(20)]])
    ones = np.ones(20)
    stats = {a: QueryStats(keys, {"mae": np.stack([ones * (abs(a - 1) + 0.1), ones], 1)}, {}) for a in (0, 0.5, 1, 2, 3)}
    rows = {(r["setting"], r["metric"]): r["value"] for r in dose_intervals(stats, "mae", False, rng, n_boot=100)}
    assert rows[("best", "alpha")] == 1 and rows[("best", "alpha_ci_low")] == rows[("best", "alpha_ci_high")] == 1
    assert rows[("best", "mae")] == pytest.approx(0.1) and rows[("0.5", "mae_ci_low")] == pytest.approx(0.6)


def test_random_percentile_on_a_hand_made_distribution():
    random = np.arange(100.0)  # 0, 1, ..., 99
    out = random_percentile(95.0, random)
    assert out["percentile"] == pytest.approx(95.5)  # 95 below, one tie counted half
    assert out["p_value"] == pytest.approx(6 / 101)  # 95..99 at least as large, plus the real one
    assert random_percentile(1000.0, random) == {"percentile": 100.0, "p_value": 1 / 101, "n": 100.0}
    assert random_percentile(-1.0, random)["percentile"] == 0.0
    assert np.isnan(random_percentile(float("nan"), random)["percentile"])


def test_within_group_permutations_keep_groups():
    codes = np.array([0, 1, 0, 2, 1, 0])
    perms = within_group_permutations(codes, 50, np.random.default_rng(0))
    assert (codes[perms] == codes[None]).all()
    assert all(sorted(p) == list(range(6)) for p in perms)
    assert len({tuple(p) for p in perms}) > 1


def test_verdicts_read_the_rows():
    rows = pd.DataFrame([
        ("swap", "pairs", "n_pairs", 24), ("swap", "pairs", "n_recipients", 12),
        ("swap", "pairs", "n_toward_donor", 15), ("swap", "pairs", "toward_donor_share_p", 0.15),
        ("swap", "pairs", "toward_donor_share_ci_low", 0.4), ("swap", "pairs", "toward_donor_share_ci_high", 0.8),
        ("swap", "pairs", "n_toward_donor_pred", 17), ("swap", "pairs", "toward_donor_pred_share_p", 0.03),
        ("swap", "pairs", "toward_donor_pred_share_ci_low", 0.5),
        ("swap", "pairs", "toward_donor_pred_share_ci_high", 0.9),
        ("ablation", "perfit_ablate_personal", "random_percentile", 98.0),
        ("ablation", "perfit_ablate_personal", "random_p", 0.04),
        ("ablation", "perfit_ablate_personal", "metric_lost", 0.08),
        ("ablation", "perfit_ablate_personal", "gain_removed", 1.2),
        ("ablation", "random_subspaces", "n", 50), ("ablation", "subspace", "k", 13),
        ("dose", "0", "mean_pred", 3.6), ("dose", "3", "mean_pred", 3.9), ("dose", "best", "alpha", 1.0),
        ("dose", "best", "alpha_ci_low", 0.5), ("dose", "best", "alpha_ci_high", 1.5), ("dose", "best", "mae", 0.79),
    ], columns=["experiment", "setting", "metric", "value"])
    lines = verdicts(rows)
    assert lines[0].startswith("user swap: 15 of 24 pairs move toward the donor's history behaviour (p = 0.15, "
                               "95% CI of the share 40%-80%")
    assert "17 of 24" in lines[1]
    assert "at the 98th percentile of 50 random 13-dimensional subspaces" in lines[2]
    assert lines[3].startswith("dose: best alpha 1 by mae (0.79; 95% CI of the best alpha 0.5 to 1.5")
    assert "3.60 at alpha 0 -> 3.90 at alpha 3" in lines[3]
    assert verdicts(rows[rows.experiment == "dose"]) == lines[3:]


def test_stacked_ablation_bases_equal_one_basis_at_a_time():
    gen = torch.Generator().manual_seed(0)
    bases = torch.randn(3, 2, 8, generator=gen)
    h = torch.randn(6, 2, 8, generator=gen)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    for mode in ("hidden", "edit"):
        stacked = Intervention(sites=[Site(0)], positions=parse_positions("l2"), ablate_basis=bases,
                               ablate_mode=mode)
        got = stacked.delta(0, h, None, torch.ones(6), None, index)
        for row, g in enumerate(index.tolist()):
            single = Intervention(sites=[Site(0)], positions=parse_positions("l2"), ablate_basis=bases[g],
                                  ablate_mode=mode)
            torch.testing.assert_close(got[row], single.delta(0, h[row:row + 1], None, torch.ones(1))[0])
    with pytest.raises(Exception, match="ablate_index"):
        stacked.set_batch(torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("positions", ["l2", "f1+l2"])
def test_shared_prefix_scores_equal_score_labels_per_variant(positions):
    loaded = tiny_model("llama")
    users = ["a", "b"]
    perfit = random_perfit(loaded, users)
    if positions != "f1+l2":  # the same banks at the last two positions only: a shared prefix
        for bank in (perfit.collective, perfit.personal):
            bank.spec = BankSpec(bank.spec.kind, bank.spec.sites, parse_positions(positions), bank.spec.rank,
                                 bank.spec.d_model)
    prompts = ["Predict the rating of alpha beta", "History of the user: Toy Story (1995) rated 4; Fargo",
               "Answer with a single number.", "gamma"]
    owners = ["a", "b", "b", "a"]
    labels = ["1", "2", "3", "4", "5"]
    assert single_token_labels(loaded.tokenizer, labels) is not None
    scales = [0.0, 1.0, 2.5]
    bases = torch.stack([random_subspace(2, loaded.d_model, s) for s in range(3)])
    got = score_label_variants(loaded, prompts, labels, perfit=perfit, user_ids=owners, scales=scales,
                               ablate_bases=bases, batch_size=3, rows_per_pass=4)
    plain = score_label_variants(loaded, prompts, labels, perfit=perfit, user_ids=owners, scales=scales)
    for v, s in enumerate(scales):
        want = score_labels(loaded, prompts, labels, perfit=perfit, user_ids=owners, scale=s,
                            ablate_basis=bases[v], batch_size=3)
        torch.testing.assert_close(got[v], want, atol=1e-4, rtol=0)
        want = score_labels(loaded, prompts, labels, perfit=perfit, user_ids=owners, scale=s, batch_size=3)
        torch.testing.assert_close(plain[v], want, atol=1e-4, rtol=0)


def test_planted_personal_slot_pulls_swap_recipients_toward_its_label():
    """User b's slot writes the unembedding direction of "5" at the last position of the last block."""
    loaded = tiny_model("llama")
    task, split = planted_task()
    d = loaded.d_model
    five = single_token_labels(loaded.tokenizer, [continuation("5", loaded.tokenizer, None)])[0]
    direction = loaded.model.lm_head.weight[five].detach().float()
    direction = direction / direction.norm()
    spec = BankSpec("lobireft", (Site(3),), parse_positions("l1"), 1, d)
    collective = InterventionBank.initialised(spec, ["collective"], "zero", 0)
    personal = InterventionBank(spec, list(split.test_users))
    with torch.no_grad():
        for bank in (collective, personal):
            bank.site_params[0].A.copy_(direction.expand_as(bank.site_params[0].A))
        personal.site_params[0].b[personal.keys.index("b")] = 60.0  # edit = R^T b = 60 * direction
    perfit = PerFit(collective.requires_grad_(False), personal.requires_grad_(False), "sum", loaded.identity.to_dict())
    result = steer_checks(loaded, task, split, perfit, SteerConfig(experiments=("swap",), n_boot=200, n_perm=1000))
    pairs = result.pairs
    from_b = pairs[pairs.donor == "b"]
    assert len(from_b) == 3 and (from_b.swap_pred > from_b.own_pred + 0.25).all()
    assert (from_b.swap_distance < from_b.own_distance).all()  # b's history rates everything 5
    others = pairs[pairs.donor != "b"]
    recipient_b = others.recipient == "b"
    # other donors have no edit: their swap takes b's planted pull away, other recipients stay put
    assert (others[recipient_b].swap_pred < others[recipient_b].own_pred - 0.25).all()
    np.testing.assert_allclose(others[~recipient_b].swap_pred, others[~recipient_b].own_pred, atol=1e-5)
    rows = result.rows
    assert {"toward_donor_share_p", "toward_donor_share_ci_low", "shift_gap_correlation_p"} <= set(rows.metric)
    assert result.verdicts and result.verdicts[0].startswith("user swap: ")


def test_shared_prefix_per_variant_users_stages_and_reused_prefixes_match_ordinary_passes():
    """Oracle: ``score_labels`` (whole prompts, one pass per variant). Per-variant user ids (the
    swap's donors), the collective stage and the model alone, and prefixes kept across calls
    in a ``PrefixStore`` give the same scores as ordinary passes."""
    loaded = tiny_model("llama")
    perfit = random_perfit(loaded, ["a", "b"])
    for bank in (perfit.collective, perfit.personal):  # the last two positions: a shared prefix
        bank.spec = BankSpec(bank.spec.kind, bank.spec.sites, parse_positions("l2"), bank.spec.rank, bank.spec.d_model)
    prompts = ["the first prompt is a bit longer than", "second one", "a third prompt here", "four"]
    owners = ["a", "b", "b", "a"]
    labels = ["1", "2", "3", "4", "5"]
    store = PrefixStore()
    donors = [["b"] * 4, ["a"] * 4, owners]
    for _ in range(2):  # the second round reuses the stored prefixes
        got = score_label_variants(loaded, prompts, labels, perfit=perfit, user_ids=donors, scales=[1.0] * 3,
                                   batch_size=3, rows_per_pass=4, prefixes=store)
        for v, ids in enumerate(donors):
            want = score_labels(loaded, prompts, labels, perfit=perfit, user_ids=ids, batch_size=3)
            torch.testing.assert_close(got[v], want, atol=1e-4, rtol=0)
        for stage in ("collective", "none"):
            got = score_label_variants(loaded, prompts, labels, perfit=perfit, user_ids=owners, scales=[1.0],
                                       stage=stage, batch_size=3, prefixes=store)
            want = score_labels(loaded, prompts, labels, perfit=perfit, user_ids=owners, stage=stage, batch_size=3)
            torch.testing.assert_close(got[0], want, atol=1e-4, rtol=0)
    assert len(store._caches) == 2  # one prefix per batch of prompts, computed once
    with pytest.raises(Exception, match="one per prompt"):
        score_label_variants(loaded, prompts, labels, perfit=perfit, user_ids=[owners], scales=[1.0, 2.0])


@pytest.mark.parametrize("clamp, positions, cut", [("pyreft", "l2", 4), ("cover", "l2", 2), ("pyreft", "l1", 2),
                                                   ("cover", "last", 1), ("pyreft", "f1+l2", None)])
def test_shared_prefix_cut_keeps_the_position_rule(clamp, positions, cut):
    """Hand-computed cuts: under ``pyreft`` the last ``s`` tokens need a ``2 s``-token suffix
    (``s' = min(s, n // 2)``), under ``cover`` ``s`` tokens; a first-token spec shares nothing."""
    from perfit_probe.evaluation.shared_prefix import _prefix_length

    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate((12, 9, 6)):  # left padding
        mask[row, 12 - length:] = 1
    iv = Intervention(sites=[Site(0)], positions=parse_positions(positions), position_clamp=clamp)
    assert _prefix_length(iv, mask) == (0 if cut is None else 12 - cut)
