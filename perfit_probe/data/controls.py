"""Format-matched controls for the shift claims: the history template filled with other content.

The ``enhanced`` prompt shows user *u*'s ``k`` retrieved profile items in the history template.
Each control keeps that template (header line, one ``- item`` line per item, the task text
after it) and changes only what the items are, so that a difference between the real and the
control shift is a difference of content, not of format or length:

- ``other_user``: the items the retriever picks for *u*'s query from the profile of *u*'s
  donor ``d(u)``, where ``d`` is a seeded derangement of the users (``donor_assignment``):
  somebody's real history, relevant to the query, but not *u*'s. The cleanest test of
  "personal" against "history-shaped text".
- ``format_random``: as many items as the real prompt shows, drawn at random (seeded per user
  and query) from all users' profiles, each with its output field (``spec.example_output``:
  the score, tag, category, ...) replaced by a value drawn from the outputs of all users'
  profile items: the format with no relevance and no personal signal. Each slot keeps the
  closest in rendered length of a few random draws, so the block is also length-matched.
- ``permuted``: *u*'s own retrieved items with their output values permuted among them
  (``permute_outputs``): the same items and the same set of outputs, with the
  item-to-output association broken. When all retrieved outputs are equal (or one item was
  retrieved) no permutation changes anything and the prompt equals the enhanced one.

``history_frame`` turns built examples into the tidy table of what each prompt added
(``RUN/deltas/history.csv``), which the analysis's text baselines read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from perfit_probe.data.records import Example, ProfileItem, Query, TaskSpec, User
from perfit_probe.data.splits import stable_rank
from perfit_probe.errors import ConfigError

LENGTH_CANDIDATES = 8
"""Random items ``format_random_items`` draws per slot when it matches lengths."""

PERMUTATION_TRIES = 64
"""Random permutations ``permute_outputs`` draws; it keeps the one that leaves the fewest
items with their own output value (the first such draw)."""

HISTORY_COLUMNS = ("user_id", "query_id", "variant", "history_ids", "n_items", "added_text")
"""Columns of ``history_frame`` (``history_ids`` is a JSON list)."""


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n >= 2``), by rejection.

    The one derangement of the package: the other-user control's donors, the shuffled-delta
    null and the shuffled-user checks all draw theirs here.
    """
    if n < 2:
        raise ConfigError(f"a derangement needs at least two elements, got {n}")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def donor_assignment(user_ids: Sequence[str], seed: int = 0) -> dict[str, str]:
    """User id -> donor id: a uniformly random derangement of ``user_ids`` seeded by ``seed``.

    No user is their own donor; needs at least two distinct users (``ConfigError`` otherwise).
    """
    ids = [str(u) for u in user_ids]
    if len(ids) < 2:
        raise ConfigError(f"giving each user another user's data needs at least two users, got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise ConfigError("giving each user another user's data needs distinct user ids")
    perm = derangement(len(ids), np.random.default_rng(stable_rank("donors", seed)))
    return {ids[i]: ids[int(p)] for i, p in enumerate(perm)}


def output_field(spec: TaskSpec) -> str:
    """The profile field that is an item's output (``spec.example_output``), or ``ConfigError``."""
    if not spec.example_output:
        raise ConfigError(f"task {spec.name} names no output field (TaskSpec.example_output): "
                          "the format_random and permuted variants cannot be built for it")
    return spec.example_output


def _with_output(item: ProfileItem, field: str, value: str) -> ProfileItem:
    if field not in item.fields:
        return item
    return replace(item, fields={**item.fields, field: value})


def format_random_items(
    pool: Sequence[ProfileItem], outputs: Sequence[str], replaced: Sequence[ProfileItem],
    spec: TaskSpec, user: User, query: Query, seed: int = 0,
    length: Callable[[ProfileItem], int] | None = None,
) -> list[ProfileItem]:
    """One random item from ``pool`` (never the query's own item, no item id twice) for each item
    of ``replaced``, its output field set to a value drawn from ``outputs``; seeded by
    (seed, user, query).

    With ``length`` (e.g. the characters of the rendered item), each slot draws
    ``LENGTH_CANDIDATES`` items and keeps the one whose length is closest to that of the
    item it replaces, so that the block is length-matched as well as format-matched.
    """
    field = output_field(spec)
    rng = random.Random(stable_rank(f"format_random/{user.id}/{query.id}", seed))
    allowed = [i for i in range(len(pool)) if query.item_id is None or pool[i].id != query.item_id] \
        if len(pool) <= 4 * LENGTH_CANDIDATES * max(len(replaced), 1) else None
    used: set[str] = set()  # item ids shown so far: no item twice (ids are shared across users)
    picked: list[ProfileItem] = []
    for target in replaced:
        want = length(target) if length is not None else None
        draws = _draw(rng, pool, allowed, used, LENGTH_CANDIDATES if want is not None else 1, query)
        if not draws:
            break
        made = [_with_output(pool[i], field, rng.choice(outputs)) if outputs else pool[i] for i in draws]
        best = min(range(len(made)), key=lambda j: abs(length(made[j]) - want)) if want is not None else 0
        picked.append(made[best])
        used.add(pool[draws[best]].id)
    return picked


def _draw(rng: random.Random, pool: Sequence[ProfileItem], allowed: list[int] | None, used: set[str],
          m: int, query: Query) -> list[int]:
    """Up to ``m`` pool indices of distinct items not yet shown (never the query's item)."""
    if allowed is not None:  # small pool: sample from the explicit list
        free = list({pool[i].id: i for i in allowed if pool[i].id not in used}.values())
        return rng.sample(free, min(m, len(free)))
    out: list[int] = []
    ids: set[str] = set()
    for _ in range(50 * m):  # large pool: rejection sampling, no pass over the pool
        i = rng.randrange(len(pool))
        if pool[i].id in used or pool[i].id in ids or (query.item_id is not None and pool[i].id == query.item_id):
            continue
        out.append(i)
        ids.add(pool[i].id)
        if len(out) == m:
            break
    return out


def permute_outputs(
    items: Sequence[ProfileItem], spec: TaskSpec, key: str, seed: int = 0,
) -> tuple[list[ProfileItem], bool]:
    """``items`` with their output values permuted among them; also whether anything changed.

    Among ``PERMUTATION_TRIES`` random permutations (seeded by ``key`` and ``seed``) the first
    that leaves the fewest items with an unchanged value is used. Returns the items unchanged
    and ``False`` when all values are equal or there is one item.
    """
    field = output_field(spec)
    values = [item.fields.get(field) for item in items]
    if len(set(values)) <= 1:
        return list(items), False
    rng = random.Random(stable_rank(f"permuted/{key}", seed))
    best, best_kept = None, len(values) + 1
    for _ in range(PERMUTATION_TRIES):
        perm = list(range(len(values)))
        rng.shuffle(perm)
        kept = sum(values[p] == values[i] for i, p in enumerate(perm))
        if kept < best_kept:
            best, best_kept = perm, kept
        if kept == 0:
            break
    return [_with_output(item, field, values[p]) for item, p in zip(items, best)], True


def output_pool(users: Sequence[User], spec: TaskSpec) -> tuple[list[ProfileItem], list[str]]:
    """All users' profile items and the output values among them (``format_random``'s pool)."""
    field = output_field(spec)
    items = [item for user in users for item in user.profile]
    return items, [item.fields[field] for item in items if field in item.fields]


def history_frame(examples: Sequence[Example]) -> pd.DataFrame:
    """What every non-plain example added: one row per (user, query, variant), ``HISTORY_COLUMNS``."""
    rows = [{"user_id": str(e.user_id), "query_id": str(e.query_id), "variant": e.variant,
             "history_ids": json.dumps(list(e.history_ids)), "n_items": len(e.history_ids),
             "added_text": e.added_text}
            for e in examples if e.variant != "plain"]
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def read_history_ids(frame: pd.DataFrame) -> list[list[str]]:
    """The ``history_ids`` column of a ``history_frame`` (as read from CSV) as lists of ids."""
    return [list(json.loads(v)) if isinstance(v, str) and v else [] for v in frame["history_ids"]]
