"""Collective versus personal shift: numbers for what the paper showed only in plots.

With user deltas ``x_u`` (``n`` users), the collective shift is the mean delta
``mu = mean_u x_u`` and user *u*'s personal shift the residual ``p_u = x_u - mu``. Per site:

- ``energy_share``: share of the deltas' energy along the collective direction,
  ``sum_u (x_u . mu_hat)^2 / sum_u ||x_u||^2`` with ``mu_hat = mu / ||mu||``;
- ``cos_to_mean``: ``cos(x_u, mu)`` per user (mean and median reported);
- ``norm_ratio``: ``||p_u|| / ||mu||`` per user (mean), and the pooled
  ``norm_ratio_rms = sqrt(mean_u ||p_u||^2) / ||mu||``;
- ``f_ratio``: between- versus within-user variance of the per-query deltas ``x_{u,q}``
  (``N`` queries of ``U`` users), a trace one-way ANOVA::

      F = [sum_u n_u ||xbar_u - xbar||^2 / (U - 1)] / [sum_{u,q} ||x_{u,q} - xbar_u||^2 / (N - U)]

  with a permutation p-value (query labels shuffled across users);
- ``id_accuracy``: accuracy of a classifier predicting the user from a held-out per-query
  residual shift ``x_{u,q} - xbar_train``, against ``id_chance``, the accuracy of the best
  constant prediction on the held-out set (and a one-sided binomial p-value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import get_args

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Shaped
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from perfit_probe.config import Classifier
from perfit_probe.errors import ConfigError

log = logging.getLogger(__name__)

CLASSIFIERS = get_args(Classifier)
"""User-identification classifiers (``config.Classifier``)."""
COLLECTIVE_STATISTICS = (
    "energy_share", "cos_to_mean_mean", "norm_ratio_mean", "norm_ratio_rms", "collective_norm",
    "delta_norm_mean",
)
_TINY = 1e-30


def collective_direction(x: Float[np.ndarray, "users d_model"]) -> Float[np.ndarray, " d_model"]:
    """Unit vector along the mean delta ``mu / ||mu||`` (zeros when ``mu = 0``)."""
    mu = np.asarray(x, dtype=np.float64).mean(0)
    norm = np.linalg.norm(mu)
    return mu / norm if norm > _TINY else np.zeros_like(mu)


def collective_summary(x: Float[np.ndarray, "users d_model"], weights: Float[np.ndarray, "boot users"] | None = None,
                       ) -> dict[str, Float[np.ndarray, " boot"]]:
    """The statistics of ``COLLECTIVE_STATISTICS`` for ``x`` ``[n, d]``.

    ``weights`` (``[B, n]`` resampling counts, each row summing to ``n``) evaluates them on
    ``B`` bootstrap resamples at once; every value is then an array of length ``B``. Without
    weights, length-1 arrays.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    mu = w @ x / n                                   # [B, d]
    mnorm = np.linalg.norm(mu, axis=1)               # [B]
    sq = np.einsum("nd,nd->n", x, x)                 # [n]
    xnorm = np.sqrt(sq)
    proj = mu @ x.T                                  # [B, n]  x_u . mu
    safe_m = np.maximum(mnorm, _TINY)
    cos = proj / (np.maximum(xnorm, _TINY)[None, :] * safe_m[:, None])
    personal_sq = np.clip(sq[None, :] - 2 * proj + mnorm[:, None] ** 2, 0.0, None)
    return {
        "energy_share": (w * proj**2).sum(1) / safe_m**2 / np.maximum((w * sq).sum(1), _TINY),
        "cos_to_mean_mean": (w * cos).sum(1) / n,
        "norm_ratio_mean": (w * np.sqrt(personal_sq)).sum(1) / n / safe_m,
        "norm_ratio_rms": np.sqrt((w * personal_sq).sum(1) / n) / safe_m,
        "collective_norm": mnorm,
        "delta_norm_mean": (w * xnorm[None, :]).sum(1) / n,
    }


def per_user_collective(x: Float[np.ndarray, "users d_model"], user_ids: list[str]) -> pd.DataFrame:
    """One row per user: ``cos_to_mean``, ``norm``, ``personal_norm``, ``norm_ratio``."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(0)
    mnorm = max(np.linalg.norm(mu), _TINY)
    norms = np.linalg.norm(x, axis=1)
    personal = np.linalg.norm(x - mu, axis=1)
    return pd.DataFrame({
        "user_id": list(user_ids),
        "cos_to_mean": x @ mu / (np.maximum(norms, _TINY) * mnorm),
        "norm": norms,
        "personal_norm": personal,
        "norm_ratio": personal / mnorm,
    })


def cosine_matrix(x: Float[np.ndarray, "users d_model"]) -> Float[np.ndarray, "users users"]:
    """``[n, n]`` cosine similarities between the rows of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _TINY)
    return unit @ unit.T


@dataclass(frozen=True)
class VarianceRatio:
    """Between- versus within-user variance of per-query deltas."""

    f_ratio: float
    """The trace F statistic (see the module docstring)."""
    p_value: float
    """Permutation p-value ``(1 + #{F_perm >= F}) / (1 + n_perm)``."""
    between: float
    """Between-user mean square."""
    within: float
    """Within-user mean square."""
    n_users: int
    """Users with at least one query."""
    n_queries: int
    """Queries."""


