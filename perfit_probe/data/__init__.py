"""Users, their histories and queries: typed records, loaders, splits and prompts.

``load_task(name, ...)`` is the one entry point to every task; ``prompts.build_examples``
turns its users into prompts, and ``splits`` divides them into train and test users.
"""

from __future__ import annotations

from pathlib import Path

from perfit_probe.config import query_cap
from perfit_probe.data.lamp import load_lamp
from perfit_probe.data.movielens import load_movielens
from perfit_probe.data.records import (
    CONTROL_VARIANTS, DEFAULT_VARIANTS, VARIANTS, Example, ProfileItem, Query, TaskData, TaskSpec, User,
)
from perfit_probe.data.synthetic import make_synthetic
from perfit_probe.data.tasks import TASK_NAMES, canonical_task_name, task_spec
from perfit_probe.errors import DataError

__all__ = ["CONTROL_VARIANTS", "DEFAULT_VARIANTS", "TASK_NAMES", "VARIANTS", "Example", "ProfileItem",
           "Query", "TaskData", "TaskSpec", "User", "load_task", "query_cap", "task_spec"]


def load_task(
    name: str,
    *,
    path: Path | None = None,
    outputs: Path | None = None,
    n_users: int | None = None,
    seed: int = 0,
    max_queries: int | None = None,
) -> TaskData:
    """Load a task by name (case-insensitive; see ``TASK_NAMES``).

    - ``movielens``: the MovieLens-100k rating task (``path``: optional directory holding the
      parquet files; ``max_queries`` per user, default 40);
    - ``synthetic``: the planted-structure task (``n_users`` default 40; ``max_queries`` sets
      the queries per user, default 12); for other parameters call
      ``synthetic.make_synthetic``;
    - ``LaMP-1``, ``LaMP-2M``, ``LaMP-2N``, ``LaMP-3``, ``LaMP-4``, ``LaMP-5``, ``LaMP-7``:
      ``path`` is a LaMP questions file or an OPPU per-user file (format detected),
      ``outputs`` the matching golds file (optional); ``max_queries`` caps queries per user.

    ``max_queries``: see ``query_cap`` (``None`` or ``0``: the loader's default).

    ``n_users`` keeps that many users, chosen by a seeded hash of their ids (all when None).
    """
    task = canonical_task_name(name)
    max_queries = query_cap(max_queries)
    if n_users is not None and n_users < 1:
        raise DataError(f"n_users={n_users} must be >= 1")
    if task == "movielens":
        return load_movielens(path=path, n_users=n_users, seed=seed,
                              max_queries=40 if max_queries is None else max_queries)
    if task == "synthetic":
        return make_synthetic(n_users=40 if n_users is None else n_users,
                              n_queries=12 if max_queries is None else max_queries, seed=seed)
    if path is None:
        raise DataError(f"task {task} needs path= to a LaMP questions file or an OPPU per-user "
                        "file (perfit-probe never downloads LaMP)")
    data = load_lamp(task, path, outputs, n_users=n_users, seed=seed)
    if max_queries is not None:
        for user in data.users:
            del user.queries[max_queries:]
        data.report["n_queries"] = sum(len(u.queries) for u in data.users)
        data.report["max_queries"] = max_queries
    return data
