"""Low-rank structure of delta vectors: a PCA-style estimator and rank-at-energy statistics.

For stacked delta vectors ``X`` (``n`` users x ``d`` features), optionally mean-centred
(``Xc = X - mean(X)``), with singular values ``s_1 >= s_2 >= ...``::

    energy(k) = sum_{j<=k} s_j^2 / ||Xc||_F^2          (cumulative explained variance)
    r(tau)    = min { k : energy(k) >= tau }           (rank at energy share tau)
    per_mille(tau) = 1000 * r(tau) / max_rank          (share of the maximum possible rank)

with ``max_rank = min(n, d)``, or ``min(n - 1, d)`` when centred (centring removes one
dimension: ``n`` centred rows span at most ``n - 1``).

The total energy ``||Xc||_F^2`` is computed exactly, so ``energy(k)`` is exact even when only
the leading components are estimated (randomized SVD). Whether the paper centred its deltas is
not published: both are offered (``center``) and the analysis reports both.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from jaxtyping import Float, Int
from sklearn.utils.extmath import randomized_svd, svd_flip

from perfit_probe.errors import ConfigError

log = logging.getLogger(__name__)

SvdMode = Literal["auto", "exact", "randomized"]
EXACT_MAX_DIM = 2048
"""``svd="auto"`` uses the exact SVD when ``min(n, d)`` is at most this, randomized above."""
ENERGY_TOL = 1e-9
"""Slack when comparing a cumulative energy share with ``tau`` (floating-point round-off)."""


def rank_at_energy(cumulative: Float[np.ndarray, "*batch k"], tau: float) -> int | Int[np.ndarray, "*batch"]:
    """Smallest ``k >= 1`` with ``cumulative[k-1] >= tau`` (0 when the total energy is zero).

    ``cumulative`` may be batched: the last axis holds the curve and an integer array is
    returned. Raises ``ConfigError`` when ``tau`` is outside ``(0, 1]``; returns
    ``len(curve) + 1`` where a truncated curve never reaches ``tau``.
    """
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"energy share tau={tau} must lie in (0, 1]")
    cumulative = np.asarray(cumulative, dtype=np.float64)
    reached = cumulative >= tau - ENERGY_TOL
    ranks = np.where(reached.any(-1), reached.argmax(-1) + 1, cumulative.shape[-1] + 1)
    ranks = np.where(cumulative[..., -1] <= 0.0, 0, ranks)
    return int(ranks) if ranks.ndim == 0 else ranks


def energy_spectrum(x: Float[np.ndarray, "*batch n d"], center: bool) -> Float[np.ndarray, "*batch k"]:
    """Squared singular values of (optionally centred) ``x``, descending, length ``min(n, d)``.

    Computed from the smaller Gram matrix (``x x^T`` or ``x^T x``) with ``eigvalsh`` in
    float64: only the spectrum is needed, which makes bootstraps cheap. ``x`` may be batched
    ``[..., n, d]``.
    """
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=-2, keepdims=True)
    n, d = x.shape[-2:]
    gram = x @ np.swapaxes(x, -1, -2) if n <= d else np.swapaxes(x, -1, -2) @ x
    eig = np.linalg.eigvalsh(gram)[..., ::-1]
    return np.clip(eig, 0.0, None)


def cumulative_energy(spectrum: Float[np.ndarray, "*batch k"]) -> Float[np.ndarray, "*batch k"]:
    """Cumulative share of energy ``energy(k)`` from squared singular values (last axis)."""
    spectrum = np.asarray(spectrum, dtype=np.float64)
    total = spectrum.sum(-1, keepdims=True)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, np.cumsum(spectrum, -1) / safe, 0.0)


class ShiftPCA:
    """Principal directions of stacked delta vectors, in the scikit-learn style.

    ``fit(X)`` with ``X`` of shape ``[n, d]`` learns ``components_`` (``[k, d]``, orthonormal
    rows), ``singular_values_`` (``[k]``), ``explained_variance_ratio_`` (``s_j^2`` over the
    total energy, exact even when truncated), ``mean_`` (zeros when ``center=False``),
    ``total_energy_``, ``max_rank_`` (``min(n, d)``; ``min(n - 1, d)`` centred, at least 1).
    Signs are fixed so that the largest-magnitude
    entry of each component is positive (the exact and randomized solvers then agree).
    """

    def __init__(
        self,
        center: bool = False,
        svd: SvdMode = "auto",
        n_components: int | None = None,
        random_state: int = 0,
    ) -> None:
        self.center = center
        """Subtract the mean delta before the SVD."""
        self.svd = svd
        """``exact`` (LAPACK), ``randomized`` (Halko et al.) or ``auto`` (by size)."""
        self.n_components = n_components
        """Components to keep; ``None`` keeps all (exact) or ``min(n, d, 256)`` (randomized)."""
        self.random_state = random_state
        """Seed of the randomized solver."""

    def fit(self, x: Float[np.ndarray, "n d"]) -> ShiftPCA:
        """Estimate the principal directions of ``x`` (``[n, d]``); returns ``self``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ConfigError(f"ShiftPCA.fit expects a non-empty [n, d] matrix, got shape {x.shape}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise ConfigError(f"unknown svd mode {self.svd!r}: use 'auto', 'exact' or 'randomized'")
        n, d = x.shape
        max_rank = min(n, d)
        k = max_rank if self.n_components is None else int(self.n_components)
        if not 1 <= k <= max_rank:
            raise ConfigError(f"n_components={k} must lie in 1..min(n, d)={max_rank}")
        self.mean_ = x.mean(0) if self.center else np.zeros(d)
        xc = x - self.mean_
        mode = self.svd
        if mode == "auto":
            mode = "exact" if max_rank <= EXACT_MAX_DIM else "randomized"
        if mode == "exact":
            u, s, vt = np.linalg.svd(xc, full_matrices=False)
            u, vt = svd_flip(u, vt, u_based_decision=False)
            u, s, vt = u[:, :k], s[:k], vt[:k]
        else:
            if self.n_components is None:
                k = min(max_rank, 256)
            u, s, vt = randomized_svd(xc, k, n_oversamples=max(10, k // 2), n_iter=7,
                                      flip_sign=False, random_state=self.random_state)
            u, vt = svd_flip(u, vt, u_based_decision=False)
        self.svd_used_ = mode
        self.n_samples_, self.n_features_in_ = n, d
        self.max_rank_ = max(1, min(n - 1, d)) if self.center else max_rank
        self.components_ = vt
        self.singular_values_ = s
        self.n_components_ = len(s)
        self.total_energy_ = float(np.square(xc).sum())
        total = self.total_energy_ if self.total_energy_ > 0 else 1.0
        self.explained_variance_ratio_ = np.square(s) / total
        log.debug("ShiftPCA: %s SVD of %dx%d, %d components", mode, n, d, len(s))
        return self

    @property
    def cumulative_ratio_(self) -> Float[np.ndarray, " k"]:
        """``energy(k)`` for ``k = 1..n_components_``."""
        return np.cumsum(self.explained_variance_ratio_)

    def rank_at(self, tau: float) -> int:
        """``r(tau)``: fewest leading components holding a share ``tau`` of the energy.

        Raises ``ConfigError`` when the kept components do not reach ``tau`` (a truncated fit).
        """
        if self.total_energy_ <= 0:
            return 0
        rank = rank_at_energy(self.cumulative_ratio_, tau)
        if rank > self.n_components_:
            raise ConfigError(
                f"the {self.n_components_} kept components hold only "
                f"{self.cumulative_ratio_[-1]:.3f} of the energy, less than tau={tau}: "
                "raise n_components or use svd='exact'"
            )
        return rank

    def rank_per_mille(self, tau: float) -> float:
        """``1000 * r(tau) / max_rank_`` (``n - 1`` replaces ``n`` when centred)."""
        return 1000.0 * self.rank_at(tau) / self.max_rank_

    def transform(self, x: Float[np.ndarray, "m d"]) -> Float[np.ndarray, "m k"]:
        """Coordinates of ``x`` (``[m, d]``) on the components: ``(x - mean_) @ components_.T``."""
        return (np.asarray(x, dtype=np.float64) - self.mean_) @ self.components_.T

    def inverse_transform(self, z: Float[np.ndarray, "m k"]) -> Float[np.ndarray, "m d"]:
        """Back from coordinates: ``z @ components_ + mean_``."""
        return np.asarray(z, dtype=np.float64) @ self.components_ + self.mean_