def variance_ratio(
    q: Float[np.ndarray, "queries d_model"], labels: list[str] | Shaped[np.ndarray, " queries"], n_perm: int,
    rng: np.random.Generator,
) -> VarianceRatio:
    """Trace F ratio of per-query deltas ``q`` (``[N, d]``) grouped by ``labels``.

    Needs at least two users and more queries than users (``ConfigError`` otherwise).
    """
    q = np.asarray(q, dtype=np.float64)
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    q, labels = q[order], labels[order]
    _, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    n_total, n_groups = len(q), len(starts)
    if n_groups < 2 or n_total <= n_groups:
        raise ConfigError(
            f"between/within-user variance needs >= 2 users and more queries than users "
            f"(have {n_groups} users, {n_total} queries): cache more queries per user"
        )
    grand = q.sum(0)
    ss_total = float(np.square(q).sum() - grand @ grand / n_total)

    def between(rows: np.ndarray) -> float:
        sums = np.add.reduceat(rows, starts, axis=0)
        return float((np.einsum("gd,gd->g", sums, sums) / counts).sum() - grand @ grand / n_total)

    ss_b = between(q)
    f_obs = _f(ss_b, ss_total, n_groups, n_total)
    exceed = 0
    for _ in range(n_perm):
        f_perm = _f(between(q[rng.permutation(n_total)]), ss_total, n_groups, n_total)
        exceed += f_perm >= f_obs * (1 - 1e-12)
    return VarianceRatio(
        f_ratio=f_obs,
        p_value=(1 + exceed) / (1 + n_perm),
        between=ss_b / (n_groups - 1),
        within=(ss_total - ss_b) / (n_total - n_groups),
        n_users=n_groups,
        n_queries=n_total,
    )


def _f(ss_b: float, ss_total: float, n_groups: int, n_total: int) -> float:
    within = max(ss_total - ss_b, _TINY) / (n_total - n_groups)
    return ss_b / (n_groups - 1) / within


@dataclass(frozen=True)
class Identification:
    """How well a classifier names the user of a held-out per-query residual shift."""

    accuracy: float
    """Held-out accuracy."""
    chance: float
    """Accuracy of the best constant prediction on the held-out set."""
    uniform_chance: float
    """``1 / n_users``."""
    p_value: float
    """One-sided binomial test of ``accuracy > chance``."""
    n_users: int
    """Users with a query in both splits."""
    n_train: int
    """Training queries."""
    n_test: int
    """Held-out queries."""


def heldout_mask(labels: list[str] | Shaped[np.ndarray, " queries"],
                 heldout_fraction: float) -> Bool[np.ndarray, " queries"]:
    """Deterministic split: the last ``max(1, round(f * n_u))`` of each user's queries (in stored
    order) are held out, keeping at least one for training; users with one query only train."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction={heldout_fraction} must lie in (0, 1)")
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    for user in np.unique(labels):
        rows = np.flatnonzero(labels == user)
        if len(rows) < 2:
            continue
        k = min(max(1, round(heldout_fraction * len(rows))), len(rows) - 1)
        mask[rows[-k:]] = True
    return mask


def identify_users(
    q: Float[np.ndarray, "queries features"],
    labels: list[str] | Shaped[np.ndarray, " queries"],
    *,
    heldout_fraction: float = 0.3,
    classifier: str = "centroid",
    seed: int = 0,
) -> Identification:
    """Train ``classifier`` on residual shifts of each user's earlier queries, test on the rest.

    The residual subtracts the mean per-query delta of the training split (the collective
    shift). ``centroid``: nearest class mean (Euclidean); ``logistic``: standardised
    features, multinomial logistic regression (C = 1).
    """
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"unknown classifier {classifier!r}: choose from {CLASSIFIERS}")
    q = np.asarray(q, dtype=np.float64)
    labels = np.asarray(labels)
    test = heldout_mask(labels, heldout_fraction)
    keep_users = np.intersect1d(labels[test], labels[~test])
    if len(keep_users) < 2:
        raise ConfigError(
            "user identification needs >= 2 users with >= 2 queries each: cache more queries"
        )
    keep = np.isin(labels, keep_users)
    train, test = keep & ~test, keep & test
    residual = q - q[train].mean(0)
    if classifier == "logistic":
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500, random_state=seed))
    else:
        model = NearestCentroid()
    model.fit(residual[train], labels[train])
    predicted = model.predict(residual[test])
    n_test = int(test.sum())
    correct = int((predicted == labels[test]).sum())
    _, test_counts = np.unique(labels[test], return_counts=True)
    chance = float(test_counts.max() / n_test)
    p_value = float(binomtest(correct, n_test, min(chance, 1.0), alternative="greater").pvalue)
    return Identification(
        accuracy=correct / n_test, chance=chance, uniform_chance=1.0 / len(keep_users),
        p_value=p_value, n_users=len(keep_users), n_train=int(train.sum()), n_test=n_test,
    )
