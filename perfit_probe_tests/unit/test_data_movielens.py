"""The MovieLens-100k rating task, checked against the raw parquet files."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from perfit_probe.data import load_task
from perfit_probe.data.movielens import canonical_ids, load_movielens, movie_table, movielens_dir
from perfit_probe.data.retrieval import retrieve
from perfit_probe.errors import DataError


@pytest.fixture(scope="module")
def raw():
    d = movielens_dir()
    return (pd.read_parquet(d / "MovieLens100k_data.parquet.brotli"),
            pd.read_parquet(d / "MovieLens100k_items.parquet.brotli"))


@pytest.fixture(scope="module")
def task():
    return load_task("movielens", n_users=8, seed=0)


def test_loads_fast_and_deterministically(task):
    start = time.perf_counter()
    again = load_task("movielens", n_users=8, seed=0)
    assert time.perf_counter() - start < 5
    assert [u.id for u in again.users] == [u.id for u in task.users]
    assert [u.queries for u in again.users] == [u.queries for u in task.users]
    other = load_task("movielens", n_users=8, seed=1)
    assert [u.id for u in other.users] != [u.id for u in task.users]
    assert task.spec.name == "movielens-rating" and task.spec.labels == ("1", "2", "3", "4", "5")


def test_profiles_match_raw_ratings(task, raw):
    ratings, items = raw
    movies = movie_table(items)
    canonical = canonical_ids(movies)
    for user in task.users:
        mine = ratings[ratings.user_id == int(user.id)]
        # Oracle: each distinct (canonical) movie once, with the user's latest rating of it.
        mine = mine.assign(c=mine.movie_id.astype(str).map(canonical)).sort_values("timestamp", kind="stable")
        latest = mine.groupby("c").rating.last()
        latest = latest[[movies[m]["title"] != "unknown" for m in latest.index]]
        profile = {item.id: item for item in user.profile}
        assert set(profile) == set(latest.index)
        for mid, rating in latest.items():
            assert profile[mid].fields["score"] == str(rating)
            assert profile[mid].fields["title"] == movies[mid]["title"]
        assert len({i.fields["title"] for i in user.profile}) == len(user.profile)
        dates = [i.date for i in user.profile]
        assert dates == sorted(dates)


def test_queries(task):
    for user in task.users:
        assert 1 <= len(user.queries) <= 40
        profile = {item.id: item for item in user.profile}
        for query in user.queries:
            item = profile[query.item_id]
            assert query.output == item.fields["score"] in task.spec.labels
            assert item.fields["title"] in query.input and item.fields["genres"] in query.input
            assert query.input.startswith("Predict the rating (1-5)")
            got = retrieve(user, query, k=10, fields=task.spec.retrieval_fields)
            assert all(i.id != query.item_id and i.fields["title"] != item.fields["title"] for i in got)
    capped = load_task("movielens", n_users=3, seed=0, max_queries=5)
    assert all(len(u.queries) == 5 for u in capped.users)
    assert task.report["n_users"] == 8 and task.report["n_queries"] == sum(len(u.queries) for u in task.users)


def test_users_rate_differently(task):
    # The personal signal the analysis probes: users' mean ratings differ.
    means = [sum(int(i.fields["score"]) for i in u.profile) / len(u.profile) for u in task.users]
    assert max(means) - min(means) > 0.5


def test_errors(tmp_path):
    with pytest.raises(DataError, match="MovieLens-100k file not found"):
        load_movielens(path=tmp_path)
    with pytest.raises(DataError, match="n_users=5000 is too many"):
        load_task("movielens", n_users=5000)
