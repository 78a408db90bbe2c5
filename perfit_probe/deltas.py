"""Delta vectors: per user and layer, ``delta = mean(enhanced) - mean(plain)``.

For user *u* and site *l*, with ``h_l(x)`` the cached hidden state of prompt *x*
(last prompt token by default)::

    m_u = mean_q h_l(plain(q)),  n_u = mean_q h_l(enhanced(q)),  c_u = mean_q h_l(control(q))
    delta_u = n_u - m_u          (personalization shift)
    control_u = c_u - m_u        (random-text control shift, same added token length)

The format-matched controls of ``perfit_probe.data.controls`` (``other_user``,
``format_random``, ``permuted``), when cached, give ``variant_deltas[v] = mean_q h_l(v(q)) - m_u``
the same way.

Per-query deltas ``h_l(enhanced(q)) - h_l(plain(q))`` are kept too: the analyses need them for
between- versus within-user variance and for identifying a user from held-out shifts; likewise
``h_l(v(q)) - h_l(plain(q))`` for each cached control variant (``variant_query_deltas``).

``Deltas`` is the artifact the cache stage writes and the analysis stage reads; it saves to
``deltas.safetensors`` (tensors) plus ``deltas.json`` (ids, sites, metadata), with their
SHA-256 in ``checksums.json``, verified on load (a corrupted file is refused).
``compute_deltas(cache)`` makes one from an ``ActivationCache`` (streaming over its shards);
``delta_frame(deltas)`` is its tidy per-user-and-site summary (saved as ``deltas.csv``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Float64
from safetensors.torch import load_file, save_file
from torch import Tensor

from perfit_probe._io import atomic_write_text, verify_checksums, write_checksums
from perfit_probe.cache_store import ActivationCache, pool_values
from perfit_probe.data.records import CONTROL_VARIANTS
from perfit_probe.errors import CacheError
from perfit_probe.sites import parse_site

log = logging.getLogger(__name__)

DELTAS_TENSOR_FILE = "deltas.safetensors"
META_FILE = "deltas.json"


@dataclass
class Deltas:
    """Delta vectors of a set of users at a set of sites (float32)."""

    user_ids: list[str]
    """Users, in the order of the first axis."""
    sites: list[str]
    """Canonical site names, in the order of the second axis."""
    enhanced: Float[Tensor, "users sites d_model"]
    """``[n_users, n_sites, d_model]``: mean(enhanced) - mean(plain) per user."""
    control: Float[Tensor, "users sites d_model"] | None = None
    """``[n_users, n_sites, d_model]``: mean(control) - mean(plain), when cached."""
    mean_plain: Float[Tensor, "users sites d_model"] | None = None
    """``[n_users, n_sites, d_model]``: mean plain hidden state per user."""
    query_delta: Float[Tensor, "queries sites d_model"] | None = None
    """``[n_queries, n_sites, d_model]``: enhanced - plain for each query."""
    query_user_ids: list[str] = field(default_factory=list)
    """Owner of each row of ``query_delta``."""
    query_ids: list[str] = field(default_factory=list)
    """Query id of each row of ``query_delta``."""
    meta: dict = field(default_factory=dict)
    """Provenance: task, positions, model identity, counts."""
    variant_deltas: dict[str, Float[Tensor, "users sites d_model"]] = field(default_factory=dict)
    """Variant name (of ``CONTROL_VARIANTS``) -> ``[n_users, n_sites, d_model]``:
    mean(variant) - mean(plain), for the control variants that were cached for every user."""
    variant_query_deltas: dict[str, Float[Tensor, "queries sites d_model"]] = field(default_factory=dict)
    """Variant name -> ``[n_queries, n_sites, d_model]``: variant - plain per query, rows as in
    ``query_delta``, for the variants cached for every one of those queries."""

    def __post_init__(self) -> None:
        n_users, n_sites = len(self.user_ids), len(self.sites)
        if tuple(self.enhanced.shape[:2]) != (n_users, n_sites):
            raise CacheError(
                f"deltas: enhanced has shape {tuple(self.enhanced.shape)}, expected "
                f"({n_users}, {n_sites}, d_model)"
            )
        if self.query_delta is not None and len(self.query_user_ids) != self.query_delta.shape[0]:
            raise CacheError("deltas: query_user_ids does not match query_delta rows")
        for name, value in self.variant_deltas.items():
            if tuple(value.shape) != tuple(self.enhanced.shape):
                raise CacheError(f"deltas: variant {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.enhanced.shape)}")
        for name, value in self.variant_query_deltas.items():
            if self.query_delta is None or tuple(value.shape) != tuple(self.query_delta.shape):
                raise CacheError(f"deltas: per-query deltas of variant {name!r} do not match query_delta")

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
        for name, value in self.variant_deltas.items():
            tensors[f"variant.{name}"] = value.float().contiguous()
        for name, value in self.variant_query_deltas.items():
            tensors[f"variant_query.{name}"] = value.float().contiguous()
        tmp = directory / f".{DELTAS_TENSOR_FILE}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(directory / DELTAS_TENSOR_FILE)
        meta = {
            "user_ids": self.user_ids,
            "sites": self.sites,
            "query_user_ids": self.query_user_ids,
            "query_ids": self.query_ids,
            "meta": self.meta,
        }
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1) + "\n")
        write_checksums(directory, (DELTAS_TENSOR_FILE, META_FILE))

    @classmethod
    def load(cls, directory: Path) -> Deltas:
        """Read what :meth:`save` wrote; ``CacheError`` when missing or corrupt."""
        directory = Path(directory)
        tpath, mpath = directory / DELTAS_TENSOR_FILE, directory / META_FILE
        if not tpath.is_file() or not mpath.is_file():
            raise CacheError(f"no delta vectors in {directory}: run `perfit-probe cache` first")
        verify_checksums(directory, (DELTAS_TENSOR_FILE, META_FILE), error=CacheError,
                         fix="recompute the deltas with `perfit-probe cache --resume`")
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
            variant_deltas={k.removeprefix("variant."): v for k, v in tensors.items()
                            if k.startswith("variant.")},
            variant_query_deltas={k.removeprefix("variant_query."): v for k, v in tensors.items()
                                  if k.startswith("variant_query.")},
        )


def compute_deltas(cache: ActivationCache, *, sites=None, meta: dict | None = None) -> Deltas:
    """Delta vectors of every user in an activation cache (formulas in the module docstring).

    Streams over the cache's shards (one in memory at a time), accumulating in float64.
    Multi-token position specs are mean-pooled over their valid tokens first. Users without
    both plain and enhanced rows are left out (with a warning); ``control`` (and each of the
    ``CONTROL_VARIANTS`` in ``variant_deltas``) is computed when every kept user has rows of
    it. Per-query deltas cover the queries cached with both the plain and the enhanced
    variant, in the order of their plain prompts in the list that was cached; a control
    variant's per-query deltas are kept when every one of those queries has it.
    """
    names = cache.resolve_sites(sites)
    sums = _DeltaSums(cache.index.sort_values("example"), len(names), cache.d_model)
    for rows, tensors in cache.iter_shards(names):
        stacked = torch.stack([tensors[n] for n in names], dim=1).double()
        sums.add(rows, pool_values(stacked, tensors.get("valid")))
    keep = sums.kept(cache.path)
    means = sums.sums[:, keep] / sums.counts[:, keep].clamp(min=1)[..., None, None].double()
    control = sums.control_deltas(means, keep)
    kept_users = [sums.users[i] for i in keep.tolist()]
    kept = set(kept_users)
    qrows = [i for i, key in enumerate(sums.pairs) if key[0] in kept]
    variant_deltas, variant_query = sums.variant_deltas(means, keep, qrows)
    return Deltas(
        user_ids=kept_users,
        sites=names,
        enhanced=(means[1] - means[0]).float(),
        control=control,
        mean_plain=means[0].float(),
        query_delta=sums.query_sum[qrows].float(),
        query_user_ids=[sums.pairs[i][0] for i in qrows],
        query_ids=[sums.pairs[i][1] for i in qrows],
        meta=_provenance(cache, sums, keep, meta),
        variant_deltas=variant_deltas,
        variant_query_deltas=variant_query,
    )


_VARIANTS = ("plain", "enhanced", "control") + CONTROL_VARIANTS
"""The variants ``compute_deltas`` sums, in the order of ``_DeltaSums.sums``' first axis."""


