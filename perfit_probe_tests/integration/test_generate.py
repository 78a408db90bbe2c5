"""Batched generation and label scoring with per-row user interventions."""

from __future__ import annotations

import pytest
import torch

from perfit_probe.errors import ConfigError
from perfit_probe.interventions.artifact import PerFit
from perfit_probe.interventions.batching import collate, encode
from perfit_probe.interventions.generate import generate, score_labels
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.tiny import tiny_model

D = 32
PROMPTS = ["The user rated the movie", "alpha beta", "Predict the rating from 1 to 5 that this user",
           "History of the user: Toy Story (1995) rated 4;", "gamma"]
USERS = ["a", "b", "c", "a", "b"]


def _fit(loaded, kind="loreft", stacking="sum", seed=0):
    spec = BankSpec(kind, (Site(1), Site(2)), parse_positions("f1+l2"), 4, D)
    coll = InterventionBank.initialised(spec, ["collective"], "random", seed=seed)
    pers = InterventionBank.initialised(spec, ["a", "b", "c"], "random", seed=seed + 1)
    with torch.no_grad():  # make the edits strong enough to change greedy outputs
        for bank in (coll, pers):
            for holder in bank.site_params:
                holder.b.mul_(40)
    return PerFit(coll, pers, stacking, loaded.identity.to_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_mixed_users_equal_one_by_one(arch):
    loaded = tiny_model(arch)
    fit = _fit(loaded, stacking="compose")
    scales = [1.0, 0.5, 2.0, 1.0, 0.0]
    batched = generate(loaded, PROMPTS, perfit=fit, user_ids=USERS, scale=scales, max_new_tokens=6, batch_size=8)
    single = [generate(loaded, [p], perfit=fit, user_ids=[u], scale=s, max_new_tokens=6)[0]
              for p, u, s in zip(PROMPTS, USERS, scales)]
    assert batched == single
    # the users' edits matter: some prompt generates differently for another user
    swapped = generate(loaded, PROMPTS, perfit=fit, user_ids=["c"] * 5, max_new_tokens=6)
    plain = generate(loaded, PROMPTS, perfit=fit, stage="none", max_new_tokens=6)
    assert swapped != plain


def test_stage_none_equals_hf_greedy_generate():
    loaded = tiny_model("llama")
    prompt = "The user rated the movie"
    ours = generate(loaded, [prompt], max_new_tokens=5)[0]
    ids = loaded.tokenizer(prompt, return_tensors="pt")
    ref = loaded.model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    text = loaded.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if loaded.tokenizer.eos_token_id in ref[0, ids["input_ids"].shape[1]:].tolist():
        pytest.skip("reference stopped at eos")  # pragma: no cover
    assert ours == text


@pytest.mark.parametrize("labels", [["1", "2", " five stars"], ["1", "2", "3"]])
def test_score_labels_matches_direct_logprob(labels):
    """Multi-token labels (one row per label) and single-token labels (one row per prompt)."""
    loaded = tiny_model("gpt2")
    fit = _fit(loaded)
    got = score_labels(loaded, PROMPTS[:3], labels, perfit=fit, user_ids=USERS[:3], scale=[1.0, 2.0, 0.5], batch_size=2)
    assert got.shape == (3, 3)
    for i in range(3):
        for j, lab in enumerate(labels):
            enc = encode(loaded.tokenizer, PROMPTS[i], lab)
            batch = collate([enc], 0)
            iv = fit.intervention("perfit")
            with iv.attached(loaded.model), torch.no_grad():
                iv.set_batch(batch.prompt_mask, fit.personal.slot_indices([USERS[i]]), [1.0, 2.0, 0.5][i])
                logits = loaded.model(**batch.inputs()).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            expected = sum(logp[t - 1, enc.ids[t]] for t in range(enc.n_prompt, len(enc.ids)))
            assert torch.allclose(got[i, j], expected, atol=1e-4)


def test_scale_zero_equals_collective_and_ablation_removes_personal_edit():
    loaded = tiny_model("llama")
    fit = _fit(loaded, kind="lobireft", stacking="sum")
    labels = ["1", "2", "3"]
    collective = score_labels(loaded, PROMPTS, labels, perfit=fit, user_ids=USERS, stage="collective")
    zero = score_labels(loaded, PROMPTS, labels, perfit=fit, user_ids=USERS, scale=0.0)
    assert torch.allclose(collective, zero, atol=1e-5)
    full = score_labels(loaded, PROMPTS, labels, perfit=fit, user_ids=USERS)
    assert not torch.allclose(full, collective, atol=1e-3)
    # a lobireft edit lies in the span of R's rows: ablating user a's rows at both sites from
    # the edit (collective switched off) gives back the base model
    with torch.no_grad():
        for holder in fit.collective.site_params:
            holder.b.zero_()
    slot = fit.personal.slot("a")
    basis = torch.cat([fit.personal.rotation(s)[slot] for s in range(2)])
    ablated = score_labels(loaded, PROMPTS[:2], labels, perfit=fit, user_ids=["a", "a"], ablate_basis=basis,
                           ablate_mode="edit")
    base = score_labels(loaded, PROMPTS[:2], labels)
    edited = score_labels(loaded, PROMPTS[:2], labels, perfit=fit, user_ids=["a", "a"])
    assert torch.allclose(ablated, base, atol=1e-4)
    assert not torch.allclose(edited, base, atol=1e-3)


def test_unknown_user_and_bad_lengths_fail():
    loaded = tiny_model("llama")
    fit = _fit(loaded)
    with pytest.raises(ConfigError, match="no intervention for user"):
        generate(loaded, PROMPTS[:1], perfit=fit, user_ids=["zz"])
    with pytest.raises(ConfigError, match="user_ids"):
        generate(loaded, PROMPTS[:2], perfit=fit, user_ids=["a"])
    with pytest.raises(ConfigError, match="user id"):
        generate(loaded, PROMPTS[:1], perfit=fit)


def test_continuation_logprobs_equal_full_logits_oracle():
    from perfit_probe.interventions.batching import continuation_logprobs, token_logprobs

    loaded = tiny_model("llama")
    encoded = [encode(loaded.tokenizer, p, t, eos=True) for p, t in zip(PROMPTS, ["4", " five stars", "2", "x", "3 3"])]
    batch = collate(encoded, 0)
    with torch.no_grad():
        ours, mask = continuation_logprobs(loaded.model, batch)
        full, full_mask = token_logprobs(loaded.model(**batch.inputs()).logits, batch.labels)
    assert torch.equal(mask, full_mask)
    assert torch.allclose(ours, full, atol=1e-5)
