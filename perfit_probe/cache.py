"""Cache hidden states of many prompts to disk, resumably, in one or several processes.

``cache_activations`` runs a model backend over a list of ``Example`` prompts and stores the
hidden states at the requested sites and positions in the sharded format of
``perfit_probe.cache_store`` (read it back with ``ActivationCache``). ``build_task_examples``
builds a task's prompts; the ``perfit-probe cache`` stage (``perfit_probe.stages.cache``) caches
them, computes the delta vectors and records everything in a run directory.

How it is fast and bounded:

- prompts are sorted by token length (longest first, ties by input order) and batched
  with dynamic padding, so little padding is computed; left and right padding give the same
  values (positions are read through the attention mask, position ids ignore padding);
- every forward pass runs under ``torch.inference_mode`` and, with the default ``hooks``
  backend, stops after the deepest requested block: later blocks and the LM head are never
  computed;
- only the selected positions are kept (last token by default), and only one shard of rows
  is held in memory before it is written.

Position specs: ``last`` and ``mean`` store one vector per row (``[rows, d_model]``);
``f{p}+l{s}`` specs store ``k = p + s`` token slots per row (``[rows, k, d_model]``, the
tokens ``sites.gather_positions`` selects, in prompt order, zero-filled, with a ``valid`` mask
for short prompts). ``all`` is refused (rows would have unbounded size): use ``mean``.

Several processes (``torchrun``): the caller passes ``rank`` and ``world_size`` and has
initialised ``torch.distributed`` (gloo on CPU, nccl on GPUs). Shards are dealt round-robin
(shard ``i`` to rank ``i % world_size``), each rank writes its own shard files, and rank 0
writes the manifest once all ranks are done. The result is the same cache, file for file,
as a one-process run, and a run may be resumed with a different number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from perfit_probe import cache_store as store
from perfit_probe.backends import ActivationBackend, get_backend
from perfit_probe.cache_store import ActivationCache
from perfit_probe.config import CacheConfig, query_cap
from perfit_probe.data import load_task
from perfit_probe.data.prompts import build_examples
from perfit_probe.data.records import Example, User
from perfit_probe.data.splits import stable_rank
from perfit_probe.errors import CacheError, ConfigError, DataError
from perfit_probe.sites import PositionSpec, Site, batch_positions, gather_positions, parse_positions, parse_sites

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Planning


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 prefix over the ``(user_id, query_id, variant, prompt)`` of every example, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.user_id, ex.query_id, ex.variant, ex.prompt]).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def token_lengths(tokenizer, prompts: Sequence[str], chunk: int = 1024) -> list[int]:
    """Number of tokens of each prompt, as the batches will tokenize it."""
    out: list[int] = []
    for start in range(0, len(prompts), chunk):
        enc = tokenizer(list(prompts[start:start + chunk]), padding=False, return_attention_mask=False)
        out.extend(len(ids) for ids in enc["input_ids"])
    return out


def plan_rows(examples: Sequence[Example], lengths: Sequence[int], shard_rows: int) -> pd.DataFrame:
    """The row index: examples sorted longest first (ties in input order), cut into shards."""
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    rows = range(len(order))
    return pd.DataFrame({
        "row": list(rows),
        "shard": [r // shard_rows for r in rows],
        "offset": [r % shard_rows for r in rows],
        "example": order,
        "user_id": [str(examples[i].user_id) for i in order],
        "query_id": [str(examples[i].query_id) for i in order],
        "variant": [examples[i].variant for i in order],
        "n_tokens": [int(lengths[i]) for i in order],
    }, columns=list(store.INDEX_COLUMNS))


def check_examples(examples: Sequence[Example]) -> None:
    """``DataError`` when ``examples`` is empty, repeats a (user, query, variant) or has an empty prompt."""
    if not examples:
        raise DataError("no examples to cache: the task gave no (user, query, variant) prompt")
    seen: set[tuple[str, str, str]] = set()
    for ex in examples:
        key = (str(ex.user_id), str(ex.query_id), ex.variant)
        if key in seen:
            raise DataError(f"duplicate example user={key[0]!r} query={key[1]!r} variant={key[2]!r}: "
                            "each (user, query, variant) may be cached once")
        if not ex.prompt:
            raise DataError(f"empty prompt for user={key[0]!r} query={key[1]!r} variant={key[2]!r}")
        seen.add(key)


# ----------------------------------------------------------------------------------------
# Distributed helpers (no-ops in one process)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _sum_across_ranks(values: list[int], world_size: int) -> list[int]:
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.long)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------
# Caching


def _read_batch(
    backend: ActivationBackend, tokenizer, prompts: list[str], sites: list[Site], spec,
    n_slots: int, padding_side: str, device: torch.device, dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Hidden states of one padded batch at ``spec``'s positions, on CPU in ``dtype``."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    with torch.inference_mode():
        hidden = backend.run(ids, mask, sites)
        out = {}
        for site in sites:
            picked = gather_positions(hidden[site], spec, mask)
            if n_slots > 1 and picked.shape[1] < n_slots:  # every prompt of the batch is short
                pad = picked.new_zeros(picked.shape[0], n_slots - picked.shape[1], picked.shape[2])
                picked = torch.cat([picked, pad], dim=1)
            out[site.name] = picked.to("cpu", dtype)
        valid = None
        if n_slots > 1:
            _, valid = batch_positions(spec, mask)
            valid = torch.cat([valid.cpu(), valid.new_zeros(len(prompts), n_slots - valid.shape[1]).cpu()], 1)
    return out, valid


def cache_activations(
    loaded,
    examples: Sequence[Example],
    out_dir: Path | str,
    *,
    sites: Sequence[str | int | Site] | str,
    positions: str = "last",
    storage_dtype: str = "float32",
    batch_size: int = 16,
    padding_side: str = "left",
    shard_rows: int = 1024,
    resume: bool = False,
    backend: str | ActivationBackend = "hooks",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> ActivationCache:
    """Cache the hidden states of ``examples`` at ``sites`` and ``positions`` into ``out_dir``.

    ``backend`` is a backend name (``hooks``, ``transformer_lens``, ``nnsight``) or a built
    backend. With ``resume``, shards already stored (and intact) are kept and only the others
    computed; the sites, positions, storage dtype, shard size, model and prompts must then
    equal those of the stored cache (``CacheError`` otherwise). Under ``torchrun``, pass this
    process's ``rank`` and the ``world_size`` (``torch.distributed`` initialised); every rank
    returns the finished cache. See the module docstring for the format and the speed notes.
    """
    out_dir = Path(out_dir)
    check_examples(examples)
    site_list = parse_sites(sites if isinstance(sites, str) else list(sites), loaded.n_layers)
    check_cache_options(positions, storage_dtype, batch_size, shard_rows, padding_side)
    spec = parse_positions(positions)
    n_slots = 1 if spec.mode == "mean" or (spec.first, spec.last) == (0, 1) else spec.first + spec.last
    dtype = store.storage_dtype(storage_dtype)
    _check_ranks(rank, world_size)
    index = plan_rows(examples, token_lengths(loaded.tokenizer, [ex.prompt for ex in examples]), shard_rows)
    config = _cache_config(loaded, examples, index, site_list, spec, n_slots, dtype, shard_rows)
    manifest, rebuild = _check_existing(out_dir, config, resume)  # every rank checks before anyone writes
    config_sha = store.config_fingerprint(config)
    _barrier(world_size)
    if rank == 0:
        manifest = _start_manifest(out_dir, manifest, config, index)
    _barrier(world_size)
    start = time.perf_counter()
    bounds = index.groupby("shard")["row"].agg(["min", "count"])
    todo, skipped = _shards_to_compute(out_dir, bounds, config_sha if rebuild else None, resume=resume, rank=rank,
                                       world_size=world_size)
    runner = get_backend(backend, loaded) if isinstance(backend, str) else backend
    reader = _BatchReader(runner, loaded.tokenizer, site_list, spec, n_slots, padding_side, loaded.device, dtype)
    n_todo = _compute_shards(out_dir, todo, index, [ex.prompt for ex in examples], reader, config_sha,
                             batch_size=batch_size, progress=progress,
                             desc=f"cache{f' rank {rank}' if world_size > 1 else ''}")
    wall = time.perf_counter() - start
    counts = _sum_across_ranks([len(todo), skipped, n_todo], world_size)
    _barrier(world_size)
    if rank == 0:
        run = _run_record(counts, wall, runner, world_size, batch_size, padding_side)
        _finalize(out_dir, manifest, index, bounds, run)
    _barrier(world_size)
    return ActivationCache.open(out_dir)


def _run_record(counts: list[int], wall: float, runner: ActivationBackend, world_size: int, batch_size: int,
                padding_side: str) -> dict:
    """The manifest's record of one caching run; ``counts``: shards computed and skipped, rows
    computed (summed over ranks)."""
    computed, skipped_all, rows_done = counts
    return {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": world_size,
        "computed_shards": computed, "skipped_shards": skipped_all, "computed_rows": rows_done,
        "wall_s": round(wall, 3), "rows_per_s": round(rows_done / wall, 2) if wall > 0 else None,
        "backend": getattr(runner, "name", type(runner).__name__), "batch_size": batch_size,
        "padding_side": padding_side,
    }


def _check_ranks(rank: int, world_size: int) -> None:
    """``ConfigError`` for a rank outside the world, or several ranks without ``torch.distributed``."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError("world_size > 1 needs torch.distributed initialised (launch with torchrun)")


