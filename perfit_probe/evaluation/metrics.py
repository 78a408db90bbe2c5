"""LaMP metrics, computed the way the benchmark's official evaluation script computes them.

The reference is ``eval/evaluation.py`` of the LaMP repository (also copied into OPPU):

- **classification** (LaMP-1, LaMP-2): predictions and golds are stripped; each is mapped to
  its index in the task's label set, an out-of-set string to ``-1``. Accuracy is the share of
  exact matches; macro-F1 is ``f1_score(..., labels=range(n_labels), average="macro")``, the
  mean over the label set of per-label F1 (a label never predicted nor gold scores 0). An
  out-of-set prediction is therefore always wrong. (LaMP maps an out-of-set *gold* to ``-1``
  too, so an out-of-set prediction would "match" it; a gold outside the label set is a data
  error here and raises ``DataError``.)
- **rating** (LaMP-3): the stripped prediction is read with the benchmark's rule, ``float``
  of the whole text (``parse_rating(..., "lamp")``); non-finite values (``"nan"``, ``"inf"``)
  count as unparseable here. An unparseable prediction scores as whichever of 1 or 5 (the
  scale's ends) is farther from the gold, a tie going to 5 (LaMP's
  ``1.0 if abs(1 - y) > abs(5 - y) else 5.0``)::

      MAE  = mean |pred - gold|,      RMSE = sqrt(mean (pred - gold)^2)

  These are the headline ``mae`` and ``rmse``. Beside them, as diagnostics, ``mae_lenient``
  and ``rmse_lenient`` read the *first number* in the text instead (``"4 stars"`` counts as
  4; unparseable still scores at the far end), ``unparseable`` and ``unparseable_lenient``
  are the shares of predictions each rule cannot read. For a clean answer such as ``"4"``
  (always the case under constrained decoding) the two rules agree.

- **generation** (LaMP-4/5/7): ROUGE-1 and ROUGE-L F-measure of ``rouge_score``, averaged over
  examples. The benchmark calls Hugging Face ``evaluate``'s ``rouge`` with its defaults, i.e.
  ``use_stemmer=False``; ``use_stemmer`` is an option here. (``evaluate`` reports the median of
  a bootstrap of the mean, which is random; this module reports the plain mean.)

Prediction files use the LaMP shape ``{"task": "LaMP_3", "golds": [{"id", "output"}]}``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from perfit_probe._io import atomic_write_text
from perfit_probe.errors import ConfigError, DataError

TASK_KINDS = ("classification", "rating", "generation")
RATING_PARSES = ("lamp", "first_number")
"""Readings of a predicted rating: LaMP's (the headline metrics) and the lenient one (diagnostics)."""
OUT_OF_SET = -1
"""Index an out-of-set prediction maps to; never equal to a gold index."""

METRICS = {
    "classification": ("accuracy", "f1"),
    "rating": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}
"""The LaMP metrics of each task kind; the first is the headline metric."""

DIAGNOSTICS = {
    "classification": ("out_of_set",),
    "rating": ("mae_lenient", "rmse_lenient", "unparseable"),
    "generation": (),
}
"""Columns reported beside the LaMP metrics of each task kind (not LaMP's definitions)."""

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False,
                    "mae_lenient": False, "rmse_lenient": False, "rouge1": True, "rougeL": True}
"""Direction of each metric."""

_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def primary_metric(kind: str) -> str:
    """Headline metric of a task kind: accuracy, MAE or ROUGE-1."""
    _check_kind(kind)
    return METRICS[kind][0]


def _check_kind(kind: str) -> None:
    if kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}: choose from {TASK_KINDS}")


def _check_lengths(golds: Sequence, preds: Sequence) -> None:
    if len(golds) != len(preds):
        raise DataError(f"{len(golds)} golds but {len(preds)} predictions: they must pair up one to one")
    if not golds:
        raise DataError("no predictions to score")


# ----------------------------------------------------------------------------------------
# Classification


