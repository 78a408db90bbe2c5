"""Retrieving the profile items that go into a personalization-enhanced prompt.

Three retrievers, all over the user's *own* profile and all excluding the query's own item
(``query.item_id``), so a rating is never shown in the prompt that asks for it:

- ``bm25``: Okapi BM25 (``rank_bm25.BM25Okapi``, k1 = 1.5, b = 0.75, as in the OPPU code)
  of the query input against the profile items' text. For a query with terms q_1..q_n,

      score(D) = sum_i IDF(q_i) * f(q_i, D) * (k1 + 1) / (f(q_i, D) + k1 * (1 - b + b * |D| / avgdl))

  with IDF(q) = ln((N - n(q) + 0.5) / (n(q) + 0.5)), negative IDFs floored at
  0.25 * mean IDF (rank_bm25's epsilon rule). Text is lower-cased and split on non-word
  characters. A term in exactly half the items has IDF 0, so in tiny profiles (2-3 items)
  BM25 often scores every item 0 and falls back to profile order.
- ``recent``: the latest items by ``date`` (undated items rank after dated ones, later
  profile position first).
- ``random``: a uniform sample, seeded by (seed, user id, query id).

Ties are broken by profile position (earlier first for ``bm25``, later first for ``recent``),
so results are deterministic.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from datetime import datetime
from typing import get_args

from rank_bm25 import BM25Okapi

from perfit_probe.config import Retriever
from perfit_probe.data.records import ProfileItem, Query, User
from perfit_probe.data.splits import stable_rank
from perfit_probe.errors import ConfigError

RETRIEVERS = get_args(Retriever)
_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens used by BM25."""
    return _WORD.findall(text.lower())


def item_text(item: ProfileItem, fields: Sequence[str] | None = None) -> str:
    """The text of a profile item that BM25 matches against (the given fields, or all)."""
    names = fields if fields else list(item.fields)
    return " ".join(str(item.fields[f]) for f in names if f in item.fields)


def date_key(date: str | None) -> tuple[int, float | str]:
    """Sort key of a date: numbers (timestamps) and ISO dates compare chronologically."""
    if date is None or date == "":
        return (0, 0.0)
    try:
        return (1, float(date))
    except ValueError:
        pass
    try:
        return (1, datetime.fromisoformat(date).timestamp())
    except ValueError:
        return (2, date)


class ProfileIndex:
    """A user's profile prepared for repeated retrieval (the BM25 index is built once).

    Parameters: ``user`` whose profile is searched; ``fields``, the item fields BM25 reads
    (all fields when empty or None).
    """

    def __init__(self, user: User, fields: Sequence[str] | None = None):
        self.user = user
        self.fields = tuple(fields or ())
        self._bm25 = None
        self._docs = [tokenize(item_text(item, self.fields)) for item in user.profile]

    def _scores(self, query: Query) -> list[float]:
        terms = tokenize(query.input)
        if not terms or not any(self._docs):
            return [0.0] * len(self._docs)
        if self._bm25 is None:
            self._bm25 = BM25Okapi(self._docs)
        return [float(s) for s in self._bm25.get_scores(terms)]

    def retrieve(self, query: Query, k: int, method: str = "bm25", seed: int = 0) -> list[ProfileItem]:
        """The ``k`` best profile items for ``query`` by ``method``, never ``query.item_id``."""
        if method not in RETRIEVERS:
            raise ConfigError(f"unknown retriever {method!r}: choose one of {', '.join(RETRIEVERS)}")
        if k < 0:
            raise ConfigError(f"k={k} must be >= 0")
        profile = self.user.profile
        candidates = [i for i, item in enumerate(profile)
                      if query.item_id is None or item.id != query.item_id]
        if k == 0 or not candidates:
            return []
        if method == "bm25":
            scores = self._scores(query)
            order = sorted(candidates, key=lambda i: (-scores[i], i))
        elif method == "recent":
            order = sorted(candidates, key=lambda i: (date_key(profile[i].date), i), reverse=True)
        else:
            rng = random.Random(stable_rank(f"{self.user.id}/{query.id}", seed))
            order = rng.sample(candidates, min(k, len(candidates)))
        return [profile[i] for i in order[:k]]


def retrieve(
    user: User,
    query: Query,
    k: int,
    method: str = "bm25",
    seed: int = 0,
    *,
    fields: Sequence[str] | None = None,
) -> list[ProfileItem]:
    """The ``k`` items of ``user``'s profile most relevant to ``query`` (see module docstring).

    ``fields`` restricts the text BM25 reads (e.g. a review's text, not its score). For many
    queries of one user, build a ``ProfileIndex`` once instead.
    """
    return ProfileIndex(user, fields).retrieve(query, k, method, seed)
