"""The OPPU LoRA-per-user baseline on tiny models: cost accounting, learning, clean removal."""

from __future__ import annotations

import pytest
import torch

from perfit_probe.config import LoraBaselineConfig
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.lora import LoraBaseline, encode_supervised, resolve_targets
from perfit_probe_tests.tiny import tiny_model

PROMPTS = ["History of the user: Fargo rated", "Predict the rating of Toy Story:",
           "The user rated the movie Heat", "Answer with a single number:"]
TARGETS = [" 5", " 5", " 5", " 5"]
FAST = LoraBaselineConfig(lr=3e-2, epochs=6, batch_size=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _target_logprob(loaded, prompts, targets):
    rows = encode_supervised(loaded.tokenizer, prompts, targets, 512)
    total = 0.0
    for enc in rows:
        ids, n = list(enc.ids[:-1]), enc.n_prompt  # without the end-of-text token
        with torch.no_grad():
            logp = loaded.model(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
        total += sum(float(logp[i - 1, ids[i]]) for i in range(n, len(ids)))
    return total


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainable_parameters_match_the_lora_formula(arch):
    loaded = tiny_model(arch)
    baseline = LoraBaseline(loaded, FAST)
    adapter = baseline.fit_user("u1", PROMPTS[:2], TARGETS[:2])
    expected = 0
    for name, module in loaded.model.named_modules():
        if name.rsplit(".", 1)[-1] in baseline.targets_:
            w = module.weight
            d_in, d_out = (w.shape[1], w.shape[0]) if isinstance(module, torch.nn.Linear) else w.shape
            expected += FAST.rank * (d_in + d_out)  # A: r x d_in, B: d_out x r
    assert adapter.n_trainable == expected
    assert sum(v.numel() for v in adapter.state.values()) == expected
    assert adapter.train_s > 0 and adapter.n_examples == 2


def test_base_model_is_unchanged_after_training_and_applying():
    loaded = tiny_model("llama")
    before = _snapshot(loaded.model)
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    baseline = LoraBaseline(loaded, FAST)
    adapter = baseline.fit_user("u1", PROMPTS, TARGETS)
    with baseline.applied(adapter) as adapted:
        with torch.no_grad():
            a1 = adapted.model(input_ids=ids).logits
            a2 = adapted.model(input_ids=ids).logits
    assert torch.equal(a1, a2)  # eval mode: no dropout
    assert not torch.allclose(a1, ref)
    after = _snapshot(loaded.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    assert not any(p.requires_grad for p in loaded.model.parameters())
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, ref)


def test_adapter_learns_the_users_answer_and_is_seeded():
    loaded = tiny_model("llama")
    baseline = LoraBaseline(loaded, FAST)
    base_lp = _target_logprob(loaded, PROMPTS, TARGETS)
    adapter = baseline.fit_user("u1", PROMPTS, TARGETS, seed=3)
    assert adapter.losses[-1] < adapter.losses[0]
    with baseline.applied(adapter) as adapted:
        tuned_lp = _target_logprob(adapted, PROMPTS, TARGETS)
    assert tuned_lp > base_lp + 1.0
    again = baseline.fit_user("u1", PROMPTS, TARGETS, seed=3)
    assert all(torch.equal(adapter.state[k], again.state[k]) for k in adapter.state)
    other = baseline.fit_user("u1", PROMPTS, TARGETS, seed=4)
    assert not all(torch.equal(adapter.state[k], other.state[k]) for k in adapter.state)


def test_fit_loops_over_users_and_rejects_bad_input():
    loaded = tiny_model("llama")
    baseline = LoraBaseline(loaded, LoraBaselineConfig(epochs=1))
    out = baseline.fit({"a": (PROMPTS[:1], TARGETS[:1]), "b": (PROMPTS[1:3], TARGETS[1:3])})
    assert list(out) == ["a", "b"] and out["b"].n_examples == 2
    with pytest.raises(ConfigError, match="no history"):
        baseline.fit_user("c", [], [])
    with pytest.raises(ConfigError, match="not modules"):
        resolve_targets(loaded.model, ("nope",))
    assert resolve_targets(tiny_model("gpt2").model) == ["c_attn"]


def test_encode_supervised_masks_prompt_and_truncates_left():
    tok = tiny_model("llama").tokenizer
    rows = encode_supervised(tok, ["alpha beta gamma delta"], [" 4"], max_length=4)
    ids, n_prompt = list(rows[0].ids), rows[0].n_prompt
    target = tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[n_prompt:] == target and len(ids) <= max(4, len(target) + 1)
    full = tok("alpha beta gamma delta")["input_ids"]
    assert ids[:n_prompt] == full[-n_prompt:]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_task_adapter_equals_the_applied_one_and_is_undone_exactly(arch):
    """OPPU's task model: merging an adapter gives the adapted model's outputs; a user adapter
    trained inside sits on the merged weights; on exit the base weights are bit-identical."""
    loaded = tiny_model(arch)
    before = _snapshot(loaded.model)
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    baseline = LoraBaseline(loaded, FAST)
    task = baseline.fit_user("task", PROMPTS, TARGETS, seed=1)
    with baseline.applied(task) as adapted, torch.no_grad():
        applied = adapted.model(input_ids=ids).logits
    with baseline.merged(task) as merged:
        assert not any("lora" in name for name, _ in merged.model.named_modules())
        with torch.no_grad():
            merged_logits = merged.model(input_ids=ids).logits
        user = baseline.fit_user("u1", PROMPTS[:2], [" 1", " 1"], seed=2)
        with baseline.applied(user) as stacked, torch.no_grad():
            on_task = stacked.model(input_ids=ids).logits
    assert not torch.allclose(applied, ref, atol=1e-4)
    assert torch.allclose(merged_logits, applied, atol=1e-5)
    assert not torch.allclose(on_task, merged_logits, atol=1e-4)
    # the same user adapter on the plain base model gives other outputs: it was on the task model
    with baseline.applied(user) as plain, torch.no_grad():
        on_base = plain.model(input_ids=ids).logits
    assert not torch.allclose(on_base, on_task, atol=1e-4)
    after = _snapshot(loaded.model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, ref)
