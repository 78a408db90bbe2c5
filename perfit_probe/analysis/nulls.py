"""Null models and bootstraps that give "low rank" and "collective shift" a yardstick.

Sources compared with the real deltas ``delta_u = n_u - m_u`` (``n_u``, ``m_u``: user *u*'s
mean enhanced and plain hidden states) at each site:

- ``gaussian_null``: ``g_u * ||delta_u|| / ||g_u||`` with ``g_u ~ N(0, I_d)``: random
  directions with the deltas' norms;
- ``control``: the random-text control deltas ``c_u - m_u`` (same added length, no history);
- ``shuffled``: ``n_u - m_{pi(u)}`` for a random derangement ``pi``: a user's enhanced mean
  paired with another user's plain mean.

Confidence intervals are percentile bootstraps over users. The default is Rubin's Bayesian
bootstrap (random positive user weights, no user dropped); the classic bootstrap (users drawn
with replacement) is available. Both leave about ``n/2`` effective users per resample, so for
spread-out sources (nulls, isotropic noise) the rank of a resample falls below the full-sample
rank and rank intervals sit low; for a few dominant directions they are accurate. Read them as
the stability of a statistic across user samples, not as coverage of a population rank.
"""

from __future__ import annotations

import numpy as np

from perfit_probe.analysis.shift import cumulative_energy, rank_at_energy
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError

SOURCES = ("deltas", "gaussian_null", "control", "shuffled")
"""Every source the analysis can compare, the real deltas first."""

_CHUNK_BYTES = 256 * 2**20


def gaussian_null(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Isotropic Gaussian directions with the row norms of ``x`` (``[n, d]``)."""
    g = rng.standard_normal(x.shape)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return g / np.linalg.norm(g, axis=1, keepdims=True) * norms


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n >= 2``)."""
    if n < 2:
        raise ValueError("a derangement needs at least two elements")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def shuffled_deltas(
    enhanced: np.ndarray, mean_plain: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_u - m_{pi(u)}`` with ``n_u = m_u + delta_u``; returns the matrix and ``pi``."""
    perm = derangement(len(enhanced), rng)
    return (mean_plain + enhanced) - mean_plain[perm], perm


def source_matrices(deltas: Deltas, site: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``[n_users, d]`` float64 matrices of every source available at ``site``.

    ``control`` needs control deltas and ``shuffled`` plain means (and two users); a source
    whose inputs are missing is left out.
    """
    x = deltas.enhanced[:, site].double().numpy()
    out = {"deltas": x, "gaussian_null": gaussian_null(x, rng)}
    if deltas.control is not None:
        out["control"] = deltas.control[:, site].double().numpy()
    if deltas.mean_plain is not None and len(x) >= 2:
        out["shuffled"], _ = shuffled_deltas(x, deltas.mean_plain[:, site].double().numpy(), rng)
    return out


BOOTSTRAPS = ("bayesian", "classic")
"""Kinds of bootstrap over users (see :func:`bootstrap_weights`)."""


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator, kind: str = "bayesian") -> np.ndarray:
    """``[n_boot, n]`` user weights, each row summing to ``n``.

    ``classic``: resampling counts (rows drawn with replacement; about a third of the users
    drop out of each resample, which caps its rank at the number of distinct users).
    ``bayesian``: Rubin's Bayesian bootstrap, ``n * Dirichlet(1, ..., 1)`` weights: every user
    stays in with a random positive weight, so ranks are not capped by dropped users.
    """
    if kind == "classic":
        idx = rng.integers(0, n, size=(n_boot, n))
        counts = np.zeros((n_boot, n))
        np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
        return counts
    if kind == "bayesian":
        return n * rng.dirichlet(np.ones(n), size=n_boot).reshape(n_boot, n)
    raise ConfigError(f"unknown bootstrap {kind!r}: choose from {BOOTSTRAPS}")


def bootstrap_spectra(x: np.ndarray, weights: np.ndarray, center: bool) -> np.ndarray:
    """Squared singular values of ``diag(sqrt(w)) (x - mu_w)`` for every weight row ``w``.

    ``mu_w = sum_u w_u x_u / n`` when ``center`` (else 0); with resampling counts as weights this
    is exactly the spectrum of the resampled (and re-centred) matrix. Works on the smaller
    side: the weighted Gram matrix (``n <= d``) or the weighted scatter
    ``X^T W X - n mu_w mu_w^T``. Returns ``[n_boot, min(n, d)]``, descending.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    m = min(n, d)
    chunk = max(1, _CHUNK_BYTES // (8 * m * m))
    out = []
    gram = x @ x.T if n <= d else None
    for start in range(0, len(weights), chunk):
        w = weights[start:start + chunk]                       # [b, n]
        if gram is not None:
            mats = gram[None, :, :]
            if center:
                a = w @ gram / n                               # [b, n]: x_u . mu_w
                mm = np.einsum("bn,bn->b", a, w) / n           # [b]: mu_w . mu_w
                mats = mats - a[:, :, None] - a[:, None, :] + mm[:, None, None]
            root = np.sqrt(w)
            mats = root[:, :, None] * mats * root[:, None, :]
        else:
            mats = np.einsum("bn,nd,ne->bde", w, x, x, optimize=True)
            if center:
                mu = w @ x / n
                mats = mats - n * mu[:, :, None] * mu[:, None, :]
        eig = np.linalg.eigvalsh(mats)[:, ::-1]
        out.append(np.clip(eig, 0.0, None))
    return np.concatenate(out) if out else np.zeros((0, m))


def bootstrap_ranks(
    x: np.ndarray, weights: np.ndarray, center: bool, taus: tuple[float, ...]
) -> np.ndarray:
    """``[n_boot, len(taus)]``: ``r(tau)`` of ``x`` under every bootstrap weight row."""
    cum = cumulative_energy(bootstrap_spectra(x, weights, center))
    return np.stack([rank_at_energy(cum, tau) for tau in taus], axis=1)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval along axis 0 (NaN where there are no draws)."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan
    alpha = (1.0 - level) / 2.0
    return np.nanquantile(values, alpha, axis=0), np.nanquantile(values, 1.0 - alpha, axis=0)
