"""On-disk format of an activation cache, and ``ActivationCache``, the way to read one.

A cache directory (``RUN/cache``) holds::

    manifest.json                   format version, config (sites, positions, storage dtype,
                                    model identity, fingerprint of the prompts, shard size),
                                    status, the list of shards (rows, bytes, sha256), and one
                                    record per caching run (what was computed or skipped)
    index.parquet                   one row per cached prompt: row, shard, offset, example,
                                    user_id, query_id, variant, n_tokens
    shards/shard-00000.safetensors  per site a tensor [rows, d_model] (or [rows, k, d_model]
                                    for multi-token position specs, with a ``valid`` mask
                                    [rows, k]), plus ``row`` (global row numbers)
    shards/shard-00000.json         the shard's receipt: rows, bytes, sha256, and the
                                    fingerprint of the config it was computed with

Rows are numbered in computation order (longest prompt first); shard ``i`` holds rows
``[i * shard_rows, (i + 1) * shard_rows)``. A shard is written atomically (temporary file,
then rename) and only then its receipt; a shard counts as stored when its receipt exists and
the file's size and SHA-256 match it. A killed run therefore leaves whole shards or nothing,
and ``--resume`` recomputes exactly the shards that are not stored. On reading, every shard's
size is checked when the cache is opened and its SHA-256 when it is read, so a truncated or
corrupt shard raises ``CacheError`` naming the file. A lost or malformed ``manifest.json``
is rebuilt by ``perfit-probe cache --resume`` with the same options: shards whose receipt
carries the same config fingerprint are kept, the others recomputed.

``index.example`` is the position of the prompt in the list that was cached; reads return
rows in that order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from perfit_probe._io import atomic_write_bytes, atomic_write_text, to_jsonable
from perfit_probe.errors import CacheError
from perfit_probe.sites import Site, parse_site

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
INDEX_COLUMNS = ("row", "shard", "offset", "example", "user_id", "query_id", "variant", "n_tokens")
STORAGE_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def storage_dtype(name: str) -> torch.dtype:
    """``float32``/``bf16``/``fp16``/... to a torch dtype; ``CacheError`` for anything else."""
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise CacheError(f"unknown storage dtype {name!r}: choose from {sorted(STORAGE_DTYPES)}") from None


def shard_name(shard: int) -> str:
    """File stem of shard number ``shard``."""
    return f"shard-{shard:05d}"


def shard_path(cache_dir: Path, shard: int) -> Path:
    """Path of a shard's safetensors file."""
    return Path(cache_dir) / SHARD_DIR / f"{shard_name(shard)}.safetensors"


def receipt_path(cache_dir: Path, shard: int) -> Path:
    """Path of a shard's receipt (written after the shard)."""
    return Path(cache_dir) / SHARD_DIR / f"{shard_name(shard)}.json"


def config_fingerprint(config: dict) -> str:
    """SHA-256 prefix of a cache config (sites, positions, model, prompts, ...), put in receipts."""
    return hashlib.sha256(json.dumps(to_jsonable(config), sort_keys=True).encode()).hexdigest()[:16]


def write_shard(cache_dir: Path, shard: int, tensors: dict[str, torch.Tensor], config_sha: str | None = None) -> dict:
    """Atomically write one shard, then its receipt; return the receipt."""
    data = st_save({k: v.contiguous() for k, v in tensors.items()})
    receipt = {
        "shard": shard,
        "file": f"{SHARD_DIR}/{shard_name(shard)}.safetensors",
        "rows": int(tensors["row"].shape[0]),
        "first_row": int(tensors["row"][0]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "config_sha": config_sha,
    }
    atomic_write_bytes(shard_path(cache_dir, shard), data)
    atomic_write_text(receipt_path(cache_dir, shard), json.dumps(receipt) + "\n")
    return receipt


def read_receipt(cache_dir: Path, shard: int) -> dict | None:
    """A shard's receipt, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(receipt_path(cache_dir, shard).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def shard_is_stored(cache_dir: Path, shard: int, rows: int, first_row: int,
                    config_sha: str | None = None) -> dict | None:
    """The receipt when shard ``shard`` is complete and intact (size and SHA-256), else ``None``.

    ``config_sha``: also require the receipt to record that config fingerprint (used when the
    manifest, which otherwise vouches for the config, is being rebuilt).
    """
    receipt = read_receipt(cache_dir, shard)
    path = shard_path(cache_dir, shard)
    if receipt is None or not path.is_file():
        return None
    if config_sha is not None and receipt.get("config_sha") != config_sha:
        return None
    if receipt.get("rows") != rows or receipt.get("first_row") != first_row:
        return None
    if path.stat().st_size != receipt.get("bytes"):
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() != receipt.get("sha256"):
        return None
    return receipt


def remove_stale_temporaries(cache_dir: Path, shard: int) -> None:
    """Delete temporary files a killed writer of ``shard`` left behind."""
    for tmp in (Path(cache_dir) / SHARD_DIR).glob(f".{shard_name(shard)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def load_shard(path: Path, receipt: dict) -> dict[str, torch.Tensor]:
    """Read and verify one shard; ``CacheError`` naming the file when it is truncated or corrupt."""
    how = "delete it and rerun `perfit-probe cache` with --resume to recompute it"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheError(f"cache shard {path} is missing: {how}") from None
    if len(data) != receipt["bytes"]:
        raise CacheError(
            f"cache shard {path} is truncated or corrupt ({len(data)} bytes, expected "
            f"{receipt['bytes']}): {how}"
        )
    if hashlib.sha256(data).hexdigest() != receipt["sha256"]:
        raise CacheError(f"cache shard {path} is corrupt (SHA-256 mismatch): {how}")
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises several types on corrupt files
        raise CacheError(f"cache shard {path} cannot be parsed ({exc}): {how}".splitlines()[0]) from None


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    """Atomically write ``manifest.json``."""
    atomic_write_text(Path(cache_dir) / MANIFEST_FILE, json.dumps(to_jsonable(manifest), indent=1) + "\n")


def read_manifest(cache_dir: Path) -> dict | None:
    """``manifest.json`` of a cache directory, ``None`` when absent; ``CacheError`` when unreadable."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is malformed ({exc.msg}): rerun the same `perfit-probe cache` command "
                         "with --resume to rebuild it (intact shards are kept)") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} is malformed (not a JSON object): rerun the same `perfit-probe cache` "
                         "command with --resume to rebuild it (intact shards are kept)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path} has format version {manifest.get('format_version')}, this perfit-probe "
            f"reads version {FORMAT_VERSION}: recompute the cache"
        )
    return manifest


