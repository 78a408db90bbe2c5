"""LaMP metrics against values computed by hand on small crafted predictions."""

from __future__ import annotations

import json
import math

import pytest

from perfit_probe.errors import ConfigError, DataError
from perfit_probe.evaluation.metrics import (
    DIAGNOSTICS,
    HIGHER_IS_BETTER,
    METRICS,
    classification_scores,
    lamp_task_id,
    parse_rating,
    primary_metric,
    rating_scores,
    read_predictions,
    rouge_scores,
    score_files,
    score_task,
    worst_rating,
    write_predictions,
)

LABELS = ["sports", "travel", "crime"]


def test_accuracy_and_macro_f1_by_hand():
    golds = ["sports", "sports", "travel", "crime"]
    preds = [" sports ", "travel", "travel", "crime"]
    out = classification_scores(golds, preds, LABELS)
    assert out["accuracy"] == pytest.approx(3 / 4)
    # sports: tp 1, fp 0, fn 1 -> F1 2/3; travel: tp 1, fp 1, fn 0 -> 2/3; crime: 1.
    assert out["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert out["out_of_set"] == 0


def test_out_of_set_prediction_is_wrong_and_counts_in_f1():
    golds = ["sports", "travel", "crime", "crime"]
    preds = ["sports", "Travel", "banana", ""]  # case matters, as in LaMP
    out = classification_scores(golds, preds, LABELS)
    assert out["accuracy"] == pytest.approx(1 / 4)
    # sports 1; travel tp 0 -> 0; crime tp 0 -> 0 (out-of-set never counts as a label).
    assert out["f1"] == pytest.approx(1 / 3)
    assert out["out_of_set"] == pytest.approx(3 / 4)


def test_label_never_seen_scores_zero_in_macro_f1():
    out = classification_scores(["sports", "sports"], ["sports", "sports"], LABELS)
    assert out["accuracy"] == 1.0
    assert out["f1"] == pytest.approx(1 / 3)  # travel and crime: 0 each, as sklearn with labels=


def test_gold_outside_label_set_is_a_data_error():
    with pytest.raises(DataError, match="not in the label set"):
        classification_scores(["sports", "weather"], ["sports", "sports"], LABELS)


@pytest.mark.parametrize(
    ("text", "parse", "value"),
    [("4", "lamp", 4.0), (" 3.5 ", "lamp", 3.5), ("4.", "lamp", 4.0), ("1e0", "lamp", 1.0),
     ("4 stars", "lamp", None), ("Rating: 2", "lamp", None), ("", "lamp", None),
     ("nan", "lamp", None), ("inf", "lamp", None),
     ("4 stars", "first_number", 4.0), ("Rating: 2.", "first_number", 2.0),
     ("five", "first_number", None), ("-1", "first_number", -1.0)],
)
def test_parse_rating(text, parse, value):
    assert parse_rating(text, parse) == value


def test_worst_rating_rule():
    assert worst_rating(1) == 5 and worst_rating(2) == 5 and worst_rating(4) == 1 and worst_rating(5) == 1
    assert worst_rating(3) == 5  # a tie goes to 5 as in LaMP's `abs(1-y) > abs(5-y)`


def test_mae_rmse_with_unparseable_by_hand():
    """Headline mae/rmse read ratings as LaMP does (float of the text); the lenient first-number
    reading is reported beside them."""
    golds = ["5", "2", "4", "1"]
    preds = ["4", "no idea", "4", "3 stars"]
    out = rating_scores(golds, preds)
    # LaMP: errors 1, |5-2| = 3 ("no idea" -> 5, farther from 2), 0, |5-1| = 4 ("3 stars" -> 5)
    assert out["mae"] == pytest.approx((1 + 3 + 0 + 4) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 9 + 0 + 16) / 4))
    assert out["unparseable"] == pytest.approx(2 / 4)
    assert out["mean_pred"] == pytest.approx((4 + 5 + 4 + 5) / 4)
    # lenient (first number): "3 stars" reads 3, error 2
    assert out["mae_lenient"] == pytest.approx((1 + 3 + 0 + 2) / 4)
    assert out["rmse_lenient"] == pytest.approx(math.sqrt((1 + 9 + 0 + 4) / 4))
    assert out["unparseable_lenient"] == pytest.approx(1 / 4)


