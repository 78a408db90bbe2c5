"""Trivial baselines: hand-computed values on hand-made tasks, and their place in every evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perfit_probe.config import EvalConfig, UncertaintyConfig
from perfit_probe.data.records import ProfileItem, Query, TaskData, TaskSpec, User
from perfit_probe.data.splits import Split
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.baselines import (
    BASELINES,
    baseline_predictions,
    majority_label,
    nearest_label,
    skip_reason,
)
from perfit_probe.evaluation.evaluate import METHODS, evaluate_methods
from perfit_probe.plotting.eval_figures import plot_intervals, read_uncertainty, save_eval_figures
from perfit_probe.stages.eval_results import write_results
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

RATING = TaskSpec(name="hand-rating", kind="rating", labels=("1", "2", "3", "4", "5"),
                  profile_fields=("text", "score"), item_template="{text}: {score}",
                  retrieval_fields=("text",), example_output="score")
TAGS = ("x", "y", "z")
TAGGING = TaskSpec(name="hand-tags", kind="classification", labels=TAGS, profile_fields=("text", "tag"),
                   item_template="{text}: {tag}", retrieval_fields=("text",), example_output="tag")
TITLES = TaskSpec(name="hand-titles", kind="generation", labels=None, profile_fields=("title", "text"),
                  item_template="{title}", retrieval_fields=("text",), example_output="title")


def user(uid: str, outputs: list[str], field: str, heldout: list[str] = (), texts: list[str] | None = None) -> User:
    """A user whose profile items have these outputs; each held-out output is a query with its own item."""
    texts = texts or [f"item {i} of {uid}" for i in range(len(outputs) + len(heldout))]
    items = [ProfileItem(f"{uid}i{i}", {"text": texts[i], field: o}) for i, o in enumerate([*outputs, *heldout])]
    queries = [Query(f"{uid}q{j}", f"query about {texts[len(outputs) + j]}", o, item_id=f"{uid}i{len(outputs) + j}")
               for j, o in enumerate(heldout)]
    # one training query too, on the first item (test users keep at least one)
    queries.append(Query(f"{uid}train", "train", outputs[0], item_id=f"{uid}i0"))
    return User(uid, items, queries)


def split_of(train: list[str], test: list[User]) -> Split:
    return Split(tuple(train), tuple(u.id for u in test),
                 {u.id: tuple(q.id for q in u.queries if q.id != f"{u.id}train") for u in test}, 0)


def rating_task() -> tuple[TaskData, Split]:
    """Users a, b (test) and t1, t2 (train), with hand-computable statistics.

    a: history 1, 2, 2, 5 (two held-out items rated 5 must not count): mean 2.5 -> "3" (half
       up), median 2 -> "2", majority "2";
    b: history 4, 3: mean = median = 3.5 -> "4", majority tie 3/4 -> "3" (label order);
    pool t1 + t2: 1, 1, 2 | 1, 2, 2, 5: counts 1:3, 2:3 -> majority "1" (label order);
       mean 14/7 = 2 -> "2".
    """
    a = user("a", ["1", "2", "2", "5"], "score", heldout=["5", "5"])
    b = user("b", ["4", "3"], "score", heldout=["1"])
    t1 = user("t1", ["1", "1", "2"], "score")
    t2 = user("t2", ["1", "2", "2", "5"], "score")
    return TaskData(RATING, [a, b, t1, t2]), split_of(["t1", "t2"], [a, b])


def test_rounding_and_majority_tie_rules():
    labels = ("1", "2", "3", "4", "5")
    assert nearest_label(2.5, labels) == "3" and nearest_label(3.5, labels) == "4"
    assert nearest_label(2.49, labels) == "2" and nearest_label(0.2, labels) == "1" and nearest_label(9, labels) == "5"
    assert majority_label(["4", "3", "4", "3"], list(labels)) == "3"
    assert majority_label(["z", "y", "z"], list(TAGS)) == "z"
    assert majority_label([], list(TAGS)) is None


def test_rating_baselines_hand_computed():
    task, split = rating_task()
    keys = [("a", "aq0"), ("a", "aq1"), ("b", "bq0")]

    def outputs(name):
        return baseline_predictions(name, task, split, keys).outputs

    assert outputs("user_mean") == ["3", "3", "4"]
    np.testing.assert_allclose(baseline_predictions("user_mean", task, split, keys).expected, [2.5, 2.5, 3.5])
    assert outputs("user_median") == ["2", "2", "4"]
    assert outputs("user_majority") == ["2", "2", "3"]
    assert outputs("global_majority") == ["1", "1", "1"]
    assert outputs("global_mean") == ["2", "2", "2"]
    np.testing.assert_allclose(baseline_predictions("global_mean", task, split, keys).expected, [2.0] * 3)
    assert baseline_predictions("user_median", task, split, keys).expected is None
    # default keys: every held-out query of the split's test users, in order
    assert len(baseline_predictions("user_mean", task, split).outputs) == 3


def test_user_without_history_falls_back_to_the_train_pool():
    task, split = rating_task()
    lonely = User("c", [ProfileItem("ci0", {"text": "only", "score": "4"})],
                  [Query("cq0", "q", "4", item_id="ci0"), Query("ctrain", "t", "4")])
    task = TaskData(RATING, [*task.users, lonely])
    split = Split(split.train_users, (*split.test_users, "c"), {**split.heldout, "c": ("cq0",)}, 0)
    # c's only item is held out: its history is empty -> the pool's statistic
    assert baseline_predictions("user_mean", task, split, [("c", "cq0")]).outputs == ["2"]
    assert baseline_predictions("user_majority", task, split, [("c", "cq0")]).outputs == ["1"]


def test_classification_baselines_and_out_of_set_history():
    a = user("a", ["y", "z", "z", "y", "other"], "tag", heldout=["z", "z", "z"])  # y/z tie -> "y"
    b = user("b", ["z", "x", "z"], "tag", heldout=["x"])
    t1 = user("t1", ["z", "x"], "tag")
    t2 = user("t2", ["x", "nope"], "tag")
    task = TaskData(TAGGING, [a, b, t1, t2])
    split = split_of(["t1", "t2"], [a, b])
    keys = [("a", "aq0"), ("b", "bq0")]
    assert baseline_predictions("user_majority", task, split, keys).outputs == ["y", "z"]
    assert baseline_predictions("global_majority", task, split, keys).outputs == ["x", "x"]
    assert skip_reason("user_mean", TAGGING) is not None and skip_reason("user_majority", TAGGING) is None
    with pytest.raises(ConfigError):
        baseline_predictions("user_mean", task, split, keys)


def test_label_baselines_skip_where_items_carry_no_task_label():
    from dataclasses import replace

    from perfit_probe.data.tasks import task_spec

    lamp1 = task_spec("LaMP-1")
    assert not lamp1.example_is_task
    assert all(skip_reason(name, lamp1) is not None for name in BASELINES)
    lamp7 = task_spec("LaMP-7")
    assert skip_reason("bm25_top1", lamp7) is None  # a generation task: the nearest tweet is an output
    assert skip_reason("user_majority", replace(TAGGING, example_output=None)) is not None
    for name in ("LaMP-2M", "LaMP-2N", "LaMP-3", "movielens", "synthetic"):
        assert task_spec(name).example_output in task_spec(name).profile_fields


def test_bm25_top1_picks_the_obviously_matching_item():
    texts = ["cooking pasta with tomato sauce at home", "quantum entanglement of photons in optical fibres",
             "the football season opener ended in a draw", "quantum entanglement of photons in optical fibres"]
    titles = ["Easy pasta", "Entangled photons travel far", "A dull draw", "HELD OUT title"]
    u = user("a", titles[:3], "title", heldout=titles[3:], texts=texts)
    t = user("t", ["whatever"], "title")
    task = TaskData(TITLES, [u, t])
    split = split_of(["t"], [u])
    # the query's own item (same text, held out) is never used; the matching history item is
    assert baseline_predictions("bm25_top1", task, split, [("a", "aq0")]).outputs == ["Entangled photons travel far"]
    # ratings: the score of the nearest item (a one-nearest-neighbour)
    ratings = user("r", ["1", "5", "2"], "score", heldout=["4"],
                   texts=["dull grey film", "bright sparkling musical comedy", "slow drama", "sparkling musical"])
    pool = user("p", ["3"], "score")
    task = TaskData(RATING, [ratings, pool])
    assert baseline_predictions("bm25_top1", task, split_of(["p"], [ratings])).outputs == ["5"]


def test_baselines_run_in_every_evaluation_and_results_carry_intervals(tmp_path):
    assert set(BASELINES) <= set(METHODS) and EvalConfig().methods == METHODS
    loaded = tiny_model("llama")
    task, split = rating_task()
    config = EvalConfig(methods=("base", *BASELINES), uncertainty=UncertaintyConfig(n_boot=200, n_perm=200))
    result = evaluate_methods(loaded, task, split, None, config)
    table = result.table.set_index("method")
    assert list(table.index) == ["base", *BASELINES]
    assert (table.loc[list(BASELINES), "params_per_user"] == 0).all()
    assert (table.loc[list(BASELINES), "decoding"] == "none").all()
    golds = result.predictions[result.predictions.method == "user_mean"]
    # hand values: a -> "3", "3" (golds 5, 5), b -> "4" (gold 1)
    assert list(golds.output) == ["3", "3", "4"] and table.loc["user_mean", "mae"] == pytest.approx(7 / 3)
    assert table.loc["user_mean", "expected_mae"] == pytest.approx((2.5 + 2.5 + 2.5) / 3)
    write_results(result, tmp_path, RATING, config=config)
    intervals, differences = read_uncertainty(tmp_path)
    assert set(intervals.method) == set(table.index) and set(intervals.metric) >= {"mae", "rmse"}
    assert (intervals.ci_low <= intervals.estimate + 1e-12).all()
    assert (intervals.estimate <= intervals.ci_high + 1e-12).all()
    mae = intervals[intervals.metric == "mae"].set_index("method").estimate
    assert mae.to_dict() == pytest.approx(table["mae"].to_dict())
    # no PerFit in this run: differences only against the best baseline
    assert set(differences.against) == {"best_baseline"}
    best = differences.reference.iloc[0]
    assert best in BASELINES and mae[best] == mae[list(BASELINES)].min()
    text = (tmp_path / "results.md").read_text()
    assert "| user_mean | 2.333 [" in text and "best trivial baseline" in text.lower()
    assert "(best baseline)" in text and "p=" in text
    written = save_eval_figures(tmp_path, tmp_path / "figures")
    assert [p.name for p in written] == ["eval_intervals.png", "eval_differences.png"]
    fig = plot_intervals(intervals)
    assert len(fig.axes) == intervals.metric.nunique()
    # generation: bm25_top1 runs, label baselines are skipped
    titles = user("g", ["Easy pasta", "Entangled photons", "A dull draw"], "title", heldout=["Photons"],
                  texts=["pasta tomato", "quantum photons", "football draw", "quantum photons"])
    other = user("h", ["x"], "title")
    gen = evaluate_methods(loaded, TaskData(TITLES, [titles, other]), split_of(["h"], [titles]), None,
                           EvalConfig(methods=tuple(BASELINES)))
    assert list(gen.table.method) == ["bm25_top1"] and list(gen.predictions.output) == ["Entangled photons"]
    assert isinstance(gen.predictions, pd.DataFrame)
