"""Issue 14, equal budgets: the per-user LoRA baselines select their epoch on the examples
PerFit's stage 2 holds out. Oracles: a planted user whose held-out examples contradict its
training examples (training can only hurt, so the LoRA must be the base model), the rows
PerFit's fit actually validated on, and training without validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from perfit_probe.config import EvalConfig, FitConfig, LoraBaselineConfig
from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.splits import Split
from perfit_probe.evaluation import lora as lora_module
from perfit_probe.evaluation.evaluate import evaluate_methods
from perfit_probe.evaluation.lora import LoraBaseline
from perfit_probe.interventions.batching import Encoded, encode
from perfit_probe.interventions.fit import validation_indices, validation_split
from perfit_probe.stages import evaluate as evaluate_stage
from perfit_probe.stages import fit as fit_stage
from perfit_probe_tests.planted import SPEC, WORDS
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Predict the rating of alpha beta", "Predict the rating of gamma delta",
           "Predict the rating of epsilon zeta", "Predict the rating of eta theta"]
VAL = ["Predict the rating of iota kappa", "Predict the rating of lambda mu"]
FAST = LoraBaselineConfig(lr=5e-2, epochs=3, batch_size=2, dropout=0.0)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_indices_are_the_split_of_perfits_stage2():
    rows = {u: [Encoded((i, len(u)), 1) for i in range(n)] for u, n in (("a", 7), ("bb", 3), ("c", 1), ("d", 0))}
    train, val = validation_split(rows, 3, seed=5)
    for user, user_rows in rows.items():
        held = validation_indices(user, len(user_rows), 3, 5)
        assert held == sorted(held) and len(held) == max(0, min(3, len(user_rows) - 1))
        assert val[user] == [user_rows[i] for i in held]
        assert train[user] == [r for i, r in enumerate(user_rows) if i not in held]
    assert validation_indices("a", 7, 0, 5) == []


def test_lora_kept_epoch_is_the_run_without_validation_stopped_there(monkeypatch):
    """Validation examples like the training ones: the loss falls every epoch, the last epoch is
    kept and the adapter is bit-identical to training on the same rows with no validation. With
    planted validation losses the kept adapter is that run's adapter after the chosen epoch."""
    loaded = tiny_model("llama")
    baseline = LoraBaseline(loaded, FAST)
    plain = baseline.fit_user("u", PROMPTS, [" 5"] * 4, seed=3)
    assert plain.epoch == FAST.epochs and plain.val_losses == () and plain.n_val == 0
    helped = baseline.fit_user("u", PROMPTS, [" 5"] * 4, seed=3, val_prompts=VAL, val_targets=[" 5"] * 2)
    assert len(helped.val_losses) == FAST.epochs + 1 and helped.n_val == 2
    assert helped.val_losses[-1] < helped.val_losses[0] and helped.epoch == int(np.argmin(helped.val_losses))
    assert helped.epoch == FAST.epochs and _equal_states(helped.state, plain.state)
    assert helped.losses == plain.losses

    # planted validation losses; the spy keeps the adapter at every measurement
    snapshots = []

    def planted(values):
        def loss(self, model, rows):
            snapshots.append(lora_module._state(model))
            return values[len(snapshots) - 1]
        return loss

    monkeypatch.setattr(LoraBaseline, "_loss", planted([3.0, 1.0, 2.0, 2.5]))
    middle = baseline.fit_user("u", PROMPTS, [" 5"] * 4, seed=3, val_prompts=VAL, val_targets=[" 5"] * 2)
    assert middle.epoch == 1 and middle.val_losses == (3.0, 1.0, 2.0, 2.5)
    assert _equal_states(middle.state, snapshots[1])
    assert _equal_states(snapshots[-1], plain.state)  # measuring did not change the training
    seen, snapshots = snapshots, []
    monkeypatch.setattr(LoraBaseline, "_loss", planted([3.0, 2.0, 1.0, 0.5]))
    baseline.fit_user("u", PROMPTS, [" 5"] * 4, seed=3, val_prompts=VAL, val_targets=[" 5"] * 2)
    assert all(_equal_states(a, b) for a, b in zip(seen, snapshots))


def test_lora_keeps_epoch_zero_when_training_hurts_and_is_then_the_base_model():
    loaded = tiny_model("llama")
    baseline = LoraBaseline(loaded, LoraBaselineConfig(lr=0.1, epochs=3, batch_size=2, dropout=0.0))
    hurt = baseline.fit_user("u", PROMPTS, [" 5"] * 4, seed=1, val_prompts=VAL, val_targets=[" 1"] * 2)
    assert min(hurt.val_losses[1:]) > hurt.val_losses[0] and hurt.epoch == 0
    assert all(not v.any() for v in hurt.state.values())  # the zero adapter
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
    with baseline.applied(hurt) as adapted, torch.no_grad():
        assert torch.equal(adapted.model(input_ids=ids).logits, ref)


def _contradicting_task(n_items: int, n_val: int, seed: int) -> tuple[TaskData, Split]:
    """Test users whose held-out history items (``validation_indices``) are rated 1, the rest 5;
    t1, t2 are train users. Each test user has one held-out query."""
    users = []
    for uid in ("t1", "t2", "a", "b"):
        held = set(validation_indices(uid, n_items, n_val, seed))
        feats = [f"{WORDS[(i + len(uid)) % 12]} {WORDS[(i * 5 + 3) % 12]}" for i in range(n_items + 1)]
        profile = [ProfileItem(id=f"{uid}i{i}", fields={"features": f, "score": "1" if i in held else "5"})
                   for i, f in enumerate(feats)]
        queries = [Query(id=f"{uid}q{i}", input=f"Predict the rating of {f}", output="5", item_id=f"{uid}i{i}")
                   for i, f in enumerate(feats)]
        users.append(User(uid, profile, queries))
    split = Split(("t1", "t2"), ("a", "b"), {u: (f"{u}q{n_items}",) for u in "ab"}, seed)
    return TaskData(SPEC, users), split


