"""Evaluation on tiny models: batched per-user prediction, planted users, result files."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import torch

from perfit_probe.data.prompts import build_examples
from perfit_probe.data.records import ProfileItem, Query, TaskData, TaskSpec, User
from perfit_probe.data.splits import Split, history_user
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.evaluate import (
    EvalConfig,
    continuation,
    evaluate_methods,
    predict,
    resolve_decoding,
    write_results,
)
from perfit_probe.evaluation.lora import LoraBaselineConfig
from perfit_probe.evaluation.metrics import read_predictions
from perfit_probe.interventions import PerFit, generate, score_labels
from perfit_probe.interventions.batching import encode
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.interventions.train import TrainConfig, train_collective, train_personal
from perfit_probe_tests.tiny import tiny_model

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
SPEC = TaskSpec(name="planted", kind="rating", labels=("1", "2", "3", "4", "5"),
                profile_fields=("features", "score"), item_template="{features}: {score}",
                history_header="History:", retrieval_fields=("features",),
                example_template="Predict the rating of {features}", example_output="score")
PLANTED = {"t1": "1", "t2": "5", "a": "1", "b": "5", "c": "2", "d": "4"}
"""Each planted user gives every object the same rating; t1, t2 train stage 1."""


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_task(n_queries: int = 8) -> tuple[TaskData, Split]:
    """Users whose rating never changes, and a split holding out 3 queries of each test user."""
    users = []
    for uid, rating in PLANTED.items():
        feats = [f"{WORDS[i]} {WORDS[(i * 5 + 3) % 12]}" for i in range(n_queries)]
        queries = [Query(id=f"{uid}q{i}", input=f"Predict the rating of {f}", output=rating, item_id=f"{uid}i{i}")
                   for i, f in enumerate(feats)]
        profile = [ProfileItem(id=f"{uid}i{i}", fields={"features": f, "score": rating}) for i, f in enumerate(feats)]
        users.append(User(uid, profile, queries))
    split = Split(("t1", "t2"), ("a", "b", "c", "d"),
                  {u: tuple(f"{u}q{i}" for i in range(n_queries - 3, n_queries)) for u in "abcd"}, 0)
    return TaskData(SPEC, users), split


@lru_cache(maxsize=1)
def planted_run():
    """A tiny llama with PerFit trained on the planted users (stage 1 on t1/t2, stage 2 on a-d)."""
    torch.manual_seed(0)
    loaded = tiny_model("llama")
    task, split = planted_task()
    tok = loaded.tokenizer

    def enc(examples):
        return [encode(tok, e.prompt, continuation(e.target, tok, None), eos=True) for e in examples]

    spec = BankSpec("loreft", ("blocks.2.hook_resid_post",), "l1", 4, loaded.d_model)
    collective = InterventionBank.initialised(spec, ["collective"], "zero", 0)
    config = TrainConfig(epochs=6, lr=0.2, batch_size=4, max_grad_norm=1.0)
    train_ex = build_examples([task.user(u) for u in split.train_users], SPEC, tok, variants=("plain",))
    train_collective(loaded, collective, enc(train_ex), config)
    personal = InterventionBank.copied_from(collective, list(split.test_users))
    history = {u: enc(build_examples([history_user(task.user(u), split)], SPEC, tok, variants=("plain",)))
               for u in split.test_users}
    train_personal(loaded, collective, personal, history, config)
    return loaded, task, split, PerFit(collective, personal, "sum", loaded.identity.to_dict())


def random_perfit(loaded, users, kind="loreft"):
    """Untrained PerFit with random non-zero edits at two sites (no training needed)."""
    spec = BankSpec(kind, ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"), "f1+l2", 3, loaded.d_model)
    collective = InterventionBank.initialised(spec, ["collective"], "random", 1)
    personal = InterventionBank.initialised(spec, list(users), "random", 2)
    with torch.no_grad():
        for holder in personal.site_params:
            holder.b.mul_(40.0)  # big enough to change greedy outputs of a random model
    return PerFit(collective, personal, "sum", loaded.identity.to_dict())


PROMPTS = ["Predict the rating of alpha beta\nAnswer:", "History of the user: Fargo rated 5.\nAnswer:",
           "The user rated the movie\nAnswer:", "gamma\nAnswer:", "Answer with a single number. The answer is"]
USERS = ["u1", "u2", "u1", "u3", "u2"]


def test_mixed_batch_equals_one_by_one_for_generation_and_scores():
    loaded = tiny_model("llama")
    perfit = random_perfit(loaded, ["u1", "u2", "u3"])
    batched = generate(loaded, PROMPTS, perfit=perfit, user_ids=USERS, max_new_tokens=6, batch_size=5)
    single = [generate(loaded, [p], perfit=perfit, user_ids=[u], max_new_tokens=6)[0] for p, u in zip(PROMPTS, USERS)]
    assert batched == single
    base = generate(loaded, PROMPTS, stage="none", max_new_tokens=6)
    assert batched != base  # the interventions do act
    labels = [continuation(x, loaded.tokenizer, None) for x in SPEC.labels]
    s_batch = score_labels(loaded, PROMPTS, labels, perfit=perfit, user_ids=USERS, batch_size=5)
    s_single = torch.cat([score_labels(loaded, [p], labels, perfit=perfit, user_ids=[u]) for p, u in zip(PROMPTS, USERS)])
    torch.testing.assert_close(s_batch, s_single, rtol=1e-4, atol=1e-4)


def test_constrained_prediction_is_argmax_and_expected_rating():
    loaded = tiny_model("llama")
    perfit = random_perfit(loaded, ["u1", "u2", "u3"])
    pred = predict(loaded, PROMPTS, SPEC, perfit=perfit, user_ids=USERS, stage="perfit")
    labels = [" " + x for x in SPEC.labels]
    logp = score_labels(loaded, PROMPTS, labels, perfit=perfit, user_ids=USERS)
    assert pred.outputs == [SPEC.labels[int(i)] for i in logp.argmax(1)]
    p = torch.softmax(logp.double(), 1).numpy()
    np.testing.assert_allclose(pred.expected, p @ np.arange(1, 6), rtol=1e-6)
    greedy = predict(loaded, PROMPTS[:2], SPEC, decoding="greedy", max_new_tokens=3)
    assert greedy.expected is None and len(greedy.outputs) == 2
    assert resolve_decoding("auto", "generation") == "greedy"
    with pytest.raises(ConfigError):
        resolve_decoding("constrained", "generation")


def test_perfit_beats_the_base_model_on_planted_users(tmp_path):
    loaded, task, split, perfit = planted_run()
    config = EvalConfig(methods=("base", "rag", "stage1", "perfit", "lora"), k=2,
                        lora=LoraBaselineConfig(lr=2e-2, epochs=5, dropout=0.0))
    result = evaluate_methods(loaded, task, split, perfit, config, perfit_costs={"stage1_train_s": 1.0})
    table = result.table.set_index("method")
    assert list(table.index) == ["base", "rag", "stage1", "perfit", "lora"]
    assert table.loc["perfit", "mae"] < table.loc["base", "mae"]
    assert table.loc["perfit", "mae"] < table.loc["stage1", "mae"]
    assert table.loc["perfit", "expected_mae"] < table.loc["base", "expected_mae"]
    # per-user behaviour: the mean expected rating follows the planted ratings (a, c low; b, d high)
    own = result.predictions[result.predictions.method == "perfit"].groupby("user_id")["expected"].mean()
    assert own["a"] < own["c"] < own["d"] and own["a"] < own["b"]
    # cost columns
    assert table.loc["perfit", "params_per_user"] == perfit.personal.spec.params_per_slot() == 2 * 32 * 4 + 4
    assert table.loc["lora", "params_per_user"] == 4 * (8 * (32 + 32) + 8 * (32 + 16))
    assert table.loc["base", "params_per_user"] == 0 and table.loc["stage1", "shared_params"] == 260
    assert table.loc["lora", "train_s_per_user"] > 0 and set(result.lora_adapters) == set(split.test_users)
    # the metric rows are the metrics of the saved predictions
    from perfit_probe.evaluation.metrics import score_task

    for method, frame in result.predictions.groupby("method"):
        assert score_task("rating", list(frame.gold), list(frame.output))["mae"] == pytest.approx(table.loc[method, "mae"])
    write_results(result, tmp_path, SPEC)
    assert pd.read_csv(tmp_path / "results.csv").shape[0] == 5
    assert "| perfit |" in (tmp_path / "results.md").read_text()
    assert "| method | mae | rmse | mae_lenient | rmse_lenient | unparseable |" in (tmp_path / "results.md").read_text()
    task_id, rows = read_predictions(tmp_path / "predictions" / "perfit.json")
    assert task_id == "planted" and len(rows) == 12 and set(rows.values()) <= set(SPEC.labels)
    assert json.loads((tmp_path / "predictions" / "golds.json").read_text())["golds"][0]["output"] in SPEC.labels


def test_methods_needing_a_fit_are_skipped_without_one():
    loaded = tiny_model("llama")
    task, split = planted_task(4)
    result = evaluate_methods(loaded, task, split, None, EvalConfig(methods=("base", "stage1", "perfit")))
    assert list(result.table.method) == ["base"]
    with pytest.raises(ConfigError, match="unknown method"):
        EvalConfig(methods=("nope",))


def test_oppu_task_lora_and_user_loras_on_top_leave_the_base_model_unchanged():
    loaded, task, split, perfit = planted_run()
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    fast = LoraBaselineConfig(lr=2e-2, epochs=5, dropout=0.0)
    config = EvalConfig(methods=("base", "lora", "lora_task", "oppu"), lora=fast, lora_task=fast)
    result = evaluate_methods(loaded, task, split, perfit, config)
    table = result.table.set_index("method")
    assert list(table.index) == ["base", "lora", "lora_task", "oppu"]
    per_adapter = 4 * (8 * (32 + 32) + 8 * (32 + 16))
    assert table.loc["oppu", "params_per_user"] == table.loc["lora", "params_per_user"] == per_adapter
    assert table.loc["oppu", "shared_params"] == table.loc["lora_task", "shared_params"] == per_adapter
    assert table.loc["lora_task", "params_per_user"] == 0 and table.loc["lora_task", "train_s_shared"] > 0
    preds = result.predictions
    # the task adapter moved the predictions; the per-user adapters on top learn each user's rating
    assert not np.allclose(preds[preds.method == "lora_task"]["expected"], preds[preds.method == "base"]["expected"])
    assert table.loc["oppu", "mae"] < table.loc["lora_task", "mae"]
    # the per-user adapters of oppu were trained on the task model, not on the base model
    assert not np.allclose(preds[preds.method == "oppu"]["expected"], preds[preds.method == "lora"]["expected"])
    after = loaded.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