def label_indices(texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Index of each stripped text in ``labels``, ``OUT_OF_SET`` (-1) when absent."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(str(t).strip(), OUT_OF_SET) for t in texts], dtype=np.int64)


def classification_scores(golds: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy and macro-F1 over ``labels`` (out-of-set predictions are wrong)."""
    # scikit-learn takes seconds to import: deferred until a classification task is scored
    from sklearn.metrics import accuracy_score, f1_score

    _check_lengths(golds, preds)
    labels = [str(label).strip() for label in labels]
    if not labels:
        raise ConfigError("classification metrics need a non-empty label set")
    gold_idx = label_indices(golds, labels)
    if (gold_idx == OUT_OF_SET).any():
        bad = next(g for g, i in zip(golds, gold_idx) if i == OUT_OF_SET)
        raise DataError(f"gold output {bad!r} is not in the label set {labels}: fix the task's labels")
    pred_idx = label_indices(preds, labels)
    return {
        "accuracy": float(accuracy_score(gold_idx, pred_idx)),
        "f1": float(f1_score(gold_idx, pred_idx, labels=list(range(len(labels))), average="macro",
                             zero_division=0.0)),
        "out_of_set": float((pred_idx == OUT_OF_SET).mean()),
    }


# ----------------------------------------------------------------------------------------
# Ratings


def parse_rating(text: str, parse: str) -> float | None:
    """A predicted rating as a number, or ``None`` when it cannot be read.

    ``lamp``: ``float`` of the whole stripped text (the benchmark's rule, the headline);
    ``first_number``: the first number in the text (the lenient diagnostic). Non-finite
    values count as unparseable.
    """
    if parse not in RATING_PARSES:
        raise ConfigError(f"unknown rating parse {parse!r}: choose from {RATING_PARSES}")
    text = str(text).strip()
    if parse == "lamp":
        try:
            value = float(text)
        except ValueError:
            return None
    else:
        match = _NUMBER_RE.search(text)
        if match is None:
            return None
        value = float(match.group(0))
    return value if math.isfinite(value) else None


def worst_rating(gold: float, low: float = 1.0, high: float = 5.0) -> float:
    """The end of the scale farther from ``gold`` (``high`` on a tie), LaMP's unparseable score."""
    return low if abs(low - gold) > abs(high - gold) else high


def rating_values(golds: Sequence[str], preds: Sequence[str], parse: str,
                  scale: tuple[float, float] = (1.0, 5.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gold and predicted ratings as floats (read by ``parse``), and a mask of unparseable predictions."""
    _check_lengths(golds, preds)
    gold_v, pred_v, bad = [], [], []
    for gold, pred in zip(golds, preds):
        try:
            g = float(str(gold).strip())
        except ValueError:
            raise DataError(f"gold rating {gold!r} is not a number: fix the task's outputs") from None
        p = parse_rating(pred, parse)
        bad.append(p is None)
        gold_v.append(g)
        pred_v.append(worst_rating(g, *scale) if p is None else p)
    return np.array(gold_v), np.array(pred_v), np.array(bad)


def rating_scores(golds: Sequence[str], preds: Sequence[str], scale: tuple[float, float] = (1.0, 5.0)) -> dict:
    """MAE and RMSE under LaMP's parse, and the lenient (first-number) MAE and RMSE beside them;
    unparseable predictions scored at the far end of the scale."""
    out = {}
    for parse, suffix in (("lamp", ""), ("first_number", "_lenient")):
        gold_v, pred_v, bad = rating_values(golds, preds, parse, scale)
        err = pred_v - gold_v
        out[f"mae{suffix}"] = float(np.abs(err).mean())
        out[f"rmse{suffix}"] = float(np.sqrt((err ** 2).mean()))
        out[f"unparseable{suffix}"] = float(bad.mean())
        if parse == "lamp":
            out["mean_pred"] = float(pred_v.mean())
    return out


# ----------------------------------------------------------------------------------------
# Generation


def rouge_scores(golds: Sequence[str], preds: Sequence[str], use_stemmer: bool = False) -> dict:
    """Mean ROUGE-1 and ROUGE-L F-measure (``rouge_score``; nothing downloaded)."""
    # rouge_score (with nltk) takes seconds to import: deferred until a generation task is scored
    from rouge_score.rouge_scorer import RougeScorer

    _check_lengths(golds, preds)
    scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    r1, rl = [], []
    for gold, pred in zip(golds, preds):
        score = scorer.score(str(gold).strip(), str(pred).strip())
        r1.append(score["rouge1"].fmeasure)
        rl.append(score["rougeL"].fmeasure)
    return {"rouge1": float(np.mean(r1)), "rougeL": float(np.mean(rl))}


# ----------------------------------------------------------------------------------------
# Dispatch and files


def score_task(kind: str, golds: Sequence[str], preds: Sequence[str],
               labels: Sequence[str] | None = None, *, use_stemmer: bool = False) -> dict:
    """The LaMP metrics of a task kind, plus diagnostics (``out_of_set``, ``mae_lenient``, ...).

    ``labels`` is required for classification; for ratings it sets the scale ends
    (min and max of the numeric labels, default 1..5).
    """
    _check_kind(kind)
    if kind == "classification":
        if labels is None:
            raise ConfigError("classification metrics need the task's label set")
        return classification_scores(golds, preds, labels)
    if kind == "rating":
        scale = (1.0, 5.0)
        if labels:
            try:
                values = [float(label) for label in labels]
                scale = (min(values), max(values))
            except ValueError:
                raise ConfigError(f"rating labels must be numbers, got {list(labels)}") from None
        return rating_scores(golds, preds, scale)
    return rouge_scores(golds, preds, use_stemmer)


def lamp_task_id(name: str) -> str:
    """``LaMP-2M`` -> ``LaMP_2``, as the LaMP files name tasks; other names unchanged."""
    match = re.fullmatch(r"LaMP[-_](\d+)[A-Za-z]*", name)
    return f"LaMP_{match.group(1)}" if match else name


def write_predictions(path: Path, task: str, ids: Sequence[str], outputs: Sequence[str],
                      meta: dict | None = None) -> None:
    """Write ``{"task", "golds": [{"id", "output"}], "meta"}`` (the LaMP shape), atomically."""
    if len(ids) != len(outputs):
        raise DataError(f"{len(ids)} ids but {len(outputs)} outputs")
    if len(set(ids)) != len(ids):
        raise DataError("duplicate ids in predictions: each query must appear once")
    data = {"task": lamp_task_id(task),
            "golds": [{"id": str(i), "output": str(o)} for i, o in zip(ids, outputs)]}
    if meta:
        data["meta"] = meta
    atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")


def read_predictions(path: Path) -> tuple[str, dict[str, str]]:
    """Read a LaMP-shaped predictions or outputs file: ``(task, {id: output})``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = {str(row["id"]): str(row["output"]) for row in data["golds"]}
        return str(data["task"]), rows
    except FileNotFoundError:
        raise DataError(f"{path}: predictions file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a LaMP predictions file ({type(exc).__name__}: {exc})") from None


def score_files(kind: str, gold_path: Path, pred_path: Path, labels: Sequence[str] | None = None,
                *, use_stemmer: bool = False) -> dict:
    """Score a predictions file against a LaMP outputs file (ids must match exactly)."""
    gold_task, golds = read_predictions(gold_path)
    pred_task, preds = read_predictions(pred_path)
    if gold_task != pred_task:
        raise DataError(f"task {pred_task!r} of {pred_path} does not match {gold_task!r} of {gold_path}")
    if set(golds) != set(preds):
        missing = sorted(set(golds) - set(preds))[:3]
        raise DataError(f"prediction ids do not match gold ids (e.g. missing {missing}) in {pred_path}")
    ids = sorted(golds)
    return score_task(kind, [golds[i] for i in ids], [preds[i] for i in ids], labels,
                      use_stemmer=use_stemmer)
