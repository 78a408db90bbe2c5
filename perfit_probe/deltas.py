"""Delta vectors: per user and layer, ``delta = mean(enhanced) - mean(plain)``.

For user *u* and site *l*, with ``h_l(x)`` the cached hidden state of prompt *x*
(last prompt token by default)::

    m_u = mean_q h_l(plain(q)),  n_u = mean_q h_l(enhanced(q)),  c_u = mean_q h_l(control(q))
    delta_u = n_u - m_u          (personalization shift)
    control_u = c_u - m_u        (random-text control shift, same added token length)

Per-query deltas ``h_l(enhanced(q)) - h_l(plain(q))`` are kept too: the analyses need them for
between- versus within-user variance and for identifying a user from held-out shifts.

``Deltas`` is the artifact the cache stage writes and the analysis stage reads; it saves to
``deltas.safetensors`` (tensors) plus ``deltas.json`` (ids, sites, metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from perfit_probe.errors import CacheError
from perfit_probe.rundir import atomic_write_text

TENSOR_FILE = "deltas.safetensors"
META_FILE = "deltas.json"


@dataclass
class Deltas:
    """Delta vectors of a set of users at a set of sites (float32)."""

    user_ids: list[str]
    """Users, in the order of the first axis."""
    sites: list[str]
    """Canonical site names, in the order of the second axis."""
    enhanced: torch.Tensor
    """``[n_users, n_sites, d_model]``: mean(enhanced) - mean(plain) per user."""
    control: torch.Tensor | None = None
    """``[n_users, n_sites, d_model]``: mean(control) - mean(plain), when cached."""
    mean_plain: torch.Tensor | None = None
    """``[n_users, n_sites, d_model]``: mean plain hidden state per user."""
    query_delta: torch.Tensor | None = None
    """``[n_queries, n_sites, d_model]``: enhanced - plain for each query."""
    query_user_ids: list[str] = field(default_factory=list)
    """Owner of each row of ``query_delta``."""
    query_ids: list[str] = field(default_factory=list)
    """Query id of each row of ``query_delta``."""
    meta: dict = field(default_factory=dict)
    """Provenance: task, positions, model identity, counts."""

    def __post_init__(self) -> None:
        n_users, n_sites = len(self.user_ids), len(self.sites)
        if tuple(self.enhanced.shape[:2]) != (n_users, n_sites):
            raise CacheError(
                f"deltas: enhanced has shape {tuple(self.enhanced.shape)}, expected "
                f"({n_users}, {n_sites}, d_model)"
            )
        if self.query_delta is not None and len(self.query_user_ids) != self.query_delta.shape[0]:
            raise CacheError("deltas: query_user_ids does not match query_delta rows")

    @property
    def d_model(self) -> int:
        """Residual-stream width."""
        return int(self.enhanced.shape[-1])

    def site_index(self, site: str | int) -> int:
        """Index of a site given by canonical name, or a position in ``sites``."""
        if isinstance(site, int):
            return site
        try:
            return self.sites.index(site)
        except ValueError:
            raise CacheError(f"site {site!r} not in deltas (have {self.sites})") from None

    def save(self, directory: Path) -> None:
        """Write ``deltas.safetensors`` and ``deltas.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"enhanced": self.enhanced.float().contiguous()}
        for name in ("control", "mean_plain", "query_delta"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.float().contiguous()
        tmp = directory / f".{TENSOR_FILE}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(directory / TENSOR_FILE)
        meta = {
            "user_ids": self.user_ids,
            "sites": self.sites,
            "query_user_ids": self.query_user_ids,
            "query_ids": self.query_ids,
            "meta": self.meta,
        }
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Deltas:
        """Read what :meth:`save` wrote; ``CacheError`` when missing or corrupt."""
        directory = Path(directory)
        tpath, mpath = directory / TENSOR_FILE, directory / META_FILE
        if not tpath.is_file() or not mpath.is_file():
            raise CacheError(f"no delta vectors in {directory}: run `perfit-probe cache` first")
        try:
            tensors = load_file(str(tpath))
            meta = json.loads(mpath.read_text())
        except Exception as exc:  # safetensors raises several types on corrupt files
            raise CacheError(f"corrupt delta vectors in {directory}: {exc}".splitlines()[0]) from None
        return cls(
            user_ids=meta["user_ids"],
            sites=meta["sites"],
            enhanced=tensors["enhanced"],
            control=tensors.get("control"),
            mean_plain=tensors.get("mean_plain"),
            query_delta=tensors.get("query_delta"),
            query_user_ids=meta.get("query_user_ids", []),
            query_ids=meta.get("query_ids", []),
            meta=meta.get("meta", {}),
        )
