"""LoReFT banks and their application: maths, positions, hooks, artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from perfit_probe.errors import ArtifactError, ConfigError
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.artifact import PerFit, load_bank, load_perfit, save_bank
from perfit_probe.interventions.batching import collate, encode
from perfit_probe.interventions.modules import BankSpec, InterventionBank, orthonormal_rows
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.reference import pyreft_locations
from perfit_probe_tests.tiny import tiny_model

D = 32


def _spec(kind="loreft", rank=4, sites=(Site(1),), positions="f1+l2", clamp="cover",
          share_weights=True):
    return BankSpec(kind, tuple(sites), parse_positions(positions), rank, D, clamp, share_weights)


def _randomised(bank: InterventionBank, seed: int = 0) -> InterventionBank:
    """Give W and b random values (R keeps its orthonormal init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for holder in bank.site_params:
            if hasattr(holder, "W"):
                holder.W.copy_(torch.randn(holder.W.shape, generator=gen) * 0.5)
            holder.b.copy_(torch.randn(holder.b.shape, generator=gen))
    return bank


def test_orthonormal_rows_and_idempotent():
    a = torch.randn(3, 5, 20)
    r = orthonormal_rows(a)
    eye = torch.eye(5).expand(3, -1, -1)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-5)
    # same row space as a
    proj = r.transpose(1, 2) @ r
    assert torch.allclose(a @ proj, a, atol=1e-4)
    # already orthonormal rows are left unchanged
    assert torch.allclose(orthonormal_rows(r), r, atol=1e-5)


def _gram_schmidt(a: torch.Tensor) -> torch.Tensor:
    """Hand oracle for R: classical Gram-Schmidt on the rows of ``a [r, d]``, in float64."""
    rows = []
    for v in a.double():
        for r in rows:
            v = v - (v @ r) * r
        rows.append(v / v.norm())
    return torch.stack(rows)


def _hand_params(bank: InterventionBank, site: int = 0):
    """Per slot (R by Gram-Schmidt of A, W, b) in float64, read from the raw parameters."""
    holder = bank.site_params[site]
    return [(_gram_schmidt(holder.A[i].detach()), holder.W[i].detach().double(), holder.b[i].detach().double())
            for i in range(bank.n_slots)]


def _hand_edit(params, h: torch.Tensor, slots) -> torch.Tensor:
    """``phi(h) - h = R^T (W h + b - R h)`` row by row (h ``[B, k, d]``, float64)."""
    out = []
    for row, slot in zip(h.double(), [int(x) for x in slots]):
        rot, w, b = params[slot]
        out.append((row @ w.T + b - row @ rot.T) @ rot)
    return torch.stack(out)


def _random_bank(spec, keys, seed):
    """A bank with random A (rows *not* orthonormal), W and b."""
    bank = InterventionBank(spec, keys)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for holder in bank.site_params:
            for param in holder.parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
    return bank


