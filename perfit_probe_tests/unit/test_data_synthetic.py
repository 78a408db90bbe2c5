"""The planted-structure generator: its ground truth is what it says it is."""

from __future__ import annotations

import numpy as np
import pytest

from perfit_probe.data import load_task
from perfit_probe.data.synthetic import make_synthetic
from perfit_probe.errors import ConfigError


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_planted_subspace(rank):
    data = make_synthetic(n_users=30, rank=rank, n_features=10, n_items=100, seed=rank)
    gt = data.ground_truth
    basis, factors, offsets, collective = gt["basis"], gt["user_factors"], gt["user_offsets"], gt["collective"]
    assert gt["rank"] == rank and basis.shape == (rank, 10) and factors.shape == (30, rank)
    np.testing.assert_allclose(basis @ basis.T, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose(basis @ collective, 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(collective), 1.0)
    np.testing.assert_allclose(offsets, factors @ basis)
    np.testing.assert_allclose(offsets.mean(axis=0), 0, atol=1e-12)
    assert np.linalg.matrix_rank(offsets) == rank
    # The offsets live in the planted subspace: projecting onto it changes nothing.
    np.testing.assert_allclose(offsets @ basis.T @ basis, offsets, atol=1e-12)
    assert gt["user_ids"] == [u.id for u in data.users]


def test_labels_follow_the_planted_scores():
    data = make_synthetic(n_users=12, n_queries=5, noise=0.0, seed=4)
    gt = data.ground_truth
    items = {iid: j for j, iid in enumerate(gt["item_ids"])}
    total = gt["shared_rule"] + gt["collective"]
    for i, user in enumerate(data.users):
        for item in user.profile:
            x = gt["item_features"][items[item.id]]
            score = x @ (total + gt["user_offsets"][i])
            assert score == pytest.approx(gt["scores"][user.id][item.id])
            label = 1 + int(np.sum(score > gt["thresholds"]))
            assert item.fields["score"] == str(label)
            words = [gt["feature_words"][f] for f in np.flatnonzero(x)]
            assert item.fields["features"] == ", ".join(words)
        profile = {item.id: item for item in user.profile}
        for query in user.queries:
            assert query.output == profile[query.item_id].fields["score"]
            assert query.input.endswith(profile[query.item_id].fields["features"])
        assert len(user.queries) == 5 and len(profile) == len(user.profile)


def _labels_by_item(data):
    """item id -> list of (user index, label) over every user who rated it."""
    out: dict[str, list[tuple[int, int]]] = {}
    for n, user in enumerate(data.users):
        for item in user.profile:
            out.setdefault(item.id, []).append((n, int(item.fields["score"])))
    return out


def test_personal_offsets_change_label_distributions():
    flat = make_synthetic(n_users=60, n_history=40, personal_scale=0.0, seed=7)
    assert np.allclose(flat.ground_truth["user_offsets"], 0)
    # Without personal offsets (and noise) a label is a function of the item alone.
    assert all(len({label for _, label in pairs}) == 1 for pairs in _labels_by_item(flat).values())

    strong = make_synthetic(n_users=60, n_history=40, personal_scale=3.0, seed=7)
    gt = strong.ground_truth
    items = {iid: j for j, iid in enumerate(gt["item_ids"])}
    deviations, effects, spreads = [], [], []
    for iid, pairs in _labels_by_item(strong).items():
        if len(pairs) < 3:
            continue
        labels = np.array([label for _, label in pairs], dtype=float)
        effect = np.array([gt["item_features"][items[iid]] @ gt["user_offsets"][n] for n, _ in pairs])
        spreads.append(labels.std())
        deviations += list(labels - labels.mean())
        effects += list(effect - effect.mean())
    # Users now disagree on the same item, in the direction of their planted offsets.
    assert np.mean(spreads) > 0.5
    assert np.corrcoef(deviations, effects)[0, 1] > 0.7


def test_deterministic_and_seeded():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    assert [u.profile for u in a.users] == [u.profile for u in b.users]
    np.testing.assert_array_equal(a.ground_truth["basis"], b.ground_truth["basis"])
    c = make_synthetic(seed=4)
    assert [u.profile for u in a.users] != [u.profile for u in c.users]
    d = load_task("synthetic", n_users=5, seed=3, max_queries=4)
    assert len(d.users) == 5 and all(len(u.queries) == 4 for u in d.users)


def test_labels_are_balanced_and_valid():
    data = make_synthetic(n_users=40, seed=1)
    labels = [i.fields["score"] for u in data.users for i in u.profile]
    counts = {label: labels.count(label) for label in data.spec.labels}
    assert set(labels) <= set(data.spec.labels)
    assert min(counts.values()) > 0.15 * len(labels)


def test_bad_parameters():
    with pytest.raises(ConfigError, match="rank"):
        make_synthetic(rank=12, n_features=12)
    with pytest.raises(ConfigError, match="n_features"):
        make_synthetic(n_features=500)
    with pytest.raises(ConfigError, match="n_items"):
        make_synthetic(n_features=5, n_items=200)
