"""Synthetic delta vectors with planted structure, to validate the shift estimators.

At every site ``l`` the generator draws a unit collective direction ``c_l`` and an orthonormal
personal basis ``B_l`` (``rank`` rows, orthogonal to ``c_l``). User ``u``'s per-query deltas are::

    x_{u,q,l} = collective_norm * c_l + a_{u,l} @ B_l + noise * e_{u,q,l},   e ~ N(0, I_d / d)

and the user's delta is their mean over queries (as ``perfit_probe.deltas`` defines it). The
personal coefficients ``a_{.,l}`` (``[n_users, rank]``) are whitened: centred over users, with
orthogonal columns of equal norm ``personal_scale * sqrt(n_users)``. The centred noise-free
deltas thus have exactly ``rank`` equal singular values, and the uncentred ones one more (the
collective shift) when ``collective_norm > 0``. Control deltas are noise only (the mean of
``n_queries`` noise vectors); plain means are random per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError


@dataclass(frozen=True)
class PlantedShift:
    """Ground truth of :func:`planted_deltas`."""

    collective: Float[np.ndarray, "sites d_model"]
    """``[n_sites, d_model]``: the planted collective shift ``collective_norm * c_l``."""
    personal_basis: Float[np.ndarray, "sites rank d_model"]
    """``[n_sites, rank, d_model]``: orthonormal personal directions ``B_l``."""
    coefficients: Float[np.ndarray, "users sites rank"]
    """``[n_users, n_sites, rank]``: personal coefficients ``a_{u,l}``."""
    rank: int
    """Planted personal rank."""
    noise: float
    """Expected norm of one per-query noise vector."""

    @property
    def collective_direction(self) -> Float[np.ndarray, "sites d_model"]:
        """``[n_sites, d_model]``: unit collective directions (zeros where none was planted)."""
        norm = np.linalg.norm(self.collective, axis=-1, keepdims=True)
        return np.where(norm > 0, self.collective / np.where(norm > 0, norm, 1.0), 0.0)


def planted_deltas(
    n_users: int = 40,
    n_sites: int = 3,
    d_model: int = 64,
    rank: int = 3,
    collective_norm: float = 4.0,
    personal_scale: float = 1.0,
    noise: float = 0.1,
    n_queries: int = 8,
    seed: int = 0,
) -> tuple[Deltas, PlantedShift]:
    """Deltas of ``n_users`` users at ``n_sites`` sites with a planted collective + rank-k shift.

    ``personal_scale = 0`` plants no personal shift; ``collective_norm = 0`` no collective one.
    Sites are named ``blocks.{l}.hook_resid_post``. Returns the ``Deltas`` (with per-query
    deltas, control deltas and plain means) and the :class:`PlantedShift` ground truth.
    """
    if not 0 <= rank <= min(n_users - 1, d_model - 1) or n_queries < 1:
        raise ConfigError(
            f"planted rank={rank} must lie in 0..min(n_users-1, d_model-1) and n_queries "
            f"(={n_queries}) must be >= 1"
        )
    rng = np.random.default_rng(seed)
    collective = np.zeros((n_sites, d_model))
    basis = np.zeros((n_sites, rank, d_model))
    coeffs = np.zeros((n_users, n_sites, rank))
    per_query = np.zeros((n_users, n_queries, n_sites, d_model))
    control = np.zeros((n_users, n_sites, d_model))
    for layer in range(n_sites):
        q, _ = np.linalg.qr(rng.standard_normal((d_model, rank + 1)))
        collective[layer] = collective_norm * q[:, 0]
        basis[layer] = q[:, 1:].T
        if rank:
            raw = rng.standard_normal((n_users, rank))
            raw -= raw.mean(0)
            white, _ = np.linalg.qr(raw)  # orthonormal columns, still centred
            coeffs[:, layer] = personal_scale * np.sqrt(n_users) * white
        signal = collective[layer] + coeffs[:, layer] @ basis[layer]
        eps = rng.standard_normal((n_users, n_queries, d_model)) * (noise / np.sqrt(d_model))
        per_query[:, :, layer] = signal[:, None, :] + eps
        ctrl = rng.standard_normal((n_users, n_queries, d_model)) * (noise / np.sqrt(d_model))
        control[:, layer] = ctrl.mean(1)
    mean_plain = rng.standard_normal((n_users, 1, d_model)) + rng.standard_normal((1, n_sites, d_model))
    user_ids = [f"u{i:03d}" for i in range(n_users)]
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    deltas = Deltas(
        user_ids=user_ids,
        sites=[f"blocks.{layer}.hook_resid_post" for layer in range(n_sites)],
        enhanced=f32(per_query.mean(1)),
        control=f32(control),
        mean_plain=f32(mean_plain),
        query_delta=f32(per_query.reshape(n_users * n_queries, n_sites, d_model)),
        query_user_ids=[u for u in user_ids for _ in range(n_queries)],
        query_ids=[f"{u}-q{j}" for u in user_ids for j in range(n_queries)],
        meta={"task": "planted", "seed": seed, "rank": rank, "collective_norm": collective_norm,
              "personal_scale": personal_scale, "noise": noise, "n_queries": n_queries},
    )
    truth = PlantedShift(collective=collective, personal_basis=basis, coefficients=coeffs,
                         rank=rank, noise=noise)
    return deltas, truth
