"""Trivial, model-free baselines, computed from exactly the data the personal methods see.

A test user's data is its profile *minus the held-out items*
(``perfit_probe.data.splits.heldout_user``); the global baselines pool the profiles of the
*train users* (the users the collective stage trains on). The output of a profile item is its
``spec.example_output`` field (``score``, ``tag``, ``category``, ``title``, ``text``).

Baselines (``BASELINES`` maps each to the task kinds it runs on):

- ``user_mean`` (rating): the mean of the user's history ratings, rounded to the nearest
  label; the unrounded mean is the ``expected`` rating (so an expected-rating MAE exists);
- ``user_median`` (rating): the median of the user's history ratings (the mean of the two
  middle values for an even count), rounded to the nearest label;
- ``user_majority`` (classification, rating): the user's most frequent history label;
- ``global_majority`` (classification, rating): the most frequent label over the train users'
  profiles;
- ``global_mean`` (rating): the mean over the train users' profile ratings, rounded to the
  nearest label (unrounded as ``expected``);
- ``bm25_top1`` (every kind): the output of the user's profile item most similar to the query
  by BM25 over ``spec.retrieval_fields`` (``perfit_probe.data.retrieval.ProfileIndex``, the
  retriever of the ``rag`` prompt; the query's own item is never used). For labels this is a
  one-nearest-neighbour classifier; for generation a copy of the nearest history output.

Deterministic tie rules:

- rounding to the nearest label: a value exactly halfway between two labels goes to the
  larger one (round half up; 3.5 -> "4");
- majority: among equally frequent labels the one that comes first in ``spec.labels``
  (for ratings the lower rating);
- BM25: equal scores keep profile order (the retriever's rule); items whose output is missing
  or not a label are passed over; a user without such an item gets ``""``.

Rating outputs are read with ``float`` (unreadable ones are ignored) and mapped to their
nearest label before counting; classification outputs outside the label set are ignored.
A user with no usable history output falls back to the same statistic over the train users'
pool. Where profile items carry no task label (``spec.example_is_task`` False, e.g. LaMP-1,
whose items are titles) the classification and rating baselines do not run.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import numpy as np

from perfit_probe.config import PersonalData
from perfit_probe.data.profile_examples import chronological
from perfit_probe.data.records import TaskData, TaskSpec, User
from perfit_probe.data.retrieval import ProfileIndex
from perfit_probe.data.splits import Split, heldout_user
from perfit_probe.errors import ConfigError, DataError
from perfit_probe.evaluation.metrics import parse_rating

log = logging.getLogger(__name__)

BASELINES: dict[str, tuple[str, ...]] = {
    "user_mean": ("rating",),
    "user_median": ("rating",),
    "user_majority": ("classification", "rating"),
    "global_majority": ("classification", "rating"),
    "global_mean": ("rating",),
    "bm25_top1": ("classification", "rating", "generation"),
}
"""Baseline name -> task kinds it runs on (see the module docstring)."""

_HALF_TOL = 1e-9
"""Distances to two labels closer than this count as a tie (broken upwards)."""


def skip_reason(name: str, spec: TaskSpec) -> str | None:
    """Why baseline ``name`` does not run on ``spec`` (None when it does)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    if spec.kind not in BASELINES[name]:
        return f"{name} is not a baseline of {spec.kind} tasks"
    if not spec.example_output:
        return f"task {spec.name} names no output field of its profile items (TaskSpec.example_output)"
    if spec.kind != "generation" and not spec.example_is_task:
        return (f"the {spec.example_output!r} of a {spec.name} profile item is not a task label "
                "(TaskSpec.example_is_task is False)")
    if spec.kind != "generation" and not spec.labels:
        return f"task {spec.name} has no label set"
    return None


def nearest_label(value: float, labels: Sequence[str]) -> str:
    """The numeric label nearest to ``value``; halfway goes to the larger label (round half up)."""
    values = np.array([float(label) for label in labels])
    distance = np.abs(values - value)
    tied = np.flatnonzero(distance <= distance.min() + _HALF_TOL)
    return labels[int(tied[np.argmax(values[tied])])]


def majority_label(outputs: Sequence[str], labels: Sequence[str]) -> str | None:
    """The most frequent of ``outputs`` (labels); ties go to the label first in ``labels``."""
    counts = Counter(outputs)
    if not counts:
        return None
    return max(labels, key=lambda label: (counts.get(label, 0), -labels.index(label)))


def profile_outputs(user: User, spec: TaskSpec) -> list[str]:
    """The task outputs of ``user``'s profile items, in profile order, as labels.

    Ratings become their nearest label, classification outputs outside the label set and
    unreadable ratings are dropped; generation outputs are the stripped texts.
    """
    field = spec.example_output
    out = []
    for item in user.profile:
        text = item.fields.get(field) if field else None
        label = None if text is None else _as_output(str(text), spec)
        if label is not None:
            out.append(label)
    return out


def _as_output(text: str, spec: TaskSpec) -> str | None:
    """A profile item's output text as a prediction: a label, or None when it is not one."""
    text = text.strip()
    if spec.kind == "rating":
        value = parse_rating(text, "lamp")
        return None if value is None else nearest_label(value, spec.labels)
    if spec.kind == "classification":
        return text if text in spec.labels else None
    return text or None


