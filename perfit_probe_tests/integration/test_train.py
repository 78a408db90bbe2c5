"""Two-stage training: optimiser, orthonormality, batched = sequential, planted users."""

from __future__ import annotations

import torch

from perfit_probe.config import TrainConfig
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.batching import Encoded, collate, encode
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.interventions.train import (
    BankAdamW,
    train_collective,
    train_personal,
    train_personal_sequential,
)
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.tiny import tiny_model

D = 32
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _examples(tok, n, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)]
        target = " " + WORDS[int(torch.randint(len(WORDS), (1,), generator=gen))]
        out.append(encode(tok, " ".join(words), target, eos=True))
    return out


def test_bank_adamw_equals_torch_adamw_with_clipping():
    spec = BankSpec("loreft", (Site(1), Site(2)), parse_positions("l1"), 3, 8)
    ours = InterventionBank.initialised(spec, ["u"], "random", seed=1).requires_grad_(True)
    ref = InterventionBank.initialised(spec, ["u"], "random", seed=1).requires_grad_(True)
    opt = BankAdamW(ours, lr=1e-2, weight_decay=0.1)
    decayed = {id(p) for p in ref.decayed_parameters()}
    torch_opt = torch.optim.AdamW([
        {"params": [p for p in ref.parameters() if id(p) in decayed], "weight_decay": 0.1},
        {"params": [p for p in ref.parameters() if id(p) not in decayed], "weight_decay": 0.0},
    ], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in ours.parameters()]
        for p, g in zip(ours.parameters(), grads):
            p.grad = g.clone()
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.clone()
        opt.clip_per_slot(0.3)
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.3)
        opt.step(torch.tensor([True]))
        torch_opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bank_adamw_leaves_inactive_slots_alone():
    spec = BankSpec("loreft", (Site(1),), parse_positions("l1"), 2, 6)
    bank = InterventionBank.initialised(spec, ["a", "b"], "random").requires_grad_(True)
    before = [p.detach().clone() for p in bank.parameters()]
    opt = BankAdamW(bank, lr=0.1, weight_decay=0.5)
    for p in bank.parameters():
        p.grad = torch.ones_like(p)
    opt.step(torch.tensor([True, False]))
    for p, b in zip(bank.parameters(), before):
        assert torch.equal(p[1], b[1]) and not torch.equal(p[0], b[0])
    assert opt.steps.tolist() == [1.0, 0.0]


def test_rotation_stays_orthonormal_and_loss_falls_in_stage1():
    loaded = tiny_model("llama")
    spec = BankSpec("loreft", (Site(1), Site(2)), parse_positions("f1+l1"), 4, D)
    bank = InterventionBank.initialised(spec, ["collective"], "zero")
    start = [bank.site_params[s].A.detach().clone() for s in range(2)]
    examples = _examples(loaded.tokenizer, 16, seed=0)
    curve = train_collective(loaded, bank, examples, TrainConfig(epochs=4, lr=5e-2, batch_size=8))
    for s in range(2):
        rot = bank.rotation(s)[0]
        assert torch.allclose(rot @ rot.T, torch.eye(4), atol=1e-5)
        assert not torch.allclose(bank.site_params[s].A, start[s])  # R did move
    by_epoch = curve.groupby("epoch")["loss"].mean()
    assert by_epoch.iloc[-1] < by_epoch.iloc[0]
    assert not any(p.requires_grad for p in bank.parameters())


