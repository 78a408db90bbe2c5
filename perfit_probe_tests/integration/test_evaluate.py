"""Evaluation on tiny models: batched per-user prediction, planted users, result files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from perfit_probe.config import EvalConfig, LoraBaselineConfig
from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.splits import Split
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.evaluate import (
    Predictions,
    continuation,
    evaluate_methods,
    predict,
    resolve_decoding,
)
from perfit_probe.evaluation.metrics import read_predictions
from perfit_probe.interventions import generate, score_labels
from perfit_probe.stages.eval_results import write_results
from perfit_probe_tests.planted import PLANTED, SPEC, WORDS, planted_run, planted_task, random_perfit
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # the metric rows are the metrics of the saved predictions, recomputed by hand
    preds = result.predictions
    assert set(zip(preds.user_id, preds.query_id)) == {(u, q) for u in split.test_users for q in split.heldout[u]}
    for method, frame in preds.groupby("method"):
        assert len(frame) == table.loc[method, "n_queries"] == 12
        gold = frame.gold.astype(float).to_numpy()
        assert all(g == PLANTED[u] for g, u in zip(frame.gold, frame.user_id))
        err = frame.output.astype(float).to_numpy() - gold
        assert table.loc[method, "mae"] == pytest.approx(np.abs(err).mean())
        assert table.loc[method, "rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
        assert table.loc[method, "expected_mae"] == pytest.approx(np.abs(frame.expected.to_numpy() - gold).mean())
    write_results(result, tmp_path, SPEC)
    assert pd.read_csv(tmp_path / "results.csv").shape[0] == 5
    assert "| perfit |" in (tmp_path / "results.md").read_text()
    assert "| method | mae | rmse | mae_lenient | rmse_lenient | unparseable |" in (tmp_path / "results.md").read_text()
    task_id, rows = read_predictions(tmp_path / "predictions" / "perfit.json")
    assert task_id == "planted" and len(rows) == 12 and set(rows.values()) <= set(SPEC.labels)
    assert json.loads((tmp_path / "predictions" / "golds.json").read_text())["golds"][0]["output"] in SPEC.labels


HAND = {
    # query -> (user, gold, {stage: prediction}); stage "none" is the base method
    "classification": {
        "a0": ("a", "sports", {"none": "sports", "collective": "sports", "perfit": "sports"}),
        "a1": ("a", "sports", {"none": "sports", "collective": "travel", "perfit": "sports"}),
        "a2": ("a", "travel", {"none": "sports", "collective": "travel", "perfit": "travel"}),
        "b0": ("b", "crime", {"none": "sports", "collective": "crime", "perfit": "crime"}),
        "b1": ("b", "crime", {"none": "sports", "collective": "banana", "perfit": "crime"}),
        "b2": ("b", "crime", {"none": "sports", "collective": " travel ", "perfit": "sports"}),
    },
    "rating": {
        "a0": ("a", "1", {"none": "3", "collective": "2", "perfit": "1"}),
        "a1": ("a", "2", {"none": "3", "collective": "no idea", "perfit": "1"}),
        "a2": ("a", "1", {"none": "3", "collective": "4 stars", "perfit": "1"}),
        "b0": ("b", "5", {"none": "3", "collective": "5", "perfit": "5"}),
        "b1": ("b", "4", {"none": "3", "collective": "5", "perfit": "5"}),
        "b2": ("b", "5", {"none": "3", "collective": "n/a", "perfit": "4"}),
    },
    "generation": {
        "a0": ("a", "the quick brown fox", {"none": "a slow brown dog", "collective": "the quick fox",
                                            "perfit": "the quick brown fox"}),
        "a1": ("a", "alpha beta gamma", {"none": "", "collective": "gamma beta alpha", "perfit": "alpha gamma"}),
        "a2": ("a", "news of the day", {"none": "day", "collective": "the news", "perfit": "news of the day"}),
        "b0": ("b", "rates rise again", {"none": "rates", "collective": "rates fall again", "perfit": "rates rise"}),
        "b1": ("b", "a new hope", {"none": "hope", "collective": "new hope a", "perfit": "a new hope"}),
        "b2": ("b", "zeta eta theta", {"none": "iota", "collective": "zeta", "perfit": "eta theta zeta"}),
    },
}
"""Hand-made gold outputs and predictions of three methods on 6 held-out queries of 2 users."""
HAND_LABELS = {"classification": ("sports", "travel", "crime"), "rating": ("1", "2", "3", "4", "5"),
               "generation": None}


def hand_task(kind: str) -> tuple[TaskData, Split]:
    """Users a and b whose held-out queries are HAND's (plus one history query each)."""
    spec = replace(SPEC, kind=kind, labels=HAND_LABELS[kind])
    users = []
    for uid in "ab":
        queries = [Query(id=qid, input=f"Predict [{qid}] for {WORDS[i]}", output=gold)
                   for i, (qid, (owner, gold, _)) in enumerate(HAND[kind].items()) if owner == uid]
        queries.append(Query(id=f"{uid}h", input=f"Predict [{uid}h] for mu", output=queries[0].output))
        profile = [ProfileItem(id=f"{uid}i", fields={"features": "alpha", "score": "1"})]
        users.append(User(uid, profile, queries))
    heldout = {u: tuple(q for q, v in HAND[kind].items() if v[0] == u) for u in "ab"}
    return TaskData(spec, users), Split(("t",), ("a", "b"), heldout, 0)


