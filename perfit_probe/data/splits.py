"""Deterministic user-level and query-level splits.

PerFit (like OPPU) trains the collective stage on *train users* and the personal stage on
each *test user*'s own history, then evaluates on that user's *held-out* queries. A split
depends only on the user and query ids and the seed (hash-based), never on load order, so
the same seed gives the same split on any machine.

Held-out queries are never part of the history a prompt may retrieve: the query's own item is
excluded by the retrievers, and ``history_user`` removes all held-out items from the profile.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from perfit_probe._io import atomic_write_text
from perfit_probe.config import TestUsersBy
from perfit_probe.data.records import TaskData, User
from perfit_probe.errors import ConfigError, DataError


def stable_rank(key: str, seed: int) -> int:
    """A deterministic pseudo-random integer for ``key`` and ``seed`` (SHA-256 based)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Split:
    """Train users, test users and each test user's held-out query ids."""

    train_users: tuple[str, ...]
    """Users whose queries train the collective (stage-1) intervention."""
    test_users: tuple[str, ...]
    """Users who get a personal (stage-2) intervention and are evaluated."""
    heldout: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Test user id -> ids of queries held out for evaluation."""
    seed: int = 0
    """Seed the split was drawn with."""

    def save(self, path: Path) -> None:
        """Write the split as JSON."""
        data = {"train_users": list(self.train_users), "test_users": list(self.test_users),
                "heldout": {k: list(v) for k, v in self.heldout.items()}, "seed": self.seed}
        atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Split:
        """Read a split written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(tuple(data["train_users"]), tuple(data["test_users"]),
                       {k: tuple(v) for k, v in data["heldout"].items()}, int(data["seed"]))
        except FileNotFoundError:
            raise DataError(f"{path}: split file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: malformed split file ({exc})") from None


TEST_USER_CHOICES = get_args(TestUsersBy)
"""How test users are chosen (``config.TestUsersBy``)."""


def make_split(
    task: TaskData,
    *,
    n_test_users: int | None = None,
    test_fraction: float = 0.5,
    n_heldout: int | None = None,
    test_users_by: str = "history",
    seed: int = 0,
) -> Split:
    """Split users into train/test and hold out ``n_heldout`` queries per test user.

    Test users are the ``n_test_users`` users (or ``test_fraction`` of them) with the largest
    profile (``test_users_by="history"``, OPPU's choice of the users with the most history) or
    with the most queries (``"queries"``), ties broken by a seeded hash; the others are train
    users. ``n_heldout=None`` holds out every query of a test user (its personal stage then
    trains on its profile only; the official LaMP format has one query per user); a number
    holds out that many (a seeded choice), keeping at least one query for training.
    """
    users = task.users
    if test_users_by not in TEST_USER_CHOICES:
        raise ConfigError(f"unknown test user choice {test_users_by!r}: choose from {TEST_USER_CHOICES}")
    if n_heldout is not None and n_heldout < 1:
        raise ConfigError(f"n_heldout={n_heldout} must be >= 1 (or none: every query of a test user)")
    if len(users) < 2:
        raise ConfigError(f"need at least 2 users to split, task {task.spec.name} has {len(users)}")
    n_test = n_test_users if n_test_users is not None else max(1, round(len(users) * test_fraction))
    if not 1 <= n_test < len(users):
        raise ConfigError(f"n_test_users={n_test} must be between 1 and {len(users) - 1}")
    size = (lambda u: len(u.profile)) if test_users_by == "history" else (lambda u: len(u.queries))
    order = sorted(users, key=lambda u: (-size(u), stable_rank(u.id, seed)))
    test = order[:n_test]
    train = [u for u in users if u not in test]
    heldout = {}
    for user in test:
        if n_heldout is None:
            heldout[user.id] = tuple(q.id for q in user.queries)
            continue
        if len(user.queries) < 2:
            raise ConfigError(f"test user {user.id!r} has {len(user.queries)} queries; need 2 or more")
        k = min(n_heldout, len(user.queries) - 1)
        ranked = sorted(user.queries, key=lambda q: stable_rank(f"{user.id}/{q.id}", seed))
        heldout[user.id] = tuple(q.id for q in ranked[:k])
    return Split(tuple(u.id for u in train), tuple(u.id for u in test), heldout, seed)


def history_user(user: User, split: Split) -> User:
    """The user restricted to training queries, with held-out items removed from the profile."""
    held = set(split.heldout.get(user.id, ()))
    held_items = {q.item_id for q in user.queries if q.id in held and q.item_id is not None}
    return User(
        id=user.id,
        profile=[item for item in user.profile if item.id not in held_items],
        queries=[q for q in user.queries if q.id not in held],
    )


def heldout_user(user: User, split: Split) -> User:
    """The user's held-out queries, with the profile as history (held-out items removed)."""
    held = set(split.heldout.get(user.id, ()))
    history = history_user(user, split)
    return User(id=user.id, profile=history.profile, queries=[q for q in user.queries if q.id in held])