def write_index(cache_dir: Path, index: pd.DataFrame) -> None:
    """Atomically write ``index.parquet``."""
    atomic_write_bytes(Path(cache_dir) / INDEX_FILE, index.to_parquet(index=False))


@dataclass(frozen=True)
class CachedRows:
    """Activations of a selection of cached prompts, in the order the prompts were cached."""

    rows: pd.DataFrame
    """Index rows: ``example, user_id, query_id, variant, n_tokens, row, shard, offset``."""
    sites: list[str]
    """Canonical site names, in the order of the second axis of ``values``."""
    values: Float[Tensor, "rows sites d_model"] | Float[Tensor, "rows sites k d_model"]
    """``[n_rows, n_sites, d_model]`` (or ``[n_rows, n_sites, k, d_model]`` for multi-token specs)."""
    valid: Bool[Tensor, "rows k"] | None = None
    """``[n_rows, k]`` bool, which of the ``k`` token slots are real (multi-token specs only)."""

    def site(self, site: str | int | Site) -> Float[Tensor, "rows d_model"] | Float[Tensor, "rows k d_model"]:
        """Values at one site (canonical name, layer index or ``Site``)."""
        name = parse_site(site).name
        if name not in self.sites:
            raise CacheError(f"site {name!r} is not in this selection (have {self.sites})")
        return self.values[:, self.sites.index(name)]

    def pooled(self) -> Float[Tensor, "rows sites d_model"]:
        """``[n_rows, n_sites, d_model]``: multi-token values mean-pooled over valid slots."""
        return pool_values(self.values, self.valid)


def pool_values(values: Float[Tensor, "rows sites d_model"] | Float[Tensor, "rows sites k d_model"],
                valid: Bool[Tensor, "rows k"] | None) -> Float[Tensor, "rows sites d_model"]:
    """Mean over the valid token slots of ``[n, s, k, d]`` values; ``[n, s, d]`` passes through."""
    if valid is None:
        return values
    weights = valid.to(values.dtype)[:, None, :, None]
    return (values * weights).sum(2) / weights.sum(2).clamp(min=1)


