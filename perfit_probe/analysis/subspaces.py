"""Comparing subspaces: principal angles, a random-subspace null, and energy shares.

For subspaces spanned by the rows of ``A [a, d]`` and ``B [b, d]``, with ``Q_A``, ``Q_B``
orthonormal bases of the row spaces, the *principal angles* are::

    theta_i = arccos(sigma_i(Q_A Q_B^T)),   i = 1 .. min(rank A, rank B)

in ascending order (0 degrees: a shared direction; 90: orthogonal). Their summary
``overlap = mean_i cos^2 theta_i = ||Q_A Q_B^T||_F^2 / min(a, b)`` is 1 for nested subspaces
and ``max(a, b) / d`` in expectation for a uniformly random one. The *null* draws subspaces
of ``B``'s dimension uniformly at random (orthonormalised Gaussian rows) and reports the
percentile of the observed overlap among them.

The *energy share* of vectors ``e_j`` inside a subspace with orthonormal basis ``Q`` is
``sum_j ||Q e_j||^2 / sum_j ||e_j||^2`` (``dim / d`` in expectation for random directions).

``centred_pcs`` gives the top principal directions of a stack of vectors after removing
their mean (the personal shifts' directions when the rows are users' delta vectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from perfit_probe.errors import ConfigError


def orthonormal_basis(rows: Float[np.ndarray, "*n d"], tol: float = 1e-10) -> Float[np.ndarray, "k d"]:
    """``[k, d]`` orthonormal rows spanning the row space of ``rows [n, d]`` (rank-revealing SVD)."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    _, svals, vh = np.linalg.svd(rows, full_matrices=False)
    if svals.size == 0 or svals[0] == 0:
        raise ConfigError("cannot take the span of zero vectors")
    keep = svals > tol * svals[0]
    return vh[keep]


def principal_angles(a: Float[np.ndarray, "*m d"], b: Float[np.ndarray, "*n d"]) -> Float[np.ndarray, " angles"]:
    """Principal angles (degrees, ascending) between the row spaces of ``a [., d]`` and ``b [., d]``."""
    qa, qb = orthonormal_basis(a), orthonormal_basis(b)
    if qa.shape[1] != qb.shape[1]:
        raise ConfigError(f"subspaces of different ambient dimensions: {qa.shape[1]} and {qb.shape[1]}")
    svals = np.linalg.svd(qa @ qb.T, compute_uv=False)
    return np.degrees(np.arccos(np.clip(svals, -1.0, 1.0)))


def overlap(angles_deg: Float[np.ndarray, " angles"]) -> float:
    """``mean cos^2`` of principal angles (1: nested subspaces; ``dim / d`` by chance)."""
    return float(np.mean(np.cos(np.radians(angles_deg)) ** 2))


def random_rows(k: int, d: int, rng: np.random.Generator) -> Float[np.ndarray, "k d"]:
    """A uniformly random ``k``-dimensional subspace of R^d (orthonormal rows)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T


@dataclass(frozen=True)
class AngleTest:
    """Principal angles of two subspaces against random subspaces of the second one's dimension."""

    angles: Float[np.ndarray, " angles"]
    """Observed principal angles (degrees, ascending)."""
    null_angles: Float[np.ndarray, "draws angles"]
    """``[n_draws, n_angles]``: principal angles of the random draws."""
    overlap: float
    """``mean cos^2`` of the observed angles."""
    null_overlap: Float[np.ndarray, " draws"]
    """``[n_draws]``: the same for each random draw."""

    @property
    def percentile(self) -> float:
        """Share of random draws (in %) whose overlap is below the observed one."""
        return float(100.0 * np.mean(self.null_overlap < self.overlap))


def random_null(reference: Float[np.ndarray, "k d"], dim: int, *, n_draws: int = 200, rng: np.random.Generator,
                ) -> tuple[Float[np.ndarray, "draws angles"], Float[np.ndarray, " draws"]]:
    """Principal angles ``[n_draws, n]`` and overlaps ``[n_draws]`` between ``reference`` and
    ``n_draws`` uniformly random ``dim``-dimensional subspaces."""
    ref = orthonormal_basis(reference)
    angles = np.stack([principal_angles(ref, random_rows(dim, ref.shape[1], rng)) for _ in range(n_draws)])
    return angles, np.array([overlap(row) for row in angles])


def angle_test(reference: Float[np.ndarray, "k d"], other: Float[np.ndarray, "r d"], *, n_draws: int = 200,
               rng: np.random.Generator | None = None,
               null: tuple[Float[np.ndarray, "draws angles"], Float[np.ndarray, " draws"]] | None = None,
               ) -> AngleTest:
    """Principal angles between ``reference`` and ``other`` and between ``reference`` and
    ``n_draws`` random subspaces of ``other``'s dimension (see the module docstring).

    ``null``: a ``random_null`` result to reuse (same reference, same dimension as ``other``).
    """
    observed = principal_angles(reference, other)
    if null is None:
        if rng is None:
            raise ConfigError("angle_test needs rng= or a precomputed null=")
        null = random_null(reference, orthonormal_basis(other).shape[0], n_draws=n_draws, rng=rng)
    return AngleTest(observed, null[0], overlap(observed), null[1])


def energy_share(vectors: Float[np.ndarray, "*n d"], basis: Float[np.ndarray, "*k d"]) -> float:
    """``sum ||Q e||^2 / sum ||e||^2`` of ``vectors [n, d]`` inside the span of ``basis``."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    q = orthonormal_basis(basis)
    total = float((vectors ** 2).sum())
    if total == 0:
        return float("nan")
    return float(((vectors @ q.T) ** 2).sum() / total)


@dataclass(frozen=True)
class CentredPCs:
    """Top principal directions of a stack of vectors after centring."""

    mean: Float[np.ndarray, " d"]
    """``[d]``: the mean vector (the collective shift for delta vectors)."""
    components: Float[np.ndarray, "k d"]
    """``[k, d]``: orthonormal principal directions, by decreasing variance."""
    scales: Float[np.ndarray, " k"]
    """``[k]``: standard deviation of the rows along each direction (``sigma_i / sqrt(n)``)."""
    explained: Float[np.ndarray, " k"]
    """``[k]``: share of the centred rows' squared norm along each direction."""


def centred_pcs(rows: Float[np.ndarray, "n d"], k: int) -> CentredPCs:
    """The ``k`` leading principal directions of ``rows [n, d]`` after removing their mean
    (``k`` is capped at ``n - 1``); signs fixed so that each direction's largest |entry| is positive."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.shape[0] < 2:
        raise ConfigError("principal directions need at least 2 rows")
    mean = rows.mean(0)
    _, svals, vh = np.linalg.svd(rows - mean, full_matrices=False)
    k = max(1, min(k, rows.shape[0] - 1, int((svals > 1e-12 * max(svals[0], 1e-300)).sum())))
    comps = vh[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    total = float((svals ** 2).sum()) or 1.0
    return CentredPCs(mean, comps * signs[:, None], svals[:k] / np.sqrt(rows.shape[0]),
                      svals[:k] ** 2 / total)
