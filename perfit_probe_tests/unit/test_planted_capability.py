"""Issue 14, capability check (no model): the planted per-user-bias task, its exact noise floor
against a Monte-Carlo estimate, the per-user recovery table and the verdict rules on hand-made
summaries."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from perfit_probe.config import FIT_DATA_FIELDS, CapabilityConfig, FitConfig
from perfit_probe.data.planted import (
    SCALE, noise_floor, planted_bias_task, planted_constants, planted_ratings, task_noise_floor,
)
from perfit_probe.data.tasks import TASKS
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.capability import (
    DEMO_FIT, CapabilitySummary, capability_verdict, per_user_table, planted_split, with_fit,
)


# ------------------------------------------------------------------ the planted task
def test_planted_task_records_and_constants():
    task = planted_bias_task(n_users=12, n_history=8, n_queries=3, p_off=0.2, seed=3)
    constants = task.ground_truth["user_constants"]
    assert task.spec is TASKS["movielens-rating"]
    assert [u.id for u in task.users] == list(constants)
    # every block of five consecutive users holds each constant once
    values = list(constants.values())
    assert sorted(values[:5]) == sorted(values[5:10]) == list(SCALE)
    for user in task.users:
        c = constants[user.id]
        assert len(user.profile) == 11 and len(user.queries) == 3
        assert len({item.id for item in user.profile}) == 11
        ratings = [int(item.fields["score"]) for item in user.profile]
        assert all(abs(r - c) <= 1 and 1 <= r <= 5 for r in ratings)
        by_id = {item.id: item for item in user.profile}
        for query in user.queries:  # a query is one of the last profile items, its gold that item's rating
            assert query.output == by_id[query.item_id].fields["score"]
            assert query.input.startswith("Predict the rating (1-5)")
            assert by_id[query.item_id].fields["title"] in query.input
        assert [i.id for i in user.profile[-3:]] == [q.item_id for q in user.queries]
    again = planted_bias_task(n_users=12, n_history=8, n_queries=3, p_off=0.2, seed=3)
    assert [u.profile for u in again.users] == [u.profile for u in task.users]
    assert planted_bias_task(n_users=12, n_history=8, n_queries=3, p_off=0.2, seed=4).users[0].profile != \
        task.users[0].profile


def test_noise_floor_formula_matches_monte_carlo():
    rng = np.random.default_rng(0)
    for p_off in (0.0, 0.1, 0.3, 0.5):
        for c in SCALE:
            ratings = planted_ratings(c, 200_000, p_off, rng)
            assert np.abs(ratings - c).mean() == pytest.approx(noise_floor(c, p_off), abs=4e-3)
            # the constant is the best constant prediction (the ratings' median)
            others = [np.abs(ratings - v).mean() for v in SCALE]
            assert min(others) >= np.abs(ratings - c).mean() - 1e-12
    assert noise_floor(1, 0.1) == noise_floor(5, 0.1) == pytest.approx(0.05)
    assert noise_floor(3, 0.1) == pytest.approx(0.1)


def test_task_noise_floor_weights_users_by_their_queries():
    task = planted_bias_task(n_users=5, n_history=2, n_queries=4, p_off=0.1, seed=0)
    # five users, one per constant: (2 * 0.05 + 3 * 0.1) / 5
    assert task.ground_truth["noise_floor"] == pytest.approx(0.08)
    assert task_noise_floor({"a": 1, "b": 3}, ["a", "b", "b", "b"], 0.2) == pytest.approx((0.1 + 3 * 0.2) / 4)


def test_planted_task_bad_options():
    with pytest.raises(ConfigError, match="p_off"):
        planted_bias_task(p_off=0.6)
    with pytest.raises(ConfigError, match="n_users"):
        planted_bias_task(n_users=1)
    with pytest.raises(ConfigError, match="not a rating"):
        noise_floor(6, 0.1)
    with pytest.raises(ConfigError, match="no queries"):
        task_noise_floor({}, [], 0.1)
    assert sorted(planted_constants(7, np.random.default_rng(1))[:5]) == list(SCALE)


# ------------------------------------------------------------------ the check's parts
def test_demo_fit_is_the_demos_recipe():
    from perfit_probe.pipeline import demo_config

    demo = demo_config().fit
    for f in dataclasses.fields(FitConfig):
        if f.name not in FIT_DATA_FIELDS:  # the planted task sets these
            assert getattr(DEMO_FIT, f.name) == getattr(demo, f.name), f.name
    assert CapabilityConfig().fit == DEMO_FIT


def test_per_user_table_and_recovery():
    rows = []
    for method, outputs in (("perfit", ["3", "3", "4"]), ("stage1", ["1", "1", "1"])):
        rows += [{"method": method, "user_id": "a", "query_id": f"q{i}", "gold": g, "output": o}
                 for i, (g, o) in enumerate(zip(["3", "3", "2"], outputs))]
    rows += [{"method": "perfit", "user_id": "b", "query_id": "r", "gold": "5", "output": "4"}]
    table = per_user_table(pd.DataFrame(rows), {"a": 3, "b": 5}, 0.1)
    a, b = table.set_index("user_id").loc["a"], table.set_index("user_id").loc["b"]
    assert a["mode_perfit"] == 3 and bool(a["recovered"]) and a["mae_perfit"] == pytest.approx(2 / 3)
    assert a["mae_stage1"] == pytest.approx(5 / 3) and a["floor"] == pytest.approx(0.1)
    assert not bool(b["recovered"]) and b["floor"] == pytest.approx(0.05)
    assert bool(a["stage1_misses"]) == (a["mode_stage1"] != 3)


def _summary(perfit, stage1=1.5, p=0.002, recovered=9, floor=0.05, missed=8, beyond=None):
    beyond = recovered - 2 if beyond is None else beyond  # stage 1 gets 2 users right, PerFit keeps them
    return CapabilitySummary(
        mae={"perfit": perfit, "stage1": stage1, "user_median": floor, "planted": floor}, noise_floor_expected=0.08,
        noise_floor_realised=floor, n_test_users=10, n_queries=60, recovered=recovered,
        recovered_share=recovered / 10, stage1_minus_perfit=stage1 - perfit, stage1_minus_perfit_ci=(0.0, 0.0),
        p_vs_stage1=p, margin=0.15, min_recovered=0.8, alpha=0.05, missed_by_stage1=missed,
        recovered_beyond_stage1=beyond)


def test_verdict_rules():
    assert capability_verdict(_summary(0.15))[0] == "learns"
    assert capability_verdict(_summary(0.25))[0] == "partial"  # beats stage 1, misses the floor
    assert capability_verdict(_summary(0.15, recovered=7))[0] == "partial"
    # 8 of 10 overall, but only 6 of the 8 that stage 1 misses (the 2 it gets right inflate the count)
    assert capability_verdict(_summary(0.15, recovered=8, beyond=6))[0] == "partial"
    assert capability_verdict(_summary(0.15, p=0.2))[0] == "no gain"  # no detectable gain over stage 1
    assert capability_verdict(_summary(1.6, stage1=1.5))[0] == "no gain"
    verdict, sentence = capability_verdict(_summary(1.6, stage1=1.5))
    assert "no detectable gain" in sentence and "1.600" in sentence and "0.050" in sentence
    assert "(7 of the 8 that stage 1 alone misses)" in sentence


def test_planted_split_and_bad_config():
    task = planted_bias_task(n_users=7, n_history=2, n_queries=2)
    split = planted_split(task, 5)
    assert split.train_users == ("p0", "p1", "p2", "p3", "p4") and split.test_users == ("p5", "p6")
    assert split.heldout["p5"] == tuple(q.id for q in task.user("p5").queries)
    with pytest.raises(ConfigError, match="n_train_users"):
        planted_split(task, 7)
    with pytest.raises(ConfigError, match="profile"):
        with_fit(CapabilityConfig(), personal_data="queries", n_heldout=2).validate()
    with pytest.raises(ConfigError, match="min_recovered"):
        replace(CapabilityConfig(), min_recovered=0)
    with pytest.raises(ConfigError, match="p_off"):
        CapabilityConfig(p_off=0.7)
    with pytest.raises(ConfigError, match="margin"):
        CapabilityConfig(margin="0.1")