def test_batched_stage2_equals_sequential():
    loaded = tiny_model("llama")
    spec = BankSpec("loreft", (Site(1), Site(2)), parse_positions("f1+l2"), 3, D)
    collective = InterventionBank.initialised(spec, ["collective"], "random", seed=5)
    users = ["u0", "u1", "u2", "u3"]
    examples = {u: _examples(loaded.tokenizer, n, seed=i) for i, (u, n) in enumerate(zip(users, [3, 5, 2, 4]))}
    config = TrainConfig(epochs=2, lr=2e-2, batch_size=2, rows_per_forward=3, max_grad_norm=0.05)
    for stacking, init in (("sum", "random"), ("compose", "stage1")):
        if init == "stage1":
            start = InterventionBank.copied_from(collective, users)
        else:
            start = InterventionBank.initialised(spec, users, init, seed=7)
        batched = start.subset(users)
        curve = train_personal(loaded, collective, batched, examples, config, stacking=stacking)
        sequential, seq_curve = train_personal_sequential(loaded, collective, start.subset(users), examples,
                                                          config, stacking=stacking)
        for a, b, s in zip(batched.parameters(), sequential.parameters(), start.parameters()):
            assert torch.allclose(a, b, atol=2e-5), (stacking, (a - b).abs().max())
            assert not torch.allclose(a, s, atol=1e-4)
        merged = curve.merge(seq_curve, on=["user_id", "step"], suffixes=("", "_seq"))
        assert len(merged) == len(curve) == sum(2 * ((n + 1) // 2) for n in [3, 5, 2, 4])
        assert (merged["loss"] - merged["loss_seq"]).abs().max() < 1e-5
        # clipping was active (per user): the equality holds with clipping, not by its absence
        assert (curve["grad_norm"] > config.max_grad_norm).any()


def _sample(loaded, iv, slots, encoded, n_new, gen):
    """Sample ``n_new`` tokens after each prompt under ``iv`` (edit on the prompt tokens only)."""
    encoded = list(encoded)
    for _ in range(n_new):
        batch = collate(encoded, 0)
        with torch.no_grad():
            iv.set_batch(batch.prompt_mask, torch.tensor(slots))
            logits = loaded.model(**batch.inputs()).logits[:, -1]
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0].tolist()
        encoded = [Encoded(e.ids + (t,), e.n_prompt) for e, t in zip(encoded, nxt)]
    return encoded


def test_planted_users_are_recovered():
    """Users generated by planted personal edits v_u = U^T c_u (U: a 2-dim subspace of d = 32):
    training personal edits on their samples brings their loss near the planted model's own
    loss, and the learned edits lie in, and span, the planted subspace (chance: 2/32)."""
    loaded = tiny_model("llama")
    with torch.no_grad():  # a sharper output layer, so that edits change the outputs clearly
        loaded.model.lm_head.weight.mul_(30.0)
    site = (Site(1),)
    users = [f"u{i}" for i in range(5)]
    gen = torch.Generator().manual_seed(11)
    planted_spec = BankSpec("lobireft", site, parse_positions("l1"), 2, D)
    planted = InterventionBank(planted_spec, users)
    basis = torch.linalg.qr(torch.randn(D, 2, generator=gen))[0].T  # U [2, d]
    coeffs = torch.randn(len(users), 2, generator=gen)
    coeffs = 6.0 * coeffs / coeffs.norm(dim=1, keepdim=True)
    with torch.no_grad():
        planted.site_params[0].A.copy_(basis.expand(len(users), -1, -1))
        planted.site_params[0].b.copy_(coeffs)
    zero_coll = InterventionBank.initialised(planted_spec, ["collective"], "zero")
    prompts = ["alpha beta", "The user rated", "gamma delta epsilon", "user query profile"]
    teacher = Intervention(collective=zero_coll, personal=planted)
    slots = [s for s in range(len(users)) for _ in range(5) for _ in prompts]
    with teacher.attached(loaded.model):
        sampled = _sample(loaded, teacher, slots, [encode(loaded.tokenizer, p) for _ in range(5 * len(users)) for p in prompts], 2, gen)
    examples = {u: [e for e, s in zip(sampled, slots) if s == i] for i, u in enumerate(users)}
    student_spec = BankSpec("lobireft", site, parse_positions("l1"), D, D)  # full rank: the edit is a free vector
    student = InterventionBank.initialised(student_spec, users, "zero", seed=1)
    config = TrainConfig(epochs=12, lr=0.1, batch_size=100, max_grad_norm=0.0, weight_decay=0.0, rows_per_forward=128)
    curve = train_personal(loaded, zero_coll, student, examples, config)
    # oracle loss: the planted model's own loss on the same data (one pass, no update)
    oracle_curve = train_personal(loaded, zero_coll, planted.subset(users), examples,
                                  TrainConfig(epochs=1, lr=1e-12, batch_size=100))
    first = curve[curve["epoch"] == 0]["loss"].mean()
    last = curve[curve["epoch"] == config.epochs - 1]["loss"].mean()
    oracle = oracle_curve["loss"].mean()
    assert last < first - 0.8 * (first - oracle), (first, last, oracle)
    learned = torch.stack([student.site_params[0].b[i] @ student.rotation(0)[i] for i in range(len(users))])
    inside = (learned @ basis.T).pow(2).sum() / learned.pow(2).sum()
    top2 = torch.linalg.svd(learned, full_matrices=False).Vh[:2]
    spanned = (top2 @ basis.T).pow(2).sum() / 2  # mean squared cosine of the principal angles
    assert inside > 0.4 and spanned > 0.5, (float(inside), float(spanned))


def test_stage2_selection_keeps_each_users_best_epoch():
    """Oracle: a user's kept parameters are exactly those of training it for its chosen number
    of epochs, the choice is the argmin of its validation losses, and batched = sequential."""
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    spec = BankSpec("loreft", (Site(1), Site(2)), parse_positions("f1+l1"), 3, D)
    collective = InterventionBank.initialised(spec, ["collective"], "random", seed=5)
    users = ["u0", "u1", "u2", "u3"]
    examples = {u: _examples(tok, 4, seed=10 + i) for i, u in enumerate(users)}
    prompts = ["alpha beta", "gamma", "delta eta iota", "zeta mu"]
    # u2 always answers " alpha" but is validated on " kappa": training can only hurt it
    examples["u2"] = [encode(tok, p, " alpha", eos=True) for p in prompts]
    validation = {"u0": examples["u0"][:2], "u1": examples["u1"][:3],
                  "u2": [encode(tok, p, " kappa") for p in prompts]}  # u3: none
    config = TrainConfig(epochs=3, lr=5e-2, batch_size=2, rows_per_forward=5, max_grad_norm=1.0)
    start = InterventionBank.initialised(spec, users, "random", seed=7)
    batched = start.subset(users)
    curve = train_personal(loaded, collective, batched, examples, config, validation=validation)
    sequential, seq_curve = train_personal_sequential(loaded, collective, start.subset(users), examples, config,
                                                      validation=validation)
    for a, b in zip(batched.parameters(), sequential.parameters()):
        assert torch.allclose(a, b, atol=2e-5)

    val = curve[curve["split"] == "val"]
    assert set(val["user_id"]) == {"u0", "u1", "u2"}
    assert sorted(val[val["user_id"] == "u0"]["epoch"]) == [0, 1, 2, 3]
    kept = {}
    for user, rows in val.groupby("user_id"):
        assert int(rows["selected"].sum()) == 1
        kept[user] = int(rows.loc[rows["loss"].idxmin(), "epoch"])
        assert int(rows[rows["selected"]]["epoch"].iloc[0]) == kept[user]
    seq_val = seq_curve[seq_curve["split"] == "val"]
    assert {u: int(r[r["selected"]]["epoch"].iloc[0]) for u, r in seq_val.groupby("user_id")} == kept
    assert kept["u2"] == 0 and max(kept["u0"], kept["u1"]) > 0  # the choice is not the same for everyone
    kept["u3"] = config.epochs
    for slot, user in enumerate(users):
        alone = start.subset([user])
        if kept[user]:
            train_personal(loaded, collective, alone, {user: examples[user]},
                           TrainConfig(**{**config.__dict__, "epochs": kept[user]}))
        for mine, oracle in zip(batched.parameters(), alone.parameters()):
            assert torch.allclose(mine[slot], oracle[0], atol=2e-5), user