def test_loreft_edit_equals_the_formula_computed_by_hand():
    """phi(h) = h + R^T (W h + b - R h), R the Gram-Schmidt orthonormalisation of A's rows, each
    row of a batch with its own slot: computed here in float64 from the raw parameters."""
    bank = _random_bank(_spec(rank=4), ["a", "b", "c"], seed=1)
    params = _hand_params(bank)
    h = torch.randn(5, 3, D)
    slots = torch.tensor([2, 0, 1, 2, 0])
    expected = h.double() + _hand_edit(params, h, slots)
    torch.testing.assert_close(bank(0, h, slots).double(), expected, atol=1e-4, rtol=1e-5)
    for i, (rot, w, b) in enumerate(params):
        torch.testing.assert_close(bank.rotation(0)[i].double(), rot, atol=1e-5, rtol=0)
        torch.testing.assert_close(rot @ rot.T, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
        # inside R's row space R h is replaced by W h + b; the orthogonal complement is kept
        out = bank(0, h, torch.full((5,), i)).double()
        torch.testing.assert_close(out @ rot.T, h.double() @ w.T + b, atol=1e-4, rtol=1e-5)
        comp = torch.eye(D, dtype=torch.float64) - rot.T @ rot
        torch.testing.assert_close(out @ comp, h.double() @ comp, atol=1e-4, rtol=1e-5)
    # a one-slot bank (the collective one) broadcasts its slot to every row
    single = bank.subset(["b"])
    torch.testing.assert_close(single.edit(0, h, torch.zeros(5, dtype=torch.long)).double(),
                               _hand_edit(params, h, [1] * 5), atol=1e-4, rtol=1e-5)


def test_rotation_stays_orthonormal_through_training_steps():
    bank = _random_bank(_spec(rank=6), ["a", "b"], seed=2)
    opt = torch.optim.AdamW(bank.parameters(), lr=0.5)
    h = torch.randn(4, 2, D)
    for _ in range(3):
        opt.zero_grad()
        bank(0, h, torch.tensor([0, 1, 1, 0])).pow(3).sum().backward()
        opt.step()
        for i in range(2):
            rot = bank.rotation(0)[i].detach().double()
            torch.testing.assert_close(rot @ rot.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
            torch.testing.assert_close(rot, _gram_schmidt(bank.site_params[0].A[i].detach()), atol=1e-5, rtol=0)


def test_variants_formulas():
    h = torch.randn(2, 3, D)
    slots = torch.zeros(2, dtype=torch.long)
    lobi = _randomised(InterventionBank.initialised(_spec("lobireft", rank=3), ["u"], "zero"))
    rot = _gram_schmidt(lobi.site_params[0].A[0].detach())
    torch.testing.assert_close(lobi(0, h, slots).double(), h.double() + lobi.site_params[0].b[0].double() @ rot,
                               atol=1e-5, rtol=1e-5)
    nore = _randomised(InterventionBank.initialised(_spec("noreft", rank=3), ["u"], "zero"))
    with torch.no_grad():
        nore.site_params[0].A.mul_(2.0)  # not orthonormal: noreft must not orthonormalise
    a, w, b = (nore.site_params[0].A[0], nore.site_params[0].W[0], nore.site_params[0].b[0])
    assert torch.allclose(nore(0, h, slots), h + (h @ w.T + b - h @ a.T) @ a, atol=1e-5)
    assert _spec("lobireft", rank=3).params_per_slot() == D * 3 + 3
    assert _spec("loreft", rank=3, sites=(Site(1), Site(2))).params_per_slot() == 2 * (2 * D * 3 + 3)


@pytest.mark.parametrize("positions,share_weights,groups", [
    ("f1+l2", True, ("all",)), ("f1+l2", False, ("first", "last")), ("f3+l5", False, ("first", "last")),
    ("l1", False, ("all",)), ("last", False, ("all",)), ("f4", False, ("all",)), ("mean", False, ("all",)),
])
def test_groups_and_parameter_counts(positions, share_weights, groups):
    """Separate first/last interventions only for f{p}+l{s} without shared weights (pyreft doubles
    its layers only for '+' specs); the parameter count counts every intervention."""
    spec = _spec("loreft", rank=3, sites=(Site(1), Site(2)), positions=positions, share_weights=share_weights)
    assert spec.groups == groups
    per_intervention = 2 * D * 3 + 3
    assert spec.params_per_slot() == per_intervention * 2 * len(groups)
    bank = InterventionBank.initialised(spec, ["a", "b"], "random")
    assert sum(p[0].numel() for p in bank.parameters()) == spec.params_per_slot()
    lobi = _spec("lobireft", rank=3, sites=(Site(1),), positions=positions, share_weights=share_weights)
    assert lobi.params_per_slot() == (D * 3 + 3) * len(groups)


def test_bank_rows_use_their_own_slot():
    bank = _randomised(InterventionBank.initialised(_spec(), ["a", "b", "c"], "zero"))
    h = torch.randn(4, 2, D)
    slots = torch.tensor([2, 0, 1, 2])
    out = bank.edit(0, h, slots)
    for i, s in enumerate(slots.tolist()):
        single = bank.subset([bank.keys[s]])
        assert torch.allclose(out[i], single.edit(0, h[i:i + 1], torch.zeros(1, dtype=torch.long))[0], atol=1e-6)


def _stacking_case(seed=3):
    """Collective (rank 4, one slot) and personal (rank 2, three slots) random banks, inputs."""
    sites = (Site(1),)
    coll = _random_bank(_spec(rank=4, sites=sites, positions="l1"), ["collective"], seed)
    pers = _random_bank(_spec(rank=2, sites=sites, positions="l1"), ["a", "b", "c"], seed + 1)
    with torch.no_grad():  # moderate edits, so that compose differs clearly from sum
        for bank in (coll, pers):
            bank.site_params[0].W.mul_(0.3)
    h = torch.randn(4, 2, D, generator=torch.Generator().manual_seed(seed))
    return coll, pers, h, torch.tensor([1, 0, 2, 1]), torch.tensor([1.0, 0.0, 0.5, 2.0])


def test_stacking_rules_equal_hand_formulas():
    """sum: h + e_c(h) + s e_p(h); compose: h' + s e_p(h') with h' = h + e_c(h); a lone bank:
    h + s e(h); e computed by hand (float64) from the raw parameters."""
    coll, pers, h, slots, scale = _stacking_case()
    pc, pp = _hand_params(coll), _hand_params(pers)
    s = scale.double().view(-1, 1, 1)
    hd = h.double()
    e_c = _hand_edit(pc, h, [0] * 4)
    h1 = hd + e_c
    hand = {
        "sum": e_c + s * _hand_edit(pp, h, slots),
        "compose": e_c + s * _hand_edit(pp, h1, slots),
    }
    for stacking, expected in hand.items():
        iv = Intervention(collective=coll, personal=pers, stacking=stacking)
        torch.testing.assert_close(iv.delta(0, h, slots, scale).double(), expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(hand["sum"], hand["compose"], atol=1e-2)  # the two rules differ here
    lone = Intervention(collective=coll)
    torch.testing.assert_close(lone.delta(0, h, None, scale).double(), s * e_c, atol=1e-4, rtol=1e-5)
    only_personal = Intervention(personal=pers)
    torch.testing.assert_close(only_personal.delta(0, h, slots, scale).double(), s * _hand_edit(pp, h, slots),
                               atol=1e-4, rtol=1e-5)
    # ablation: Q's span is projected out of the edited state (hidden) or of the edit (edit)
    q = _gram_schmidt(torch.randn(3, D, generator=torch.Generator().manual_seed(9)))
    proj = q.T @ q
    delta = hand["compose"]
    for mode, expected in (("hidden", delta - (hd + delta) @ proj), ("edit", delta - delta @ proj)):
        iv = Intervention(collective=coll, personal=pers, stacking="compose", ablate_basis=q.float(),
                          ablate_mode=mode)
        got = iv.delta(0, h, slots, scale).double()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ConfigError, match="stacking"):
        Intervention(collective=coll, personal=pers, stacking="product")


@pytest.mark.parametrize("stacking", ["sum", "compose"])
def test_hooked_model_applies_the_hand_stacked_edit(stacking):
    """Through the hooks on a tiny model: the next block's input at the edited (last) prompt
    token is the un-edited hidden state plus the hand-computed stacked edit; other tokens keep theirs."""
    loaded = tiny_model("llama")
    coll, pers, _, _, _ = _stacking_case(5)
    fit = PerFit(coll, pers, stacking, loaded.identity.to_dict())
    batch = collate([encode(loaded.tokenizer, "The user rated the movie")], 0)
    base = _block_input(loaded, 2, lambda: loaded.model(**batch.inputs()))  # block 1's output
    h = base[:, -1:]
    e_c = _hand_edit(_hand_params(coll), h, [0])
    inner = h.double() + e_c if stacking == "compose" else h.double()
    for stage, scale, expected in (
        ("perfit", 1.5, e_c + 1.5 * _hand_edit(_hand_params(pers), inner, [2])),
        ("collective", 0.5, 0.5 * e_c),
    ):
        iv = fit.intervention(stage)

        def edited_run(iv=iv, scale=scale):
            with iv.attached(loaded.model), torch.no_grad():
                iv.set_batch(batch.prompt_mask, torch.tensor([2]) if stage == "perfit" else None, scale)
                loaded.model(**batch.inputs())

        edited = _block_input(loaded, 2, edited_run)
        torch.testing.assert_close(edited[:, :-1], base[:, :-1], atol=1e-6, rtol=0)
        torch.testing.assert_close((edited[:, -1:] - h).double(), expected, atol=1e-4, rtol=1e-4)


def test_initialisation_depends_on_key_not_index():
    one = InterventionBank.initialised(_spec(), ["x", "y"], "random", seed=3)
    two = InterventionBank.initialised(_spec(), ["y"], "random", seed=3)
    assert torch.equal(one.site_params[0].W[1], two.site_params[0].W[0])
    assert torch.equal(one.site_params[0].A[1], two.site_params[0].A[0])


def test_bad_specs_fail_clearly():
    with pytest.raises(ConfigError, match="rank"):
        BankSpec("loreft", (Site(1),), parse_positions("l1"), D + 1, D)
    with pytest.raises(ConfigError, match="kind"):
        BankSpec("lora", (Site(1),), parse_positions("l1"), 2, D)
    with pytest.raises(ConfigError, match="initialisation"):
        InterventionBank.initialised(_spec(), ["a"], "ones")
    with pytest.raises(ConfigError, match="position clamp"):
        _spec(clamp="half")
    separate = InterventionBank.initialised(_spec(share_weights=False), ["a"], "zero")
    with pytest.raises(ConfigError, match="last-position mask"):
        separate.edit(0, torch.randn(1, 2, D), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ConfigError, match="position clamp"):
        Intervention(collective=InterventionBank.initialised(_spec(clamp="pyreft"), ["collective"], "zero"),
                     personal=InterventionBank.initialised(_spec(clamp="cover"), ["a"], "zero"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_edit_leaves_outputs_unchanged(arch):
    loaded = tiny_model(arch)
    spec = BankSpec("loreft", (Site(1), Site(2, "resid_pre")), parse_positions("f1+l2"), 4, D)
    coll = InterventionBank.initialised(spec, ["collective"], "zero")
    pers = InterventionBank.initialised(spec, ["a", "b"], "zero")
    batch = collate([encode(loaded.tokenizer, p) for p in ["The user rated", "alpha beta gamma delta"]], 0)
    base = loaded.model(**batch.inputs()).logits
    iv = Intervention(collective=coll, personal=pers, stacking="compose")
    with iv.attached(loaded.model):
        iv.set_batch(batch.prompt_mask, torch.tensor([0, 1]))
        edited = loaded.model(**batch.inputs()).logits
    assert torch.allclose(base, edited, atol=1e-5)


def _block_input(loaded, layer, run):
    """Input of decoder block ``layer`` during ``run()`` (output_hidden_states is recorded by a
    hook registered before ours, so it does not show an edit at the edited block itself)."""
    from perfit_probe.sites import decoder_layers

    captured = {}

    def pre(mod, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = decoder_layers(loaded.model)[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return captured["x"]


def _edited_positions(loaded, iv, batch, layer):
    """Positions whose block-``layer`` output differs with the intervention (per row)."""
    base = _block_input(loaded, layer + 1, lambda: loaded.model(**batch.inputs()))

    def edited_run():
        with iv.attached(loaded.model):
            iv.set_batch(batch.prompt_mask, torch.zeros(batch.input_ids.shape[0], dtype=torch.long))
            loaded.model(**batch.inputs())

    edited = _block_input(loaded, layer + 1, edited_run)
    changed = (edited - base).abs().amax(-1) > 1e-4
    return {i: changed[i].nonzero().flatten().tolist() for i in range(changed.shape[0])}


_PROMPTS = ["alpha beta gamma delta epsilon zeta eta", "alpha", "The user rated the movie", "The"]
"""Prompts of 14, 2, 5 and 1 tiny-tokenizer tokens."""

_COVER = {  # spec -> offsets for prompts of 14, 2, 5, 1 tokens, by hand (p to n // 2, s to ceil(n / 2); alone to n)
    "f1+l2": [[0, 12, 13], [0, 1], [0, 3, 4], [0]],
    "l1": [[13], [1], [4], [0]],
    "f3+l3": [[0, 1, 2, 11, 12, 13], [0, 1], [0, 1, 2, 3, 4], [0]],
}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("clamp", ["pyreft", "cover"])
@pytest.mark.parametrize("spec_text", ["f1+l2", "l1", "f3+l3"])
def test_positions_under_padding_and_short_prompts(pyreft, padding_side, clamp, spec_text):
    """Only the spec's prompt tokens are edited, wherever the padding and however short the
    prompt: pyreft's own positions under ``pyreft`` (a one-token prompt: none), the hand-computed
    ones under ``cover``."""
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    spec = BankSpec("lobireft", (Site(1),), parse_positions(spec_text), 2, D, clamp)
    bank = _randomised(InterventionBank.initialised(spec, ["u"], "zero"))
    iv = Intervention(collective=bank)
    items = [encode(tok, _PROMPTS[0], " theta iota", eos=True), encode(tok, _PROMPTS[1], " beta"),
             encode(tok, _PROMPTS[2]), encode(tok, _PROMPTS[3])]
    assert [enc.n_prompt for enc in items] == [14, 2, 5, 1]
    batch = collate(items, 0, padding_side=padding_side)
    got = _edited_positions(loaded, iv, batch, layer=1)
    length = batch.input_ids.shape[1]
    for i, enc in enumerate(items):
        start = length - len(enc.ids) if padding_side == "left" else 0
        if clamp == "pyreft":
            first, last = pyreft_locations(pyreft, spec_text, enc.n_prompt, share_weights=True)
            offsets = first
        else:
            offsets = _COVER[spec_text][i]
        assert got[i] == sorted(start + o for o in offsets), (i, got[i], offsets)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("spec_text", ["f1+l2", "f3+l3", "f2+l1"])
def test_separate_first_and_last_interventions(pyreft, padding_side, spec_text):
    """Without shared weights, each first-p position gets the ``first`` intervention's edit and
    each last-s position the ``last`` one's, at pyreft's positions of its two intervention lists
    (lobireft: the edit is the constant ``b @ R`` of its unit)."""
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    spec = BankSpec("lobireft", (Site(1),), parse_positions(spec_text), 2, D, "pyreft", False)
    bank = _randomised(InterventionBank.initialised(spec, ["u"], "zero"))
    assert len(bank.site_params) == 2
    first_vec = bank.site_params[0].b[0] @ bank.rotation(0)[0]
    last_vec = bank.site_params[1].b[0] @ bank.rotation(1)[0]
    assert (first_vec - last_vec).abs().max() > 0.1
    iv = Intervention(collective=bank)
    items = [encode(tok, p) for p in _PROMPTS]
    batch = collate(items, 0, padding_side=padding_side)
    base = _block_input(loaded, 2, lambda: loaded.model(**batch.inputs()))

    def edited_run():
        with iv.attached(loaded.model):
            iv.set_batch(batch.prompt_mask)
            loaded.model(**batch.inputs())

    diff = _block_input(loaded, 2, edited_run) - base
    length = batch.input_ids.shape[1]
    for i, enc in enumerate(items):
        start = length - len(enc.ids) if padding_side == "left" else 0
        first, last = pyreft_locations(pyreft, spec_text, enc.n_prompt, share_weights=False)
        expected = torch.zeros(length, D)
        for o in first:
            expected[start + o] = first_vec
        for o in last:
            expected[start + o] = last_vec
        assert torch.allclose(diff[i], expected, atol=1e-5), (i, first, last)


def test_resid_pre_hook_on_gpt2_edits_block_input():
    loaded = tiny_model("gpt2")
    spec = BankSpec("lobireft", (Site(2, "resid_pre"),), parse_positions("l1"), 2, D)
    bank = _randomised(InterventionBank.initialised(spec, ["u"], "zero"))
    iv = Intervention(collective=bank)
    batch = collate([encode(loaded.tokenizer, "alpha beta gamma")], 0)
    base = _block_input(loaded, 2, lambda: loaded.model(**batch.inputs()))
    with iv.attached(loaded.model):
        iv.set_batch(batch.prompt_mask)
        # a hook registered after ours sees the edited block input
        edited = _block_input(loaded, 2, lambda: loaded.model(**batch.inputs()))
    expected = base.clone()
    expected[0, -1] += bank.site_params[0].b[0] @ bank.rotation(0)[0]
    assert torch.allclose(edited, expected, atol=1e-5)


def test_context_manager_always_restores_model():
    loaded = tiny_model("llama")
    bank = InterventionBank.initialised(_spec(), ["u"], "zero")
    iv = Intervention(collective=bank)
    modules = list(loaded.model.modules())
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    with pytest.raises(RuntimeError):
        with iv.attached(loaded.model):
            raise RuntimeError("boom")
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    assert before == after


def test_no_edit_during_cached_generation_steps():
    """One-token forward passes (cached generation) are left untouched, and the cached step
    equals a full recomputation in which only the prompt tokens are edited."""
    loaded = tiny_model("llama")
    spec = BankSpec("lobireft", (Site(1),), parse_positions("f1+l1"), 2, D)
    bank = _randomised(InterventionBank.initialised(spec, ["u"], "zero"))
    iv = Intervention(collective=bank)
    batch = collate([encode(loaded.tokenizer, "alpha beta gamma")], 0)
    n = batch.input_ids.shape[1]
    step = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, n + 1, dtype=torch.long),
            "position_ids": torch.tensor([[n]])}
    with torch.no_grad():
        out = loaded.model(**batch.inputs(), use_cache=True)
        base_step = loaded.model(**step, cache=out.cache).logits
        with iv.attached(loaded.model):
            iv.set_batch(batch.prompt_mask)
            out_iv = loaded.model(**batch.inputs(), use_cache=True)
            step_iv = loaded.model(**step, cache=out_iv.cache).logits
            iv.clear()
        ids = torch.cat([batch.input_ids, torch.tensor([[5]])], 1)
        prompt_mask = torch.cat([batch.prompt_mask, torch.zeros(1, 1, dtype=torch.long)], 1)
        with iv.attached(loaded.model):
            iv.set_batch(prompt_mask)
            oracle = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1:]
    assert torch.allclose(step_iv, oracle, atol=1e-5)
    assert not torch.allclose(step_iv, base_step, atol=1e-3)


@pytest.mark.parametrize("clamp,share_weights", [("cover", True), ("pyreft", False)])
def test_save_load_roundtrip_bit_exact(tmp_path, clamp, share_weights):
    loaded = tiny_model("llama")
    spec = BankSpec("loreft", (Site(1), Site(3)), parse_positions("f1+l2"), 4, D, clamp,
                    share_weights)
    coll = _randomised(InterventionBank.initialised(spec, ["collective"], "zero"), 1)
    pers = _randomised(InterventionBank.initialised(spec, ["a", "b"], "random", seed=4), 2)
    fit = PerFit(coll, pers, "compose", loaded.identity.to_dict())
    fit.save(tmp_path / "perfit")
    back = load_perfit(tmp_path, loaded)
    assert back.stacking == "compose" and back.user_ids == ["a", "b"]
    assert back.collective.spec == spec and back.personal.spec == spec
    names = set(load_file(str(tmp_path / "perfit" / "bank" / "intervention.safetensors")))
    prefixes = ["site0", "site1"] if share_weights else ["site0.first", "site1.first", "site0.last", "site1.last"]
    assert names == {f"{p}.{t}" for p in prefixes for t in ("A", "W", "b")}
    config = json.loads((tmp_path / "perfit" / "bank" / "intervention.json").read_text())
    assert config["sites"] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert config["positions"] == "f1+l2"
    assert config["params_per_slot"] == spec.params_per_slot() == (2 * D * 4 + 4) * 2 * (1 if share_weights else 2)
    batch = collate([encode(loaded.tokenizer, p) for p in ["The user rated", "alpha beta gamma delta"]], 0)
    outs = []
    for f in (fit, back):
        iv = f.intervention("perfit")
        with iv.attached(loaded.model), torch.no_grad():
            iv.set_batch(batch.prompt_mask, torch.tensor([1, 0]), 1.5)
            outs.append(loaded.model(**batch.inputs()).logits)
    assert torch.equal(outs[0], outs[1])


def test_old_artifact_without_clamp_or_share_weights_loads_as_before(tmp_path):
    """A bank saved before ``position_clamp``/``share_weights`` existed: one intervention per
    site, the ``cover`` clamp (a one-token prompt is still edited)."""
    loaded = tiny_model("llama")
    spec = BankSpec("lobireft", (Site(1),), parse_positions("f1+l2"), 2, D)
    bank = _randomised(InterventionBank.initialised(spec, ["collective"], "zero"))
    save_bank(bank, tmp_path, loaded.identity)
    path = tmp_path / "intervention.json"
    config = json.loads(path.read_text())
    del config["position_clamp"], config["share_weights"]
    path.write_text(json.dumps(config))
    (tmp_path / "checksums.json").unlink(missing_ok=True)  # saved before checksums existed too
    back, _ = load_bank(tmp_path, loaded.identity)
    assert back.spec.position_clamp == "cover" and back.spec.share_weights is True
    assert back.spec.params_per_slot() == D * 2 + 2
    batch = collate([encode(loaded.tokenizer, "The")], 0)
    assert batch.prompt_mask.sum() == 1
    assert _edited_positions(loaded, Intervention(collective=back), batch, layer=1) == {0: [0]}


def test_saved_text_is_parsed_once_into_sites_and_positions():
    """A saved spec's site names and position text (any accepted spelling) load as ``Site`` and
    ``PositionSpec`` objects; text is refused where objects are expected."""
    saved = {"kind": "loreft", "sites": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"],
             "positions": "last", "rank": 2, "d_model": D}
    spec = BankSpec.from_dict(saved)
    assert spec.sites == (Site(1), Site(2, "resid_pre")) and spec.positions == parse_positions("l1")
    assert BankSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["positions"] == "l1"
    # refused by BankSpec and Intervention themselves, or first by the run-time type check the
    # test suite adds (jaxtyping's import hook with beartype, a TypeError)
    with pytest.raises((ConfigError, TypeError)):
        BankSpec("loreft", ("blocks.1.hook_resid_post",), parse_positions("l1"), 2, D)
    with pytest.raises((ConfigError, TypeError)):
        BankSpec("loreft", (Site(1),), "l1", 2, D)
    with pytest.raises((ConfigError, TypeError)):
        Intervention(sites=["blocks.1.hook_resid_post"], positions=parse_positions("l1"))


def test_load_refuses_other_model(tmp_path):
    loaded = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    bank = InterventionBank.initialised(_spec(), ["collective"], "zero")
    save_bank(bank, tmp_path, loaded.identity)
    load_bank(tmp_path, loaded.identity)
    with pytest.raises(ArtifactError, match="trained on model"):
        load_bank(tmp_path, other.identity)
    with pytest.raises(ArtifactError, match="no fitted interventions"):
        load_perfit(tmp_path / "nothing")
