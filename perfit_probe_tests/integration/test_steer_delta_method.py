"""The training-free ``steer_delta`` evaluation method: a user's delta added at the last prompt token."""

from __future__ import annotations

import torch

from perfit_probe.config import EvalConfig
from perfit_probe.deltas import Deltas
from perfit_probe.evaluation.evaluate import evaluate_methods
from perfit_probe_tests.planted import planted_task
from perfit_probe_tests.tiny import tiny_model


def _deltas(users, vectors, site="blocks.3.hook_resid_post"):
    return Deltas(user_ids=list(users), sites=[site], enhanced=torch.stack(vectors).unsqueeze(1).float())


def test_zero_deltas_give_the_base_model_and_a_planted_delta_moves_its_user():
    loaded = tiny_model("llama")
    task, split = planted_task()
    users = list(split.test_users)
    d = loaded.d_model
    config = EvalConfig(methods=("base", "steer_delta"))
    zero = evaluate_methods(loaded, task, split, None, config, deltas=_deltas(users, [torch.zeros(d)] * len(users)))
    preds = zero.predictions.pivot_table(index="query_id", columns="method", values="expected")
    torch.testing.assert_close(torch.tensor(preds["steer_delta"].values), torch.tensor(preds["base"].values))
    # at the last layer, a large vector along the unembedding row of " 5" (after the final norm's
    # scale) makes that user's answers 5, and leaves the others as the base model has them
    five = loaded.tokenizer(" 5", add_special_tokens=False)["input_ids"][0]
    direction = loaded.model.lm_head.weight[five].detach() / loaded.model.model.norm.weight.detach()
    vectors = [torch.zeros(d)] * len(users)
    vectors[0] = 1e3 * direction / direction.norm()
    planted = evaluate_methods(loaded, task, split, None, config, deltas=_deltas(users, vectors))
    rows = planted.predictions[planted.predictions.method == "steer_delta"]
    assert set(rows[rows.user_id == users[0]].output) == {"5"}
    base = planted.predictions[planted.predictions.method == "base"].set_index("query_id").output
    others = rows[rows.user_id != users[0]].set_index("query_id").output
    assert (others == base[others.index]).all()
    table = planted.table.set_index("method")
    assert table.loc["steer_delta", "params_per_user"] == 0


def test_without_deltas_the_method_is_skipped():
    loaded = tiny_model("llama")
    task, split = planted_task()
    result = evaluate_methods(loaded, task, split, None, EvalConfig(methods=("base", "steer_delta")))
    assert list(result.table.method) == ["base"]