class ActivationCache:
    """A complete activation cache on disk; read it whole, by selection, or shard by shard.

    >>> cache = ActivationCache.open("runs/x")               # a run dir or its cache/ dir
    >>> sel = cache.select(users=["42"], sites=[3, 6], variants=["plain", "enhanced"])
    >>> sel.rows.head(), sel.values.shape                     # [rows, 2, d_model]
    """

    def __init__(self, path: Path, manifest: dict, index: pd.DataFrame) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.index = index

    @classmethod
    def open(cls, path: Path | str) -> ActivationCache:
        """Open the cache in ``path`` (a cache directory, or a run directory holding ``cache/``)."""
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file() and (path / "cache" / MANIFEST_FILE).is_file():
            path = path / "cache"
        manifest = read_manifest(path)
        if manifest is None:
            raise CacheError(f"no activation cache in {path}: run `perfit-probe cache` first")
        if manifest.get("status") != "complete":
            raise CacheError(
                f"activation cache in {path} is incomplete (a run stopped before the end): "
                "rerun `perfit-probe cache` with --resume"
            )
        try:
            index = pd.read_parquet(path / INDEX_FILE)
        except Exception as exc:
            raise CacheError(f"cannot read {path / INDEX_FILE} ({type(exc).__name__}): recompute the cache") from None
        if len(index) != manifest["config"]["n_rows"] or list(index.columns) != list(INDEX_COLUMNS):
            raise CacheError(f"{path / INDEX_FILE} does not match manifest.json: recompute the cache")
        for receipt in manifest["shards"]:
            file = path / receipt["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != receipt["bytes"]:
                state = "missing" if size is None else f"truncated or corrupt ({size} bytes, expected {receipt['bytes']})"
                raise CacheError(
                    f"cache shard {file} is {state}: delete it and rerun `perfit-probe cache` with --resume"
                )
        return cls(path, manifest, index)

    # -- description -------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """The configuration the cache was made with (see the module docstring)."""
        return self.manifest["config"]

    @property
    def sites(self) -> list[str]:
        """Canonical names of the cached sites."""
        return list(self.config["sites"])

    @property
    def positions(self) -> str:
        """The position spec the rows were read at."""
        return self.config["positions"]

    @property
    def model(self) -> dict:
        """Identity of the model that produced the cache."""
        return self.config["model"]

    @property
    def d_model(self) -> int:
        """Width of the cached vectors."""
        return int(self.model["d_model"])

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.path)!r}, rows={len(self)}, sites={len(self.sites)}, "
                f"positions={self.positions!r}, dtype={self.config['storage_dtype']!r})")

    def resolve_sites(self, sites: Iterable[str | int | Site] | None) -> list[str]:
        """Cached site names for ``sites`` (names, layer indices or ``Site``); all when ``None``."""
        if sites is None:
            return self.sites
        if isinstance(sites, (str, int, Site)):
            sites = [sites]
        names = []
        for site in sites:
            name = parse_site(site, self.model.get("n_layers")).name
            if name not in self.sites:
                raise CacheError(f"site {name!r} was not cached (cached: {', '.join(self.sites)})")
            names.append(name)
        return names

    # -- reading -----------------------------------------------------------------------------

    def read_shard(self, shard: int) -> dict[str, torch.Tensor]:
        """All tensors of one shard, verified against its receipt."""
        receipt = self.manifest["shards"][shard]
        return load_shard(self.path / receipt["file"], receipt)

    def iter_shards(
        self, sites: Sequence[str | int | Site] | None = None
    ) -> Iterator[tuple[pd.DataFrame, dict[str, torch.Tensor]]]:
        """Stream the cache: per shard, its index rows and its tensors (``row``, sites, ``valid``).

        Only one shard is in memory at a time.
        """
        names = self.resolve_sites(sites)
        for shard, rows in self.index.groupby("shard", sort=True):
            tensors = self.read_shard(int(shard))
            rows = rows.sort_values("offset")
            if not torch.equal(tensors["row"], torch.as_tensor(rows["row"].to_numpy(copy=True))):
                raise CacheError(f"shard {shard} of {self.path} does not match the index: recompute the cache")
            out = {name: tensors[name] for name in names}
            if "valid" in tensors:
                out["valid"] = tensors["valid"].bool()
            yield rows.reset_index(drop=True), out

    def select(
        self,
        *,
        users: Iterable[str] | None = None,
        variants: Iterable[str] | None = None,
        queries: Iterable[str] | None = None,
        sites: Iterable[str | int | Site] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> CachedRows:
        """Rows matching every given filter (``None`` keeps all), in the order they were cached.

        Reads only the shards that hold selected rows.
        """
        names = self.resolve_sites(sites)
        keep = pd.Series(True, index=self.index.index)
        for column, wanted in (("user_id", users), ("variant", variants), ("query_id", queries)):
            if wanted is not None:
                wanted = [wanted] if isinstance(wanted, str) else [str(w) for w in wanted]
                keep &= self.index[column].isin(wanted)
        rows = self.index[keep].sort_values("example").reset_index(drop=True)
        multi = self.config["n_slots"] > 1
        shape = (len(rows), len(names)) + ((self.config["n_slots"],) if multi else ()) + (self.d_model,)
        values = torch.zeros(shape, dtype=dtype)
        valid = torch.zeros(len(rows), self.config["n_slots"], dtype=torch.bool) if multi else None
        for shard, part in rows.groupby("shard"):
            tensors = self.read_shard(int(shard))
            dest = torch.as_tensor(part.index.to_numpy(copy=True))
            src = torch.as_tensor(part["offset"].to_numpy(copy=True))
            for j, name in enumerate(names):
                values[dest, j] = tensors[name][src].to(dtype)
            if valid is not None:
                valid[dest] = tensors["valid"][src].bool()
        return CachedRows(rows=rows, sites=names, values=values, valid=valid)
