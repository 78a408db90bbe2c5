"""Activation cache: values versus a direct forward, early stop, resume, integrity, selection."""

from __future__ import annotations

import json

import pytest
import torch

from perfit_probe.backends.hooks import HookBackend
from perfit_probe.cache import cache_activations, load_examples_jsonl, plan_rows
from perfit_probe.cache_store import ActivationCache, shard_path
from perfit_probe.errors import CacheError, ConfigError
from perfit_probe.sites import decoder_layers, parse_positions
from perfit_probe_tests.oracles import direct_hidden
from perfit_probe_tests.prompts import make_examples
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_row(hidden: torch.Tensor, positions: str) -> torch.Tensor:
    """What a cache row should hold for one prompt, from its unpadded hidden states ``[seq, d]``."""
    spec = parse_positions(positions)
    picked = hidden[spec.offsets(hidden.shape[0])]
    if positions == "last":
        return picked[0]
    if positions == "mean":
        return picked.mean(0)
    full = torch.zeros(spec.first + spec.last, hidden.shape[1])
    full[: len(picked)] = picked
    return full


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_cached_values_equal_direct_forward(tmp_path, arch, padding_side):
    loaded = tiny_model(arch)
    examples = make_examples(2, 3)
    hidden = [direct_hidden(loaded, ex.prompt) for ex in examples]
    for positions in ("last", "mean", "f2+l3"):
        cache = cache_activations(loaded, examples, tmp_path / positions, sites=[0, 2], positions=positions,
                                  batch_size=4, padding_side=padding_side, shard_rows=5, progress=False)
        assert len(cache) == len(examples) and cache.n_shards == 4
        sel = cache.select()
        assert sel.rows["example"].tolist() == list(range(len(examples)))
        assert len(set(sel.rows["n_tokens"])) > 5  # mixed prompt lengths share batches
        for i in range(len(examples)):
            for j, layer in enumerate((0, 2)):
                want = expected_row(hidden[i][layer + 1], positions)
                torch.testing.assert_close(sel.values[i, j], want, atol=1e-5, rtol=0)
            if sel.valid is not None:
                n = int(sel.rows["n_tokens"][i])
                assert sel.valid[i].sum() == len(parse_positions(positions).offsets(n))


def test_early_stop_same_as_full_pass_and_skips_later_layers():
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    tok.padding_side = "left"
    batch = tok([ex.prompt for ex in make_examples(1, 3)], padding=True, return_tensors="pt")
    ran = []
    handles = [decoder_layers(loaded.model)[3].register_forward_hook(lambda *a: ran.append("block3")),
               loaded.model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))]
    try:
        early = HookBackend(loaded, early_stop=True).run(batch["input_ids"], batch["attention_mask"], [0, 2])
        assert ran == []
        full = HookBackend(loaded, early_stop=False).run(batch["input_ids"], batch["attention_mask"], [0, 2])
        assert ran == ["block3", "lm_head"]
    finally:
        for h in handles:
            h.remove()
    for site in early:
        torch.testing.assert_close(early[site], full[site], atol=0, rtol=0)


