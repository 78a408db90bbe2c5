"""Null models and bootstraps that give "low rank" and "collective shift" a yardstick.

Sources compared with the real deltas ``delta_u = n_u - m_u`` (``n_u``, ``m_u``: user *u*'s
mean enhanced and plain hidden states) at each site:

- ``gaussian_null``: ``g_u * ||delta_u|| / ||g_u||`` with ``g_u ~ N(0, I_d)``: random
  directions with the deltas' norms;
- ``control``: the random-text control deltas ``c_u - m_u`` (same added length, no history);
- ``shuffled``: ``n_u - m_{pi(u)}`` for a random derangement ``pi``: a user's enhanced mean
  paired with another user's plain mean. It equals ``delta_u + (m_u - m_{pi(u)})``: mean-centred,
  it differs from the centred deltas only by the spread of the users' plain means, so it is
  close to the deltas by construction and no yardstick for centred ranks;
- ``other_user``, ``format_random``, ``permuted``: deltas of the format-matched control prompts
  (``perfit_probe.data.controls``), when they were cached.

Repeated null draws (``null_rank_draws``): ranks of ``n_draws`` independent draws of a
Gaussian null, against which the observed rank gets a p-value (``rank_p_value``):

- ``gaussian_null`` (isotropic, matched norms, as above);
- ``anisotropic_null``: ``N(0, S)`` with ``S`` the users' sample covariance of the deltas
  (``anisotropic_null``). It keeps the second-order spread of the personal shifts and drops
  both the collective shift (the mean) and any structure beyond the covariance. Uncentred, a
  rank of the deltas far below it says the low rank comes from the shared mean direction;
  centred, the null reproduces the deltas' own spectrum up to sampling noise, so its p-value
  should not be small: it is a calibration check, not evidence of low rank.

Confidence intervals are percentile intervals of the statistic over bootstrap resamples of
users. The default is Rubin's Bayesian bootstrap (random positive user weights, no user
dropped); the classic bootstrap (users drawn with replacement) is available. Both leave about
``n/2`` effective users per resample, so for spread-out sources (isotropic noise, the
controls when they are not low-rank) the rank of a resample falls below the full-sample rank
and a rank interval can sit wholly below its point estimate; for a few dominant directions
they are accurate. The analysis flags every interval that misses its point estimate
(``ci_contains_value``) and the report says why. Read them as the stability of a statistic
across user samples, not as coverage of a population rank. The Gaussian nulls get no
bootstrap: their interval is the spread of repeated null draws.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
from jaxtyping import Float, Int, Real

from perfit_probe.analysis.shift import cumulative_energy, energy_spectrum, rank_at_energy
from perfit_probe.config import AnalysisSource, Bootstrap, ControlVariant
from perfit_probe.data.controls import derangement
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError

CONTROL_SOURCES = get_args(ControlVariant)
"""Sources from the opt-in control prompt variants (``Deltas.variant_deltas``)."""

SOURCES = get_args(AnalysisSource)
"""Every source the analysis can compare, the real deltas first."""

NULLS = ("gaussian_null", "anisotropic_null")
"""Nulls drawn repeatedly for a rank p-value (``null_rank_draws``)."""

_CHUNK_BYTES = 256 * 2**20


def gaussian_null(x: Float[np.ndarray, "users d_model"],
                  rng: np.random.Generator) -> Float[np.ndarray, "users d_model"]:
    """Isotropic Gaussian directions with the row norms of ``x`` (``[n, d]``)."""
    g = rng.standard_normal(x.shape)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return g / np.linalg.norm(g, axis=1, keepdims=True) * norms


def shuffled_deltas(
    enhanced: Float[np.ndarray, "users d_model"], mean_plain: Float[np.ndarray, "users d_model"],
    rng: np.random.Generator,
) -> tuple[Float[np.ndarray, "users d_model"], Int[np.ndarray, " users"]]:
    """``n_u - m_{pi(u)}`` with ``n_u = m_u + delta_u``; returns the matrix and ``pi``."""
    perm = derangement(len(enhanced), rng)
    return (mean_plain + enhanced) - mean_plain[perm], perm


def source_matrices(deltas: Deltas, site: int,
                    rng: np.random.Generator) -> dict[str, Float[np.ndarray, "users d_model"]]:
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
    for name in CONTROL_SOURCES:
        if name in deltas.variant_deltas:
            out[name] = deltas.variant_deltas[name][:, site].double().numpy()
    return out


def anisotropic_null(x: Float[np.ndarray, "users d_model"], rng: np.random.Generator, n_draws: int | None = None,
                     ) -> Float[np.ndarray, "*draws users d_model"]:
    """Draws of ``n`` rows from ``N(0, S)``, ``S = Xc^T Xc / (n - 1)`` the sample covariance of ``x``.

    Sampled exactly without forming ``S``: ``Z Xc / sqrt(n - 1)`` with ``Z`` standard normal
    ``[n, n]`` (each row ``z^T Xc / sqrt(n-1)`` has covariance ``Xc^T Xc / (n-1)``). Returns
    ``[n, d]``, or ``[n_draws, n, d]`` when ``n_draws`` is given. What it tests: see the module
    docstring.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise ConfigError("the anisotropic null needs at least two users")
    root = (x - x.mean(0)) / np.sqrt(n - 1)
    z = rng.standard_normal((1 if n_draws is None else n_draws, n, n))
    draws = z @ root
    return draws[0] if n_draws is None else draws