def _cache_config(loaded, examples: Sequence[Example], index: pd.DataFrame, sites: list[Site], spec: PositionSpec,
                  n_slots: int, dtype: torch.dtype, shard_rows: int) -> dict:
    """The manifest's ``config``: what a resumed cache must match (and what its shards are stamped with)."""
    return {
        "sites": [s.name for s in sites],
        "positions": "last" if spec.text == "l1" else spec.text,
        "n_slots": n_slots,
        "storage_dtype": str(dtype).removeprefix("torch."),
        "shard_rows": shard_rows,
        "n_rows": len(index),
        "n_shards": int(index["shard"].max()) + 1,
        "examples_fingerprint": examples_fingerprint(examples),
        "model": loaded.identity.to_dict(),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
    }


def _start_manifest(out_dir: Path, manifest: dict | None, config: dict, index: pd.DataFrame) -> dict:
    """Write the index and an ``in_progress`` manifest (rank 0, before any shard); returns the manifest."""
    manifest = manifest or {"format_version": store.FORMAT_VERSION, "runs": []}
    manifest.update(config=config, status="in_progress", shards=[])
    (out_dir / store.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    store.write_index(out_dir, index)
    store.write_manifest(out_dir, manifest)
    return manifest


def _shards_to_compute(out_dir: Path, bounds: pd.DataFrame, rebuilt_sha: str | None, *,
                       resume: bool, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's shards (shard ``i`` to rank ``i % world_size``) not already stored intact (all
    of them without ``resume``), and how many were; ``rebuilt_sha``: the config fingerprint a
    shard must carry when the manifest is rebuilt."""
    mine = [s for s in range(len(bounds)) if s % world_size == rank]
    todo = []
    for shard in mine:
        stored = resume and store.shard_is_stored(out_dir, shard, int(bounds.loc[shard, "count"]),
                                                  int(bounds.loc[shard, "min"]), rebuilt_sha)
        if not stored:
            todo.append(shard)
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("rank %d: %d of %d shards already stored, computing %d", rank, skipped, len(mine), len(todo))
    return todo, skipped


@dataclass(frozen=True)
class _BatchReader:
    """What reading a batch of prompts needs (see ``_read_batch``)."""

    backend: ActivationBackend
    """The activation backend."""
    tokenizer: object
    """The model's tokenizer."""
    sites: list[Site]
    """Sites to read."""
    spec: PositionSpec
    """Positions to keep."""
    n_slots: int
    """Token slots per row (1 for ``last`` and ``mean``)."""
    padding_side: str
    """``left`` or ``right``."""
    device: torch.device
    """The model's device."""
    dtype: torch.dtype
    """Storage dtype."""

    def read(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``_read_batch`` of ``prompts``."""
        return _read_batch(self.backend, self.tokenizer, prompts, self.sites, self.spec, self.n_slots,
                           self.padding_side, self.device, self.dtype)


def _compute_shards(out_dir: Path, todo: list[int], index: pd.DataFrame, prompts: list[str], reader: _BatchReader,
                    config_sha: str, *, batch_size: int, progress: bool, desc: str) -> int:
    """Compute and write the shards ``todo`` in batches of ``batch_size``; returns the rows computed."""
    by_shard = {s: part for s, part in index.groupby("shard")}
    n_todo = int(sum(len(by_shard[s]) for s in todo))
    bar = tqdm(total=n_todo, unit="row", desc=desc, disable=not progress, dynamic_ncols=True)
    with bar:
        for shard in todo:
            store.remove_stale_temporaries(out_dir, shard)
            part = by_shard[shard]
            chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in reader.sites}
            valids: list[torch.Tensor] = []
            for b in range(0, len(part), batch_size):
                batch = [prompts[i] for i in part["example"].iloc[b:b + batch_size]]
                values, valid = reader.read(batch)
                for name, value in values.items():
                    chunks[name].append(value)
                if valid is not None:
                    valids.append(valid)
                bar.update(len(batch))
            tensors = {name: torch.cat(parts) for name, parts in chunks.items()}
            tensors["row"] = torch.as_tensor(part["row"].to_numpy(copy=True), dtype=torch.long)
            if valids:
                tensors["valid"] = torch.cat(valids).to(torch.uint8)
            store.write_shard(out_dir, shard, tensors, config_sha)
    return n_todo


def check_cache_options(positions: str, storage_dtype: str, batch_size: int, shard_rows: int,
                        padding_side: str) -> None:
    """``ConfigError``/``SiteError``/``CacheError`` for options ``cache_activations`` cannot use."""
    if parse_positions(positions).mode == "all":
        raise ConfigError("positions 'all' cannot be cached (unbounded row size): use 'mean', 'last' or 'f<p>+l<s>'")
    store.storage_dtype(storage_dtype)
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if batch_size < 1 or shard_rows < 1:
        raise ConfigError(f"batch_size ({batch_size}) and shard_rows ({shard_rows}) must be at least 1")


def _check_existing(out_dir: Path, config: dict, resume: bool) -> tuple[dict | None, bool]:
    """The stored manifest when resuming onto a matching cache, and whether the manifest is
    being rebuilt (resuming over a malformed one); ``CacheError`` on any conflict."""
    try:
        manifest = store.read_manifest(out_dir)
    except CacheError:
        if not resume:
            raise
        log.warning("%s is unreadable: rebuilding it; shards computed with these settings are kept",
                    out_dir / store.MANIFEST_FILE)
        return None, True
    if manifest is None:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise CacheError(f"{out_dir} is not empty and holds no cache manifest: remove it or choose another directory")
        return None, False
    if not resume:
        raise CacheError(f"an activation cache already exists in {out_dir}: pass --resume to continue it, "
                         "or choose another output directory")
    old = manifest.get("config", {})
    differ = [key for key in config if key != "model" and old.get(key) != config[key]]
    if old.get("model", {}).get("fingerprint") != config["model"]["fingerprint"]:
        differ.insert(0, "model")
    if differ:
        raise CacheError(f"cannot resume the cache in {out_dir}: it was made with a different "
                         f"{', '.join(differ)}; use the same settings or another output directory")
    return manifest, False


def _finalize(out_dir: Path, manifest: dict, index: pd.DataFrame, bounds: pd.DataFrame, run: dict) -> None:
    """Collect every shard's receipt into the manifest and mark the cache complete."""
    receipts = []
    for shard in range(len(bounds)):
        receipt = store.read_receipt(out_dir, shard)
        path = store.shard_path(out_dir, shard)
        if (receipt is None or not path.is_file() or path.stat().st_size != receipt["bytes"]
                or receipt["rows"] != int(bounds.loc[shard, "count"])):
            raise CacheError(f"shard {path} was not written by any rank: rerun with --resume")
        receipts.append(receipt)
    manifest["shards"] = receipts
    manifest["status"] = "complete"
    manifest.setdefault("runs", []).append(run)
    store.write_manifest(out_dir, manifest)
    log.info("cached %d rows in %d shards to %s (%s rows computed, %.1f rows/s)", len(index), len(receipts),
             out_dir, run["computed_rows"], run["rows_per_s"] or 0.0)


# ----------------------------------------------------------------------------------------
# Prompts from a file


def load_examples_jsonl(path: Path | str) -> list[Example]:
    """Examples from a JSON-lines file: ``{"user_id", "query_id", "variant", "prompt"[, "target"]}``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"examples file {path} does not exist") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append(Example(user_id=str(rec["user_id"]), query_id=str(rec["query_id"]),
                               variant=str(rec["variant"]), prompt=str(rec["prompt"]),
                               target=None if rec.get("target") is None else str(rec["target"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path} line {n}: expected JSON with user_id, query_id, variant, prompt "
                            f"({type(exc).__name__}: {exc})") from None
    return out


def default_sites(n_layers: int) -> list[int]:
    """A spread of layers: every ``max(1, n_layers // 10)``-th block from 0, plus the last."""
    step = max(1, n_layers // 10)
    return sorted(set(range(0, n_layers, step)) | {n_layers - 1})


# ----------------------------------------------------------------------------------------
# The stage


def build_task_examples(config: CacheConfig, tokenizer) -> tuple[list[Example], dict]:
    """Load the task, choose users and queries, build the prompts; also return a short report."""
    task = load_task(config.task, path=config.task_path, outputs=config.task_outputs,
                     n_users=config.n_users, seed=config.seed)
    cap = query_cap(config.max_queries)
    users = []
    for user in task.users:
        queries = user.queries
        if cap is not None and len(queries) > cap:
            queries = sorted(queries, key=lambda q: stable_rank(f"{user.id}/{q.id}", config.seed))[:cap]
        users.append(User(id=user.id, profile=user.profile, queries=list(queries)))
    examples = build_examples(users, task.spec, tokenizer, variants=tuple(config.variants), k=config.k,
                              retriever=config.retriever, chat=config.chat, seed=config.seed)
    report = {"task": task.spec.name, "n_users": len(users), "n_queries": sum(len(u.queries) for u in users)}
    return examples, report