def test_storage_dtype_is_a_cast_of_fp32(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(2, 2)
    full = cache_activations(loaded, examples, tmp_path / "f", sites=[1], progress=False).select()
    half = cache_activations(loaded, examples, tmp_path / "h", sites=[1], storage_dtype="bf16",
                             progress=False).select(dtype=torch.bfloat16)
    assert half.values.dtype == torch.bfloat16
    torch.testing.assert_close(half.values, full.values.to(torch.bfloat16), atol=0, rtol=0)


def test_rows_sorted_longest_first_and_sharded():
    examples = make_examples(2, 2)
    lengths = [len(ex.prompt.split()) for ex in examples]
    index = plan_rows(examples, lengths, 4)
    assert index["n_tokens"].is_monotonic_decreasing
    assert sorted(index["example"]) == list(range(len(examples)))
    assert (index["shard"] == index["row"] // 4).all() and (index["offset"] == index["row"] % 4).all()


class KilledBackend(HookBackend):
    """The hooks backend, which dies (like a killed process) at its ``die_at``-th batch."""

    def __init__(self, loaded, die_at: int | None = None) -> None:
        super().__init__(loaded)
        self.calls, self.die_at = 0, die_at

    def run(self, input_ids, attention_mask, sites):
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        self.calls += 1
        return super().run(input_ids, attention_mask, sites)


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(3, 3)  # 27 rows, shards of 6 -> 5 shards, batches of 3 -> 2 per shard
    kw = dict(sites=[1, 3], batch_size=3, shard_rows=6, progress=False)
    reference = cache_activations(loaded, examples, tmp_path / "ref", **kw)
    killed = KilledBackend(loaded, die_at=5)  # dies in the middle of the third shard
    with pytest.raises(KeyboardInterrupt):
        cache_activations(loaded, examples, tmp_path / "run", backend=killed, **kw)
    (tmp_path / "run" / "shards" / ".shard-00002.safetensors.half.tmp").write_bytes(b"partial")
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache.open(tmp_path / "run")
    with pytest.raises(CacheError, match="--resume"):
        cache_activations(loaded, examples, tmp_path / "run", **kw)
    again = KilledBackend(loaded)
    resumed = cache_activations(loaded, examples, tmp_path / "run", backend=again, resume=True, **kw)
    assert again.calls == 9 - 4  # 9 batches in all; two shards (4 batches) were stored
    run = resumed.manifest["runs"][-1]
    assert (run["computed_shards"], run["skipped_shards"]) == (3, 2)
    assert _files(tmp_path / "ref") == _files(tmp_path / "run")
    assert resumed.manifest["shards"] == reference.manifest["shards"]
    torch.testing.assert_close(resumed.select().values, reference.select().values, atol=0, rtol=0)


def test_resume_refuses_a_different_config(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(2, 2)
    cache_activations(loaded, examples, tmp_path / "c", sites=[1], progress=False)
    with pytest.raises(CacheError, match="different sites"):
        cache_activations(loaded, examples, tmp_path / "c", sites=[2], resume=True, progress=False)
    with pytest.raises(CacheError, match="examples_fingerprint"):
        cache_activations(loaded, examples[:-1], tmp_path / "c", sites=[1], resume=True, progress=False)
    with pytest.raises(CacheError, match="different model"):
        cache_activations(tiny_model("llama", seed=1), examples, tmp_path / "c", sites=[1], resume=True,
                          progress=False)
    done = cache_activations(loaded, examples, tmp_path / "c", sites=[1], resume=True, progress=False)
    assert done.manifest["runs"][-1]["computed_rows"] == 0


def test_truncated_or_corrupt_shard_is_refused_and_resume_repairs_it(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(2, 2)
    kw = dict(sites=[1], shard_rows=4, progress=False)
    cache = cache_activations(loaded, examples, tmp_path / "c", **kw)
    values = cache.select().values
    path = shard_path(tmp_path / "c", 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is truncated"):
        ActivationCache.open(tmp_path / "c")
    corrupt = bytearray(data)
    corrupt[-3] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    opened = ActivationCache.open(tmp_path / "c")  # same size: caught when the shard is read
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is corrupt"):
        opened.select()
    repaired = cache_activations(loaded, examples, tmp_path / "c", resume=True, **kw)
    assert repaired.manifest["runs"][-1]["computed_shards"] == 1
    torch.testing.assert_close(repaired.select().values, values, atol=0, rtol=0)


def test_select_by_user_variant_query_and_site(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(3, 2)
    cache = cache_activations(loaded, examples, tmp_path / "c", sites=[0, 1, 2], shard_rows=4, progress=False)
    sel = cache.select(users=["u1"], variants=["enhanced"], sites=[2, "blocks.0.hook_resid_post"])
    assert sel.sites == ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"]
    assert sel.rows["user_id"].eq("u1").all() and sel.rows["variant"].eq("enhanced").all()
    assert sel.rows["query_id"].tolist() == ["q0", "q1"]
    for i, qid in enumerate(["q0", "q1"]):
        ex = next(e for e in examples if (e.user_id, e.query_id, e.variant) == ("u1", qid, "enhanced"))
        hidden = direct_hidden(loaded, ex.prompt)
        torch.testing.assert_close(sel.site(2)[i], hidden[3][-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(sel.site(0)[i], hidden[1][-1], atol=1e-5, rtol=0)
    assert len(cache.select(queries="q0").rows) == 9
    with pytest.raises(CacheError, match="was not cached"):
        cache.select(sites=[3])
    streamed = torch.cat([t["blocks.1.hook_resid_post"] for _, t in cache.iter_shards([1])])
    by_row = cache.select(sites=[1]).values[:, 0][torch.as_tensor(cache.select().rows["row"].argsort().to_numpy(copy=True))]
    torch.testing.assert_close(streamed, by_row, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_other_backends_give_the_same_cache(tmp_path, backend):
    loaded = tiny_model("llama")
    examples = make_examples(1, 2)
    ref = cache_activations(loaded, examples, tmp_path / "hooks", sites=[0, 2], batch_size=3, progress=False)
    other = cache_activations(loaded, examples, tmp_path / backend, sites=[0, 2], batch_size=3,
                              backend=backend, progress=False)
    assert other.manifest["runs"][-1]["backend"] == backend
    torch.testing.assert_close(other.select().values, ref.select().values, atol=1e-5, rtol=0)


def test_bad_arguments_are_refused(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(1, 1)
    with pytest.raises(ConfigError, match="'all'"):
        cache_activations(loaded, examples, tmp_path / "a", sites=[0], positions="all")
    with pytest.raises(CacheError, match="storage dtype"):
        cache_activations(loaded, examples, tmp_path / "b", sites=[0], storage_dtype="int8")
    from perfit_probe.errors import DataError
    with pytest.raises(DataError, match="duplicate"):
        cache_activations(loaded, examples + examples[:1], tmp_path / "c", sites=[0])
    with pytest.raises(ConfigError, match="torch.distributed"):
        cache_activations(loaded, examples, tmp_path / "d", sites=[0], rank=0, world_size=2)


def test_examples_jsonl_round_trip(tmp_path):
    examples = make_examples(1, 2)
    path = tmp_path / "ex.jsonl"
    path.write_text("".join(json.dumps({"user_id": e.user_id, "query_id": e.query_id, "variant": e.variant,
                                        "prompt": e.prompt}) + "\n" for e in examples))
    assert load_examples_jsonl(path) == examples
    path.write_text('{"user_id": 1}\n')
    from perfit_probe.errors import DataError
    with pytest.raises(DataError, match="line 1"):
        load_examples_jsonl(path)
