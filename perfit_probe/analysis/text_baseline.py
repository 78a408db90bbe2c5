"""Identify users from the prompt text alone: the yardstick of hidden-state user identification.

Within a user, queries often share retrieved history items, so a classifier can name the user
of a held-out query from *which text was added* without any representation shift. The same
classifier and the same held-out split as ``collective.identify_users`` (the last queries of
each user) run on features of the enhanced prompt's added history, one row per query:

- ``item_ids``: one-hot of the retrieved item ids (vocabulary: ids seen in training queries);
- ``history_tfidf``: TF-IDF of the added history text (sublinear tf, l2 rows, vocabulary of
  at most ``MAX_TFIDF_FEATURES`` terms fitted on the training queries).

The history comes from ``RUN/deltas/history.csv`` (``perfit_probe.data.controls.history_frame``).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float
from sklearn.feature_extraction.text import TfidfVectorizer

from perfit_probe.analysis.collective import Identification, heldout_mask, identify_users
from perfit_probe.data.controls import read_history_ids
from perfit_probe.errors import ConfigError

log = logging.getLogger(__name__)

MAX_TFIDF_FEATURES = 2048


def item_id_features(ids: list[list[str]], train: Bool[np.ndarray, " rows"]) -> Float[np.ndarray, "rows vocab"]:
    """``[n, vocab]`` 0/1 matrix: which training-vocabulary item ids each row's prompt shows."""
    vocab = sorted({i for row, keep in zip(ids, train) if keep for i in row})
    pos = {item: j for j, item in enumerate(vocab)}
    out = np.zeros((len(ids), max(len(vocab), 1)))
    for r, row in enumerate(ids):
        for item in row:
            if item in pos:
                out[r, pos[item]] = 1.0
    return out


def tfidf_features(texts: list[str], train: Bool[np.ndarray, " rows"]) -> Float[np.ndarray, "rows vocab"]:
    """``[n, vocab]`` TF-IDF rows of ``texts``, the vectoriser fitted on the training rows."""
    vec = TfidfVectorizer(sublinear_tf=True, max_features=MAX_TFIDF_FEATURES)
    try:
        vec.fit([t for t, keep in zip(texts, train) if keep])
    except ValueError:  # empty vocabulary: no text at all
        return np.zeros((len(texts), 1))
    return vec.transform(texts).toarray()


def align_history(history: pd.DataFrame, user_ids: list[str], query_ids: list[str],
                  variant: str = "enhanced") -> pd.DataFrame:
    """The ``variant`` rows of ``history`` in the order of (``user_ids``, ``query_ids``);
    ``ConfigError`` when one is missing."""
    sub = history[history["variant"] == variant].copy()
    sub["user_id"], sub["query_id"] = sub["user_id"].astype(str), sub["query_id"].astype(str)
    sub = sub.drop_duplicates(["user_id", "query_id"]).set_index(["user_id", "query_id"])
    keys = list(zip(map(str, user_ids), map(str, query_ids)))
    missing = [k for k in keys if k not in sub.index]
    if missing:
        raise ConfigError(f"the prompt history lacks {len(missing)} of {len(keys)} {variant} "
                          f"queries (e.g. {missing[0]}): recache to write deltas/history.csv")
    return sub.loc[keys].reset_index()


def text_identification(
    history: pd.DataFrame, user_ids: list[str], query_ids: list[str], *,
    heldout_fraction: float = 0.3, classifier: str = "centroid", seed: int = 0,
) -> dict[str, Identification]:
    """User identification from each text feature set of the enhanced prompts' history
    (``item_ids``: which items were retrieved; ``history_tfidf``: TF-IDF of the history text).

    ``user_ids``/``query_ids`` give the queries in the order of the per-query deltas, so the
    held-out split is the one the hidden-state identification uses.
    """
    rows = align_history(history, user_ids, query_ids)
    labels = np.asarray([str(u) for u in user_ids])
    train = ~heldout_mask(labels, heldout_fraction)
    texts = ["" if not isinstance(t, str) else t for t in rows["added_text"]]
    features = {"item_ids": item_id_features(read_history_ids(rows), train),
                "history_tfidf": tfidf_features(texts, train)}
    return {name: identify_users(x, labels, heldout_fraction=heldout_fraction,
                                 classifier=classifier, seed=seed)
            for name, x in features.items()}