def _hand_predict(kind: str, calls: list):
    """A stand-in for the model's ``predict``: HAND's prediction of each prompt's query at ``stage``."""
    import re

    def fake(loaded, prompts, spec, *, stage="none", user_ids=None, **_):
        queries = [re.search(r"\[(\w+)\]", p).group(1) for p in prompts]
        if stage != "none":  # each row carries its own user's intervention
            assert list(user_ids) == [HAND[kind][q][0] for q in queries]
        calls.append(stage)
        outputs = [HAND[kind][q][2][stage] for q in queries]
        expected = None
        if kind == "rating":  # an expected rating a little off the discrete prediction
            expected = np.array([float(o.split()[0]) - 0.25 if o[:1].isdigit() else 3.0 for o in outputs])
        return Predictions(outputs, None, expected)

    return fake


@pytest.mark.parametrize("kind", ["classification", "rating", "generation"])
def test_metric_rows_equal_hand_computed_metrics_of_hand_made_predictions(kind, monkeypatch):
    """The table's metrics of hand-made predictions, each computed here independently: accuracy
    and MAE/RMSE by hand, macro-F1 with sklearn's f1_score on the label strings, ROUGE with
    rouge_score directly."""
    import perfit_probe.evaluation.evaluate as evaluate_module

    loaded = tiny_model("llama")
    task, split = hand_task(kind)
    calls = []
    monkeypatch.setattr(evaluate_module, "predict", _hand_predict(kind, calls))
    result = evaluate_methods(loaded, task, split, random_perfit(loaded, ["a", "b"]),
                              EvalConfig(methods=("base", "stage1", "perfit")))
    assert calls == ["none", "collective", "perfit"]
    table = result.table.set_index("method")
    stage_of = {"base": "none", "stage1": "collective", "perfit": "perfit"}
    golds = [v[1] for v in HAND[kind].values()]
    for method, stage in stage_of.items():
        preds = [v[2][stage] for v in HAND[kind].values()]
        frame = result.predictions[result.predictions.method == method]
        assert dict(zip(frame.query_id, frame.output)) == {q: v[2][stage] for q, v in HAND[kind].items()}
        assert dict(zip(frame.query_id, frame.gold)) == {q: v[1] for q, v in HAND[kind].items()}
        row = table.loc[method]
        assert row.n_queries == 6 and row.n_users == 2
        if kind == "classification":
            from sklearn.metrics import f1_score

            stripped = [p.strip() for p in preds]
            assert row.accuracy == pytest.approx(np.mean([g == p for g, p in zip(golds, stripped)]))
            assert row.f1 == pytest.approx(f1_score(golds, stripped, labels=list(HAND_LABELS[kind]),
                                                    average="macro", zero_division=0))
        elif kind == "rating":
            # LaMP's rule (headline): float() of the whole answer; unparseable: the end of 1..5
            # farther from the gold, so "4 stars" is unparseable. Lenient diagnostic: reads it as 4.
            def far(g):
                return 1.0 if float(g) > 3 else 5.0

            def lamp(p, g):
                try:
                    return float(p.strip())
                except ValueError:
                    return far(g)

            gold_v = np.array([float(g) for g in golds])
            strict = np.array([lamp(p, g) for g, p in zip(golds, preds)]) - gold_v
            assert row.mae == pytest.approx(np.abs(strict).mean())
            assert row.rmse == pytest.approx(np.sqrt(np.mean(strict**2)))
            values = [float(p.split()[0]) if p[:1].isdigit() else far(g) for g, p in zip(golds, preds)]
            err = np.array(values) - gold_v
            assert row.mae_lenient == pytest.approx(np.abs(err).mean())
            assert row.rmse_lenient == pytest.approx(np.sqrt(np.mean(err**2)))
            expected = np.array([v - 0.25 if p[:1].isdigit() else 3.0 for v, p in zip(values, preds)])
            assert row.expected_mae == pytest.approx(np.abs(expected - [float(g) for g in golds]).mean())
        else:
            from rouge_score.rouge_scorer import RougeScorer

            scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
            scores = [scorer.score(g, p) for g, p in zip(golds, preds)]
            assert row.rouge1 == pytest.approx(np.mean([s["rouge1"].fmeasure for s in scores]))
            assert row.rougeL == pytest.approx(np.mean([s["rougeL"].fmeasure for s in scores]))
    # hand values of the clearest cases
    if kind == "classification":
        assert (table.loc["base", "accuracy"], table.loc["perfit", "accuracy"]) == pytest.approx((2 / 6, 5 / 6))
        # golds: sports 2, travel 1, crime 3 (unequal supports: macro differs from weighted)
        # base always says sports: sports F1 = 2*2/(2*2+4) = 1/2; travel, crime 0
        assert table.loc["base", "f1"] == pytest.approx(0.5 / 3)
        # stage 1: sports p=1 r=1/2 -> 2/3; travel p=1/3 r=1 -> 1/2; crime p=1 r=1/3 -> 1/2
        # ("banana" is out of the label set: wrong, and no label's prediction)
        assert table.loc["stage1", "f1"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
        assert table.loc["stage1", "accuracy"] == pytest.approx(3 / 6)
        # perfit: sports p=2/3 r=1 -> 4/5; travel 1; crime p=1 r=2/3 -> 4/5 (support-weighted: 5/6)
        assert table.loc["perfit", "f1"] == pytest.approx((4 / 5 + 1 + 4 / 5) / 3)
    elif kind == "rating":
        assert table.loc["base", "mae"] == pytest.approx((2 + 1 + 2 + 2 + 1 + 2) / 6)
        # stage 1 (LaMP's rule): errors 1, |5-2|, |5-1| ("4 stars" is unparseable: the far end), 0, 1, |1-5|
        assert table.loc["stage1", "mae"] == pytest.approx((1 + 3 + 4 + 0 + 1 + 4) / 6)
        assert table.loc["stage1", "rmse"] == pytest.approx(np.sqrt((1 + 9 + 16 + 0 + 1 + 16) / 6))
        # lenient diagnostic: "4 stars" reads as 4, error 3
        assert table.loc["stage1", "mae_lenient"] == pytest.approx((1 + 3 + 3 + 0 + 1 + 4) / 6)
        assert table.loc["stage1", "rmse_lenient"] == pytest.approx(np.sqrt((1 + 9 + 9 + 0 + 1 + 16) / 6))
    else:
        assert table.loc["base", "rouge1"] < table.loc["stage1", "rouge1"] < table.loc["perfit", "rouge1"]


def test_methods_needing_a_fit_are_skipped_without_one():
    loaded = tiny_model("llama")
    task, split = planted_task(4)
    result = evaluate_methods(loaded, task, split, None, EvalConfig(methods=("base", "stage1", "perfit")))
    assert list(result.table.method) == ["base"]
    with pytest.raises(ConfigError, match="methods\\[0\\]: expected one of"):
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
