"""Retrievers: BM25 against a hand-checked example and the formula, exclusion, splits."""

from __future__ import annotations

import math

import pytest

from perfit_probe.data import load_task
from perfit_probe.data.records import ProfileItem, Query, User
from perfit_probe.data.retrieval import ProfileIndex, retrieve, tokenize
from perfit_probe.data.splits import heldout_user, history_user, make_split
from perfit_probe.errors import ConfigError


def _user(texts, dates=None):
    dates = dates or [None] * len(texts)
    return User("u", [ProfileItem(str(i), {"text": t}, d) for i, (t, d) in enumerate(zip(texts, dates))], [])


def _bm25_oracle(docs: list[list[str]], query: list[str], k1=1.5, b=0.75, eps=0.25) -> list[float]:
    """Okapi BM25 written out from the formula (with rank_bm25's negative-IDF floor)."""
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    vocab = {w for d in docs for w in d}
    idf = {w: math.log(n - sum(w in d for d in docs) + 0.5) - math.log(sum(w in d for d in docs) + 0.5)
           for w in vocab}
    floor = eps * sum(idf.values()) / len(idf)
    idf = {w: (v if v >= 0 else floor) for w, v in idf.items()}
    scores = []
    for d in docs:
        s = 0.0
        for q in query:
            f = d.count(q)
            s += idf.get(q, 0.0) * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


def test_bm25_hand_checked_example():
    # Hand check: "space" and "robots" each occur in 2 of 6 items (IDF ln(4.5/2.5) > 0).
    # Item 0 has both terms; items 2 and 3 one each, item 2 being shorter scores higher;
    # items 1, 4, 5 share nothing and keep profile order.
    user = _user(["space robots laser", "romantic comedy in paris", "space station drama",
                  "a long film about many robots and their quiet lives at sea", "cooking show",
                  "history of jazz"])
    got = retrieve(user, Query("q", "space robots"), k=6)
    assert [i.id for i in got] == ["0", "2", "3", "1", "4", "5"]
    assert [i.id for i in retrieve(user, Query("q", "space robots"), k=2)] == ["0", "2"]


def test_bm25_matches_formula():
    texts = ["the cat sat on the mat", "dogs and cats", "a cat and a dog play", "stock market news",
             "the market for cat food", "rain again today"]
    user = _user(texts)
    query = Query("q", "cat food market")
    docs = [tokenize(t) for t in texts]
    oracle = _bm25_oracle(docs, tokenize(query.input))
    expected = sorted(range(len(texts)), key=lambda i: (-oracle[i], i))
    assert [int(i.id) for i in retrieve(user, query, k=len(texts))] == expected
    index = ProfileIndex(user)
    assert index._scores(query) == pytest.approx(oracle)


def test_query_item_is_never_retrieved():
    user = _user(["space robots", "space robots again", "other"])
    query = Query("q", "space robots", item_id="0")
    for method in ("bm25", "recent", "random"):
        for seed in range(5):
            ids = [i.id for i in retrieve(user, query, k=3, method=method, seed=seed)]
            assert "0" not in ids and len(ids) == 2


def test_recent_and_random():
    user = _user(["a", "b", "c", "d"], dates=["2020-01-03", None, "2021-05-01", "2019-12-31"])
    assert [i.id for i in retrieve(user, Query("q", "x"), k=4, method="recent")] == ["2", "0", "3", "1"]
    numeric = _user(["a", "b", "c"], dates=["900", "1000", "80"])  # timestamps, not strings
    assert [i.id for i in retrieve(numeric, Query("q", "x"), k=2, method="recent")] == ["1", "0"]
    r1 = [i.id for i in retrieve(user, Query("q", "x"), k=2, method="random", seed=3)]
    r2 = [i.id for i in retrieve(user, Query("q", "x"), k=2, method="random", seed=3)]
    assert r1 == r2
    draws = {tuple(i.id for i in retrieve(user, Query("q", "x"), k=2, method="random", seed=s))
             for s in range(30)}
    assert len(draws) > 3


def test_edge_cases():
    user = _user(["a b", "c d"])
    assert retrieve(user, Query("q", "a"), k=0) == []
    assert len(retrieve(user, Query("q", "a"), k=10)) == 2
    assert [i.id for i in retrieve(user, Query("q", "!!!"), k=2)] == ["0", "1"]  # no terms: profile order
    assert retrieve(User("e", [], []), Query("q", "a"), k=3) == []
    with pytest.raises(ConfigError, match="unknown retriever"):
        retrieve(user, Query("q", "a"), k=1, method="dense")


def test_splits_deterministic_and_leak_free():
    task = load_task("synthetic", n_users=10, seed=2)
    a = make_split(task, n_test_users=4, n_heldout=3, seed=1)
    b = make_split(task, n_test_users=4, n_heldout=3, seed=1)
    assert a == b
    for uid in a.test_users:
        user = task.user(uid)
        held_items = {q.item_id for q in user.queries if q.id in a.heldout[uid]}
        for part in (history_user(user, a), heldout_user(user, a)):
            profile_ids = {item.id for item in part.profile}
            assert not profile_ids & held_items
            for query in part.queries:
                for method in ("bm25", "recent", "random"):
                    got = {i.id for i in retrieve(part, query, k=50, method=method)}
                    assert query.item_id not in got
                    assert not got & held_items