class _DeltaSums:
    """Running float64 sums of a cache's pooled hidden states: per variant and user (``sums``
    ``[n_variants, n_users, n_sites, d]``, ``counts``), and per query that has both a plain and
    an enhanced prompt (``query_sum``: enhanced minus plain; ``extra_sum``: each cached control
    variant minus plain, ``extra_hits`` counting the variant's rows)."""

    def __init__(self, index: pd.DataFrame, n_sites: int, d_model: int) -> None:
        self.users = list(dict.fromkeys(index["user_id"]))
        self.user_pos = {u: i for i, u in enumerate(self.users)}
        self.sums = torch.zeros(len(_VARIANTS), len(self.users), n_sites, d_model, dtype=torch.float64)
        self.counts = torch.zeros(len(_VARIANTS), len(self.users), dtype=torch.long)
        keyed = index.set_index(["user_id", "query_id"])
        plain_keys = keyed[index["variant"].to_numpy() == "plain"].index
        enh_keys = set(keyed[index["variant"].to_numpy() == "enhanced"].index)
        self.pairs = [key for key in plain_keys if key in enh_keys]
        self.query_pos = {key: i for i, key in enumerate(self.pairs)}
        self.query_sum = torch.zeros(len(self.pairs), n_sites, d_model, dtype=torch.float64)
        present = set(index["variant"])
        self.extra = [v for v in CONTROL_VARIANTS if v in present]
        self.extra_sum = {v: torch.zeros_like(self.query_sum) for v in self.extra}
        self.extra_hits = {v: torch.zeros(len(self.pairs), dtype=torch.long) for v in self.extra}

    def add(self, rows: pd.DataFrame, values: Float64[Tensor, "rows sites d_model"]) -> None:
        """Add one shard: its index ``rows`` and pooled hidden states ``values``."""
        for v, variant in enumerate(_VARIANTS):
            sel = (rows["variant"] == variant).to_numpy(copy=True)
            if not sel.any():
                continue
            picked = values[torch.from_numpy(sel)]
            who = torch.tensor([self.user_pos[u] for u in rows["user_id"][sel]], dtype=torch.long)
            self.sums[v].index_add_(0, who, picked)
            self.counts[v].index_add_(0, who, torch.ones_like(who))
            if variant in ("plain", "enhanced") or variant in self.extra_sum:
                self._add_queries(variant, list(zip(rows["user_id"][sel], rows["query_id"][sel])), picked)

    def _add_queries(self, variant: str, keys: list[tuple[str, str]], picked: torch.Tensor) -> None:
        """Add the rows of one variant (``keys``: their user and query ids) to the per-query sums."""
        hit = [i for i, key in enumerate(keys) if key in self.query_pos]
        if not hit:
            return
        dest = torch.tensor([self.query_pos[keys[i]] for i in hit], dtype=torch.long)
        if variant == "plain":  # subtracted from every per-query difference
            for acc in (self.query_sum, *self.extra_sum.values()):
                acc.index_add_(0, dest, -picked[hit])
        elif variant == "enhanced":
            self.query_sum.index_add_(0, dest, picked[hit])
        else:
            self.extra_sum[variant].index_add_(0, dest, picked[hit])
            self.extra_hits[variant].index_add_(0, dest, torch.ones_like(dest))

    def kept(self, where: Path) -> torch.Tensor:
        """Indices of the users with both plain and enhanced rows (the others are logged);
        ``CacheError`` when there is none."""
        keep = ((self.counts[0] > 0) & (self.counts[1] > 0)).nonzero().flatten()
        if len(keep) == 0:
            raise CacheError(f"no user of {where} has both plain and enhanced prompts cached: "
                             "cache the variants plain and enhanced")
        kept_set = set(keep.tolist())
        dropped = [self.users[i] for i in range(len(self.users)) if i not in kept_set]
        if dropped:
            log.warning("%d users lack plain or enhanced prompts and get no delta: %s", len(dropped), dropped[:5])
        return keep

    def control_deltas(self, means: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """mean(control) - mean(plain) of the kept users, when every one of them has control rows."""
        if bool((self.counts[2, keep] > 0).all()):
            return (means[2] - means[0]).float()
        if bool((self.counts[2] > 0).any()):
            log.warning("control prompts are missing for some users: no control deltas")
        return None

    def variant_deltas(self, means: torch.Tensor, keep: torch.Tensor,
                       qrows: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-user and per-query deltas of each cached control variant that every kept user
        (every kept query, ``qrows``) has."""
        variant_deltas, variant_query = {}, {}
        for v in self.extra:
            vi = _VARIANTS.index(v)
            if bool((self.counts[vi, keep] > 0).all()):
                variant_deltas[v] = (means[vi] - means[0]).float()
            else:
                log.warning("%s prompts are missing for some users: no %s deltas", v, v)
            if qrows and bool((self.extra_hits[v][qrows] > 0).all()):
                variant_query[v] = self.extra_sum[v][qrows].float()
        return variant_deltas, variant_query


def _provenance(cache: ActivationCache, sums: _DeltaSums, keep: torch.Tensor, meta: dict | None) -> dict:
    """``Deltas.meta``: the cache's positions, dtype, model and path, rows per kept user and
    variant, then ``meta``."""
    counts = sums.counts
    info = {"positions": cache.positions, "storage_dtype": cache.config["storage_dtype"],
            "model": cache.model, "cache": str(cache.path),
            "n_plain": counts[0, keep].tolist(), "n_enhanced": counts[1, keep].tolist(),
            "n_control": counts[2, keep].tolist(),
            **{f"n_{v}": counts[_VARIANTS.index(v), keep].tolist() for v in sums.extra}}
    info.update(meta or {})
    return info


def delta_frame(deltas: Deltas) -> pd.DataFrame:
    """Tidy frame, one row per user and site: ``user_id, site, layer, n_queries, delta_norm,
    control_norm, plain_norm`` (L2 norms; ``control_norm`` is NaN without control deltas),
    then ``{variant}_norm`` for each control variant in ``variant_deltas``."""
    n_queries = pd.Series(deltas.query_user_ids, dtype=object).value_counts()
    delta_norm = deltas.enhanced.norm(dim=-1)
    control_norm = deltas.control.norm(dim=-1) if deltas.control is not None else None
    plain_norm = deltas.mean_plain.norm(dim=-1) if deltas.mean_plain is not None else None
    variant_norms = {v: value.norm(dim=-1) for v, value in deltas.variant_deltas.items()}
    rows = []
    for u, user in enumerate(deltas.user_ids):
        for s, site in enumerate(deltas.sites):
            rows.append({
                "user_id": user,
                "site": site,
                "layer": parse_site(site).layer,
                "n_queries": int(n_queries.get(user, 0)),
                "delta_norm": float(delta_norm[u, s]),
                "control_norm": float(control_norm[u, s]) if control_norm is not None else float("nan"),
                "plain_norm": float(plain_norm[u, s]) if plain_norm is not None else float("nan"),
                **{f"{v}_norm": float(norm[u, s]) for v, norm in variant_norms.items()},
            })
    return pd.DataFrame(rows)
