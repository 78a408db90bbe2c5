"""A synthetic rating task with *planted* collective and low-rank personal structure.

Items are objects with ``active`` of ``n_features`` binary features, shown as words
("amber, round, wooden"); item j has the feature vector x_j in {0,1}^F. User i scores item j

    s_ij = (w + c + o_i) . x_j + noise * e_ij,        o_i = u_i B,   e_ij ~ N(0, 1)

where w ~ N(0, I_F) is the shared rule, c = collective_scale * (unit vector) the collective
offset, B (rank x F, orthonormal rows, orthogonal to c) the basis of the personal subspace,
and u_i ~ N(0, personal_scale^2 I_rank) the user factors, centred over users so that the
mean personal offset is exactly zero (c is then exactly the mean offset). Scores become the
labels "1".."5" by thresholds at the 20/40/60/80 % quantiles of all scores. The matrix of
user offsets O = U B has rank ``rank`` exactly (for n_users > rank).

Each user rates ``n_history + n_queries`` distinct items; the profile holds all of them with
their labels, the queries are ``n_queries`` of them (``item_id`` = the item, so retrieval
never shows a query its own label), as in the MovieLens task.

``TaskData.ground_truth`` holds: ``rank``, ``basis`` (rank x F), ``collective`` (F),
``user_factors`` (n_users x rank), ``user_offsets`` (n_users x F), ``user_ids``,
``shared_rule`` (F), ``item_features`` (n_items x F), ``item_ids``, ``thresholds`` (4),
``feature_words``, ``scores`` (user id -> {item id: s_ij}), and the generator parameters.
"""

from __future__ import annotations

import math

import numpy as np

from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.tasks import SYNTHETIC_INPUT, TASKS
from perfit_probe.errors import ConfigError


FEATURE_WORDS = (
    "amber", "azure", "crimson", "golden", "ivory", "olive", "silver", "violet", "round",
    "square", "oval", "flat", "tall", "narrow", "curved", "pointed", "wooden", "metal",
    "glass", "paper", "cotton", "stone", "leather", "plastic", "heavy", "light", "soft",
    "rough", "smooth", "shiny", "dusty", "warm", "cold", "quiet", "loud", "fresh", "old",
    "new", "small", "large", "striped", "dotted", "hollow", "solid", "folded", "woven",
    "carved", "painted",
)
"""Words naming the hidden features (at most this many features)."""

MAX_PROFILE_ITEMS = 2_000_000
"""Most profile items (``n_users * (n_history + n_queries)``) a synthetic task may hold: each
costs about 0.6 KB in memory, so this is about 1.2 GB. Larger requests are refused up front."""