def _rating_values(user: User, spec: TaskSpec) -> np.ndarray:
    """A user's history ratings as numbers (unrounded; unreadable ones dropped)."""
    field = spec.example_output
    values = [parse_rating(str(item.fields[field]), "lamp") for item in user.profile if field in item.fields]
    return np.array([v for v in values if v is not None])


def _statistic(name: str, values: np.ndarray, outputs: list[str], spec: TaskSpec) -> tuple[str | None, float]:
    """(predicted label, expected value or nan) of a per-user or global statistic."""
    if name in ("user_mean", "global_mean"):
        if not len(values):
            return None, float("nan")
        mean = float(values.mean())
        return nearest_label(mean, spec.labels), mean
    if name == "user_median":
        if not len(values):
            return None, float("nan")
        return nearest_label(float(np.median(values)), spec.labels), float("nan")
    return majority_label(outputs, list(spec.labels)), float("nan")


def baseline_predictions(name: str, task: TaskData, split: Split,
                         keys: Sequence[tuple[str, str]] | None = None, personal: PersonalData | None = None):
    """Predictions of baseline ``name`` for held-out queries, as ``evaluate.Predictions``.

    ``keys`` are the ``(user_id, query_id)`` pairs to predict, in order (default: every test
    user's held-out queries, users in split order, queries in the user's order). ``expected``
    is set for ``user_mean`` and ``global_mean``. ``ConfigError`` when the baseline does not
    apply to the task (see ``skip_reason``). ``personal``: what the personal stages train on;
    with profile examples capped at the ``max_examples`` latest items, a test user's history here
    is capped alike, so that the baselines see exactly the personal methods' data.
    """
    # a cycle: evaluation.evaluate imports this module (BASELINES, baseline_predictions)
    from perfit_probe.evaluation.evaluate import Predictions

    spec = task.spec
    reason = skip_reason(name, spec)
    if reason is not None:
        raise ConfigError(reason)
    users = {uid: _visible(heldout_user(task.user(uid), split), personal) for uid in split.test_users}
    if keys is None:
        keys = [(uid, q.id) for uid, user in users.items() for q in user.queries]
    unknown = sorted({uid for uid, _ in keys} - set(users))
    if unknown:
        raise DataError(f"users {unknown[:3]} are not test users of the split: baselines predict held-out queries only")
    if name == "bm25_top1":
        outputs = _bm25_outputs(users, keys, spec)
        return Predictions(outputs)
    # the global pool: the train users' whole profiles
    pool_users = [task.user(uid) for uid in split.train_users]
    pool_outputs = [o for u in pool_users for o in profile_outputs(u, spec)]
    pool_values = np.concatenate([np.array([]), *(_rating_values(u, spec) for u in pool_users)]) \
        if spec.kind == "rating" else np.array([])
    fallback = _statistic(name, pool_values, pool_outputs, spec)
    per_user, n_fallback = {}, 0
    for uid, user in users.items():
        if name.startswith("global_"):
            per_user[uid] = fallback
            continue
        values = _rating_values(user, spec) if spec.kind == "rating" else np.array([])
        stat = _statistic(name, values, profile_outputs(user, spec), spec)
        if stat[0] is None:
            stat, n_fallback = fallback, n_fallback + 1
        per_user[uid] = stat
    if any(per_user[uid][0] is None for uid, _ in keys):
        raise DataError(f"{name}: no usable {spec.example_output!r} in the train users' profiles of {spec.name}")
    if n_fallback:
        log.info("%s: %d test user(s) without usable history fall back to the train users' pool", name, n_fallback)
    outputs = [per_user[uid][0] for uid, _ in keys]
    expected = np.array([per_user[uid][1] for uid, _ in keys]) if name in ("user_mean", "global_mean") else None
    return Predictions(outputs, None, expected)


def _visible(user: User, personal: PersonalData | None) -> User:
    """The user with the profile items the personal stages train on (all when uncapped)."""
    if personal is None or personal.source != "profile" or personal.max_examples is None:
        return user
    items = chronological(user.profile)[-personal.max_examples:]
    return User(user.id, items, user.queries)


def _bm25_outputs(users: dict[str, User], keys: Sequence[tuple[str, str]], spec: TaskSpec) -> list[str]:
    """Output of the best-scoring usable profile item of each query's user (``""`` if none)."""
    indices = {uid: ProfileIndex(user, spec.retrieval_fields) for uid, user in users.items()}
    queries = {(uid, q.id): q for uid, user in users.items() for q in user.queries}
    outputs, empty = [], 0
    for key in keys:
        if key not in queries:
            raise DataError(f"query {key[1]!r} of user {key[0]!r} is not a held-out query of the split")
        uid, _ = key
        ranked = indices[uid].retrieve(queries[key], len(users[uid].profile), "bm25")
        found = (_as_output(str(item.fields[spec.example_output]), spec) for item in ranked
                 if spec.example_output in item.fields)
        output = next((o for o in found if o is not None), None)
        empty += output is None
        outputs.append(output or "")
    if empty:
        log.info("bm25_top1: %d quer(ies) whose user has no usable history item get an empty output", empty)
    return outputs