def test_headline_rating_metric_is_lamps_parse():
    # gold 4, "4 stars": LaMP cannot read it -> 1 (farther from 4 than 5), error 3; lenient reads 4
    out = score_task("rating", ["4"], ["4 stars"], [str(i) for i in range(1, 6)])
    assert (out["mae"], out["rmse"], out["mae_lenient"], out["rmse_lenient"]) == (3.0, 3.0, 0.0, 0.0)
    # clean answers: both readings agree
    clean = score_task("rating", ["4", "2"], ["3", " 2.5 "])
    assert clean["mae"] == clean["mae_lenient"] == pytest.approx((1 + 0.5) / 2)
    assert clean["rmse"] == clean["rmse_lenient"] == pytest.approx(math.sqrt((1 + 0.25) / 2))
    assert METRICS["rating"] == ("mae", "rmse") and "mae_lenient" in DIAGNOSTICS["rating"]
    assert not HIGHER_IS_BETTER["mae_lenient"]


def test_score_task_dispatch_and_rating_scale_from_labels():
    assert score_task("classification", ["a"], ["a"], ["a", "b"])["accuracy"] == 1
    # scale 1..10: gold 3 unparseable -> 10, error 7
    assert score_task("rating", ["3"], ["?"], [str(i) for i in range(1, 11)])["mae"] == 7
    assert primary_metric("rating") == "mae"
    with pytest.raises(ConfigError):
        score_task("regression", ["1"], ["1"])
    with pytest.raises(ConfigError):
        score_task("classification", ["a"], ["a"])
    with pytest.raises(DataError):
        score_task("rating", ["1", "2"], ["1"])


def test_rouge_by_hand():
    golds = ["the cat sat on the mat", "a b c d"]
    preds = ["the cat sat", "d c b a"]
    out = rouge_scores(golds, preds)
    # pair 1: unigram overlap 3, P 3/3, R 3/6 -> F 2/3; LCS 3 -> same 2/3.
    # pair 2: unigram F 1; LCS 1 -> P 1/4, R 1/4, F 1/4.
    assert out["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["rougeL"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    # stemming changes matches: "cats" vs "cat"
    assert rouge_scores(["cats running"], ["cat run"], use_stemmer=True)["rouge1"] == pytest.approx(1.0)
    assert rouge_scores(["cats running"], ["cat run"])["rouge1"] == 0.0


def test_prediction_files_round_trip_and_scoring(tmp_path):
    write_predictions(tmp_path / "golds.json", "LaMP-3", ["q1", "q2"], ["5", "1"])
    write_predictions(tmp_path / "preds.json", "LaMP-3", ["q2", "q1"], ["2", "oops"], meta={"method": "x"})
    data = json.loads((tmp_path / "preds.json").read_text())
    assert data["task"] == "LaMP_3" and data["golds"][0] == {"id": "q2", "output": "2"}
    task, rows = read_predictions(tmp_path / "preds.json")
    assert task == "LaMP_3" and rows == {"q2": "2", "q1": "oops"}
    out = score_files("rating", tmp_path / "golds.json", tmp_path / "preds.json")
    assert out["mae"] == pytest.approx((4 + 1) / 2)  # q1: gold 5, unparseable -> 1; q2: |2-1|
    write_predictions(tmp_path / "short.json", "LaMP-3", ["q1"], ["5"])
    with pytest.raises(DataError, match="ids do not match"):
        score_files("rating", tmp_path / "golds.json", tmp_path / "short.json")
    with pytest.raises(DataError, match="duplicate"):
        write_predictions(tmp_path / "dup.json", "LaMP-3", ["a", "a"], ["1", "2"])
    assert lamp_task_id("LaMP-2M") == "LaMP_2" and lamp_task_id("movielens") == "movielens"