def _labels(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Labels 1..5: 1 + the number of thresholds a score exceeds."""
    return 1 + np.searchsorted(thresholds, scores, side="right")


def make_synthetic(
    n_users: int = 40,
    n_queries: int = 12,
    rank: int = 2,
    n_features: int = 12,
    collective_scale: float = 1.0,
    personal_scale: float = 2.0,
    noise: float = 0.0,
    seed: int = 0,
    *,
    n_history: int = 24,
    n_items: int = 200,
    active: int = 3,
) -> TaskData:
    """Generate the planted-structure task described in the module docstring."""
    _check_options(n_users, n_queries, rank, n_features, n_history=n_history, n_items=n_items, active=active)
    per_user = n_history + n_queries
    rng = np.random.default_rng(seed)
    words = FEATURE_WORDS[:n_features]
    item_combos, features = _draw_items(rng, n_items, n_features, active)
    item_ids = [f"o{j}" for j in range(n_items)]
    shared, collective, basis, factors = _draw_structure(rng, n_features, rank, n_users, collective_scale,
                                                         personal_scale)
    offsets = factors @ basis

    user_ids = [f"u{i}" for i in range(n_users)]
    rated = [rng.choice(n_items, size=per_user, replace=False) for _ in range(n_users)]
    scores = [features[items] @ (shared + collective + offsets[i])
              + noise * rng.standard_normal(per_user) for i, items in enumerate(rated)]
    thresholds = np.quantile(np.concatenate(scores), [0.2, 0.4, 0.6, 0.8])
    texts = [", ".join(words[f] for f in combo) for combo in item_combos]
    users = [_user(uid, rated[i], _labels(scores[i], thresholds), texts, item_ids, n_history)
             for i, uid in enumerate(user_ids)]

    ground_truth = {
        "rank": rank, "basis": basis, "collective": collective, "user_factors": factors,
        "user_offsets": offsets, "user_ids": user_ids, "shared_rule": shared,
        "item_features": features, "item_ids": item_ids, "thresholds": thresholds,
        "feature_words": words,
        "scores": {uid: dict(zip((item_ids[j] for j in rated[i]), scores[i].tolist()))
                   for i, uid in enumerate(user_ids)},
        "params": {"n_users": n_users, "n_queries": n_queries, "rank": rank,
                   "n_features": n_features, "collective_scale": collective_scale,
                   "personal_scale": personal_scale, "noise": noise, "seed": seed,
                   "n_history": n_history, "n_items": n_items, "active": active},
    }
    report = {"source": "synthetic", "n_users": n_users, "n_queries": n_users * n_queries,
              "n_profile_items": n_users * per_user, "skipped": {}}
    return TaskData(spec=TASKS["synthetic"], users=users, report=report, ground_truth=ground_truth)


def _check_options(n_users: int, n_queries: int, rank: int, n_features: int, *, n_history: int, n_items: int,
                   active: int) -> None:
    """``ConfigError`` for options ``make_synthetic`` cannot honour (see its parameters)."""
    if not 1 <= n_features <= len(FEATURE_WORDS):
        raise ConfigError(f"n_features={n_features} must be between 1 and {len(FEATURE_WORDS)}")
    if not 0 <= rank < n_features:
        raise ConfigError(f"rank={rank} must be between 0 and n_features - 1 = {n_features - 1}")
    if n_users < 2 or n_queries < 1:
        raise ConfigError(f"need n_users >= 2 and n_queries >= 1 (got {n_users}, {n_queries})")
    if not 1 <= active <= n_features:
        raise ConfigError(f"active={active} must be between 1 and n_features={n_features}")
    if n_items > math.comb(n_features, active):
        raise ConfigError(f"n_items={n_items} exceeds the {math.comb(n_features, active)} distinct "
                          f"items with {active} of {n_features} features; lower n_items")
    per_user = n_history + n_queries
    if per_user > n_items:
        raise ConfigError(f"n_history + n_queries = {per_user} exceeds n_items={n_items}")
    if n_users * per_user > MAX_PROFILE_ITEMS:
        raise ConfigError(f"n_users={n_users:,} x {per_user} items = {n_users * per_user:,} profile items "
                          f"(about {n_users * per_user * 600 / 2**30:.0f} GB of memory) exceeds the synthetic "
                          f"task's limit of {MAX_PROFILE_ITEMS:,}: use at most "
                          f"{MAX_PROFILE_ITEMS // per_user:,} users")


def _draw_items(rng: np.random.Generator, n_items: int, n_features: int,
                active: int) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """``n_items`` distinct items of ``active`` features each, in random order: their feature
    indices and their 0/1 feature matrix ``[n_items, n_features]``."""
    combos: set[tuple[int, ...]] = set()
    while len(combos) < n_items:
        combos.add(tuple(sorted(rng.choice(n_features, size=active, replace=False).tolist())))
    item_combos = sorted(combos)
    rng.shuffle(item_combos)
    features = np.zeros((n_items, n_features))
    for j, combo in enumerate(item_combos):
        features[j, list(combo)] = 1.0
    return item_combos, features


def _draw_structure(rng: np.random.Generator, n_features: int, rank: int, n_users: int, collective_scale: float,
                    personal_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared rule ``w`` (F), the collective offset ``c`` (F), the personal basis ``B``
    (rank x F) and the centred user factors ``U`` (n_users x rank) of the module docstring."""
    shared = rng.standard_normal(n_features)
    q, _ = np.linalg.qr(rng.standard_normal((n_features, rank + 1)))
    collective = collective_scale * q[:, 0]
    basis = q[:, 1:].T.copy()  # rank x F, orthonormal rows, orthogonal to the collective
    factors = personal_scale * rng.standard_normal((n_users, rank))
    factors -= factors.mean(axis=0, keepdims=True)
    return shared, collective, basis, factors


def _user(uid: str, rated: np.ndarray, labels: np.ndarray, texts: list[str], item_ids: list[str],
          n_history: int) -> User:
    """A user who rated the items ``rated`` (in order) with ``labels``: every item in the
    profile, the items after the first ``n_history`` as queries; ``texts`` names each item's features."""
    profile, queries = [], []
    for pos, (j, label) in enumerate(zip(rated, labels)):
        text = texts[j]
        profile.append(ProfileItem(id=item_ids[j], fields={"features": text, "score": str(label)},
                                   date=f"{pos:06d}"))
        if pos >= n_history:
            queries.append(Query(id=f"{uid}-{item_ids[j]}", input=SYNTHETIC_INPUT.format(features=text),
                                 output=str(label), item_id=item_ids[j], fields={"features": text}))
    return User(id=uid, profile=profile, queries=queries)