def _null_draws(x: np.ndarray, kind: str, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian_null":
        g = rng.standard_normal((n_draws, *x.shape))
        norms = np.linalg.norm(x, axis=1)[None, :, None]
        return g / np.maximum(np.linalg.norm(g, axis=2, keepdims=True), 1e-300) * norms
    if kind == "anisotropic_null":
        return anisotropic_null(x, rng, n_draws)
    raise ConfigError(f"unknown null {kind!r}: choose from {NULLS}")


def null_rank_draws(
    x: Float[np.ndarray, "users d_model"], kind: str, n_draws: int, rng: np.random.Generator,
    centers: tuple[bool, ...], taus: tuple[float, ...],
) -> dict[bool, Int[np.ndarray, "draws taus"]]:
    """``{center: [n_draws, len(taus)]}``: ``r(tau)`` of ``n_draws`` independent draws of the
    null ``kind`` (``NULLS``) for ``x``; each draw is analysed both uncentred and centred."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    chunk = max(1, _CHUNK_BYTES // (8 * n * d))
    out: dict[bool, list[np.ndarray]] = {c: [] for c in centers}
    for start in range(0, n_draws, chunk):
        draws = _null_draws(x, kind, min(chunk, n_draws - start), rng)
        for center in centers:
            cum = cumulative_energy(energy_spectrum(draws, center))
            out[center].append(np.stack([rank_at_energy(cum, tau) for tau in taus], axis=1))
    return {c: np.concatenate(v) if v else np.zeros((0, len(taus)), dtype=int) for c, v in out.items()}


def rank_p_value(observed: int | float, draws: Real[np.ndarray, " draws"]) -> float:
    """``(1 + #{draws <= observed}) / (1 + n_draws)``: how often a null draw has a rank at most
    the observed one (small: the observed rank is lower than the null's). With ties (ranks are
    integers) the p-value is conservative: ``P(p <= a) <= a`` under the null."""
    draws = np.asarray(draws)
    return float((1 + np.sum(draws <= observed)) / (1 + len(draws)))


def rank_p_value_randomized(observed: int | float, draws: Real[np.ndarray, " draws"],
                            rng: np.random.Generator) -> float:
    """``(1 + #{draws < observed} + K) / (1 + n_draws)`` with ``K`` uniform on ``0..#{draws ==
    observed}``: ties broken at random, so that under the null (the observed rank exchangeable
    with the draws) the p-value is exactly uniform on ``{1, ..., n_draws + 1} / (n_draws + 1)``.
    Never above ``rank_p_value``."""
    draws = np.asarray(draws)
    ties = int(np.sum(draws == observed))
    return float((1 + np.sum(draws < observed) + rng.integers(0, ties + 1)) / (1 + len(draws)))


BOOTSTRAPS = get_args(Bootstrap)
"""Kinds of bootstrap over users (see :func:`bootstrap_weights`)."""


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator,
                      kind: str = "bayesian") -> Float[np.ndarray, "boot n"]:
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


def bootstrap_spectra(x: Float[np.ndarray, "users d_model"], weights: Float[np.ndarray, "boot users"],
                      center: bool) -> Float[np.ndarray, "boot k"]:
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
    x: Float[np.ndarray, "users d_model"], weights: Float[np.ndarray, "boot users"], center: bool,
    taus: tuple[float, ...],
) -> Int[np.ndarray, "boot taus"]:
    """``[n_boot, len(taus)]``: ``r(tau)`` of ``x`` under every bootstrap weight row."""
    cum = cumulative_energy(bootstrap_spectra(x, weights, center))
    return np.stack([rank_at_energy(cum, tau) for tau in taus], axis=1)


def percentile_interval(values: Real[np.ndarray, " draws *rest"], level: float = 0.95,
                        ) -> tuple[Float[np.ndarray, "*rest"] | np.floating, Float[np.ndarray, "*rest"] | np.floating]:
    """Percentile bootstrap interval along axis 0 (NaN where there are no draws); numpy
    scalars for one-dimensional ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan
    alpha = (1.0 - level) / 2.0
    return np.nanquantile(values, alpha, axis=0), np.nanquantile(values, 1.0 - alpha, axis=0)