def test_evaluated_lora_keeps_epoch_zero_and_predicts_as_the_base_model_when_training_hurts():
    loaded = tiny_model("llama")
    task, split = _contradicting_task(6, 2, seed=4)
    config = EvalConfig(methods=("base", "lora"), val_per_user=2, val_seed=4, lora=FAST)
    result = evaluate_methods(loaded, task, split, None, config)
    preds = result.predictions
    base, lora = preds[preds.method == "base"], preds[preds.method == "lora"]
    assert list(lora.output) == list(base.output)
    assert np.array_equal(lora.expected.to_numpy(), base.expected.to_numpy())
    sel = result.lora_selection
    assert set(sel.user_id) == {"a", "b"} and set(sel.method) == {"lora"}
    assert (sel.n_val == 2).all() and (sel.n_train == 4).all()
    kept = sel[sel.selected]
    assert list(kept.epoch) == [0, 0]
    assert all(a.epoch == 0 and a.n_examples == 4 for a in result.lora_adapters.values())
    # without selection the same LoRAs train on all 6 examples and do move the predictions
    free = evaluate_methods(loaded, task, split, None, EvalConfig(methods=("lora",), val_per_user=0, lora=FAST))
    assert all(a.n_examples == 6 and a.epoch == FAST.epochs for a in free.lora_adapters.values())
    assert not np.allclose(free.predictions.expected.to_numpy(), base.expected.to_numpy())


SMALL = dict(task="synthetic", n_users=6, max_queries=2, layers=(1, -1), positions="f1+l1", collective_rank=4,
             personal_rank=4, epochs1=1, epochs2=1, batch_size=4, lr1=1e-2, lr2=1e-2, max_prompt_tokens=96,
             max_profile_examples=5, val_per_user=2, seed=3, model="tiny")


def test_lora_baselines_hold_out_exactly_perfits_validation_rows(monkeypatch, tmp_path):
    """The evaluate stage takes the fit's val_per_user and seed; lora and oppu validate on the very
    rows stage 2 validated on, train on the rest, and the choice is written out."""
    import perfit_probe.interventions.fit as fit_module

    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    stage2 = {}
    real_personal = fit_module.train_personal

    def spy_personal(loaded, collective, personal, examples, *args, **kwargs):
        stage2.update(train={u: list(r) for u, r in examples.items()},
                      val={u: list(r) for u, r in kwargs["validation"].items()})
        return real_personal(loaded, collective, personal, examples, *args, **kwargs)

    monkeypatch.setattr(fit_module, "train_personal", spy_personal)
    fit_stage.run(FitConfig(**SMALL), tmp_path / "run", loaded)
    assert sum(map(len, stage2["val"].values())) > 0

    lora_rows = {}
    real_fit_user = LoraBaseline.fit_user

    def spy_fit_user(self, user_id, prompts, targets, *, val_prompts=(), val_targets=(), **kwargs):
        def enc(ps, ts):
            return [encode(tok, p, t, eos=True, max_prompt_tokens=SMALL["max_prompt_tokens"]) for p, t in zip(ps, ts)]
        if user_id != "task":
            lora_rows.setdefault(user_id, []).append((enc(prompts, targets), enc(val_prompts, val_targets)))
        return real_fit_user(self, user_id, prompts, targets, val_prompts=val_prompts, val_targets=val_targets,
                             **kwargs)

    monkeypatch.setattr(LoraBaseline, "fit_user", spy_fit_user)
    fast = LoraBaselineConfig(epochs=1, batch_size=4)
    evaluate_stage.run(EvalConfig(methods=("lora", "oppu"), lora=fast, lora_task=fast), tmp_path / "run", loaded,
                       figures=False)
    assert set(lora_rows) == set(stage2["val"])
    for uid, runs in lora_rows.items():
        assert len(runs) == 2  # lora, then oppu
        for train, val in runs:
            assert val == stage2["val"][uid] and train == stage2["train"][uid]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["stages"][-1]["config"]["val_per_user"] == 2 and info["stages"][-1]["config"]["val_seed"] == 3
    sel = pd.read_csv(tmp_path / "run" / "eval" / "lora_selection.csv", dtype={"user_id": str})
    assert set(sel.method) == {"lora", "oppu"} and set(sel.user_id) == set(stage2["val"])
    assert (sel.groupby(["method", "user_id"]).epoch.count() == 2).all()  # epochs 0 and 1
    assert (sel.groupby(["method", "user_id"]).selected.sum() == 1).all()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["lora_selection"]
    assert metrics["lora"]["val_per_user"] == 2 and metrics["oppu"]["users_validated"] == len(stage2["val"])
    assert sum(metrics["lora"]["kept_epoch_counts"].values()) == metrics["lora"]["users"]
    text = (tmp_path / "run" / "eval" / "results.md").read_text()
    assert "Model selection of the per-user LoRAs" in text and "lora_selection.csv" in text
    # an explicit 0 switches the selection off: every example trained on
    lora_rows.clear()
    evaluate_stage.run(EvalConfig(methods=("lora",), lora=fast, val_per_user=0), tmp_path / "run", loaded, figures=False)
    for uid, ((train, val),) in lora_rows.items():
        assert val == [] and len(train) == len(stage2["train"][uid]) + len(stage2["val"][uid])
