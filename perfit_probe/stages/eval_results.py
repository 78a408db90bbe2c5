"""``RUN/eval/``: the evaluation's results, predictions and uncertainty, merged with earlier ones.

``write_results`` writes ``results.csv``, ``results.md``, ``predictions.csv``, LaMP-format
``predictions/{method}.json``, and the uncertainty of every metric
(``perfit_probe.evaluation.uncertainty``): cluster-bootstrap intervals over test users
(``uncertainty.csv``) and paired differences from PerFit and from the best trivial baseline
with permutation p-values (``differences.csv``). ``write_lora_selection`` adds the per-user
LoRAs' model selection (``lora_selection.csv`` and a section of ``results.md``).

Re-evaluating a subset of the methods (``--methods base``) *merges* into ``RUN/eval/``: the
rows of the other methods stay, as long as they were evaluated on the same basis (the same
fit and model, and the same settings that every method shares, ``evaluation.json``). Results
of another basis cannot share a table: when they hold methods not evaluated now, they are
moved (never deleted) to ``RUN/eval/superseded/<time>/``, with a warning naming what differs.
``RUN/eval/checksums.json`` holds the SHA-256 of every result and prediction file, verified
before old results are merged.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from perfit_probe._io import atomic_write_text, read_json, to_jsonable, verify_checksums, write_checksums, write_json
from perfit_probe.config import EvalConfig
from perfit_probe.data.records import TaskSpec
from perfit_probe.errors import ArtifactError
from perfit_probe.evaluation.evaluate import METHODS, EvalResult, selection_summary
from perfit_probe.evaluation.metrics import DIAGNOSTICS, HIGHER_IS_BETTER, METRICS, write_predictions
from perfit_probe.evaluation.uncertainty import (
    Uncertainty,
    describe_uncertainty,
    differences_table,
    evaluation_uncertainty,
    with_intervals,
)
from perfit_probe.stages.markdown import markdown_table

log = logging.getLogger(__name__)

RESULT_FILES = ("results.csv", "predictions.csv", "evaluation.json")
"""Files of ``RUN/eval/`` that a later evaluation reads back to merge (with ``predictions/*.json``)."""
_PER_METHOD_FIELDS = ("methods", "batch_size", "lora", "lora_task", "uncertainty", "val_per_user", "val_seed")
"""``EvalConfig`` fields that do not change the other methods' numbers (not part of the basis)."""


def evaluation_basis(config: EvalConfig, **identity) -> dict:
    """What must be equal for two evaluations' rows to sit in one table: the ``EvalConfig``
    fields every method shares, plus ``identity`` (the fit and model fingerprints)."""
    shared = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _PER_METHOD_FIELDS}
    return to_jsonable({**shared, **identity})


def _method_order(methods) -> list[str]:
    """``methods`` in the order of ``METHODS`` (names not in it last, in their given order)."""
    known = {m: i for i, m in enumerate(METHODS)}
    unique = list(dict.fromkeys(methods))
    return sorted(unique, key=lambda m: (known.get(m, len(known)), unique.index(m)))


def verify_results(directory: Path) -> None:
    """``ArtifactError`` when a result or prediction file in ``directory`` differs from its checksum."""
    if (Path(directory) / "results.csv").is_file():
        verify_checksums(directory, error=ArtifactError, fix=f"delete {directory} and evaluate every method again")


def _set_aside(directory: Path) -> Path:
    """Move the result files of ``directory`` into ``directory/superseded/<UTC time>/``; return it."""
    target = directory / "superseded" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    target.mkdir(parents=True)
    for name in (*RESULT_FILES, "results.md", "checksums.json", "predictions", "uncertainty.csv",
                 "differences.csv", "lora_selection.csv"):
        if (directory / name).exists():
            shutil.move(directory / name, target / name)
    return target


def _read_previous(directory: Path, basis: dict | None, methods=()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The results and predictions already in ``directory`` that share ``basis`` (verified).

    Empty frames when there are none or when they come from another basis; in that case, if
    they hold methods other than ``methods`` (those evaluated now), they are moved aside
    (``_set_aside``) with a warning. ``ArtifactError`` when a result file is corrupt.
    """
    empty = pd.DataFrame(), pd.DataFrame()
    if not (directory / "results.csv").is_file():
        return empty
    verify_results(directory)
    fix = f"delete {directory} and evaluate every method again"
    try:
        table = pd.read_csv(directory / "results.csv", dtype={"method": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read the earlier results in {directory} ({exc}): {fix}".splitlines()[0]) from None
    previous = read_json(directory / "evaluation.json") if (directory / "evaluation.json").is_file() else {}
    old = previous.get("basis") or {}
    if basis is None or old != basis:
        held = [str(m) for m in table.get("method", pd.Series(dtype=str))]
        if set(held) - set(methods):  # rows that this evaluation does not replace: keep them aside
            differ = sorted(k for k in set(old) | set(basis or {}) if old.get(k) != (basis or {}).get(k))
            where = _set_aside(directory)
            log.warning("%s held results of %s evaluated with another %s: moved them to %s (they cannot share "
                        "a table with these)", directory, ", ".join(held), ", ".join(differ) or "basis", where)
        return empty
    try:
        text = {c: str for c in ("method", "user_id", "query_id", "gold", "output")}
        predictions = pd.read_csv(directory / "predictions.csv", dtype=text, keep_default_na=False,
                                  na_values={"expected": ["", "nan", "NaN"]})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read the earlier results in {directory} ({exc}): {fix}".splitlines()[0]) from None
    if "expected" in predictions.columns:
        predictions["expected"] = pd.to_numeric(predictions["expected"])
    return table, predictions


def write_results(result: EvalResult, directory: Path, spec: TaskSpec, basis: dict | None = None, *,
                  config: EvalConfig | None = None) -> pd.DataFrame:
    """Write ``results.csv``, ``results.md``, ``predictions.csv``, LaMP-format ``predictions/{method}.json``,
    the bootstrap intervals ``uncertainty.csv`` and the paired differences ``differences.csv``.

    Results already in ``directory`` for other methods are kept when they were made on the same
    ``basis`` (see ``evaluation_basis``; ``None``: never merge), and moved to
    ``superseded/<time>/`` otherwise; the intervals and differences are computed on the merged
    predictions. ``config`` gives the scoring options (``use_stemmer``), the ``uncertainty``
    settings and the bootstrap's ``seed`` (default: ``EvalConfig()``). Returns the merged table.
    """
    config = config or EvalConfig()
    directory = Path(directory)
    table, predictions, order = _merged(result, directory, basis)
    pred_dir = directory / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for stale in pred_dir.glob("*.json"):
        if stale.stem != "golds" and stale.stem not in order:
            stale.unlink()
    atomic_write_text(directory / "results.csv", table.to_csv(index=False))
    atomic_write_text(directory / "predictions.csv", predictions.to_csv(index=False))
    uncertainty = evaluation_uncertainty(predictions, spec.kind, spec.labels,
                                         np.random.default_rng(config.seed), config.uncertainty,
                                         use_stemmer=config.use_stemmer)
    atomic_write_text(directory / "uncertainty.csv", uncertainty.intervals.to_csv(index=False))
    atomic_write_text(directory / "differences.csv", uncertainty.differences.to_csv(index=False))
    atomic_write_text(directory / "results.md", _results_markdown(table, uncertainty, spec, config))
    written = []
    if not predictions.empty:
        gold = predictions[predictions["method"] == predictions["method"].iloc[0]]
        write_predictions(pred_dir / "golds.json", spec.name, _lamp_ids(gold), list(gold["gold"]))
        written.append("predictions/golds.json")
        for method, frame in predictions.groupby("method", sort=False):
            write_predictions(pred_dir / f"{method}.json", spec.name,
                              _lamp_ids(frame), list(frame["output"]), meta={"method": method})
            written.append(f"predictions/{method}.json")
    write_json(directory / "evaluation.json", {"basis": basis, "methods": order})
    (directory / "checksums.json").unlink(missing_ok=True)  # the files above replace every entry
    write_checksums(directory, [*RESULT_FILES, *written])
    return table


def _merged(result: EvalResult, directory: Path, basis: dict | None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``result``'s rows and predictions merged with the earlier ones of ``directory`` that share
    ``basis`` (the new ones win), in the order of ``METHODS``; and that order."""
    new_methods = set(result.table["method"]) if not result.table.empty else set()
    old_table, old_predictions = _read_previous(directory, basis, new_methods)
    kept = old_table[~old_table["method"].isin(new_methods)] if not old_table.empty else old_table
    table = pd.concat([kept, result.table], ignore_index=True) if not kept.empty else result.table.copy()
    order = _method_order(table["method"]) if not table.empty else []
    table = table.set_index("method").loc[order].reset_index() if order else table
    predictions = result.predictions
    if not old_predictions.empty:
        kept_p = old_predictions[old_predictions["method"].isin(set(order) - new_methods)]
        predictions = pd.concat([kept_p, predictions], ignore_index=True)
    if not predictions.empty:
        rank = {m: i for i, m in enumerate(order)}
        predictions = predictions.sort_values("method", key=lambda c: c.map(rank), kind="stable")
        predictions = predictions.reset_index(drop=True)
    return table, predictions, order


def _results_markdown(table: pd.DataFrame, uncertainty: Uncertainty, spec: TaskSpec, config: EvalConfig) -> str:
    """``results.md``: the metrics with their intervals, then the paired differences."""
    metrics = [m for m in METRICS[spec.kind] if m in table.columns]
    diagnostics = [m for m in DIAGNOSTICS[spec.kind] if m in table.columns]
    cols = ["method", *metrics, *diagnostics, "params_per_user", "shared_params", "train_s_per_user",
            "n_queries", "decoding"]
    cols = [c for c in cols if c in table.columns]
    note = f"; diagnostics beside them: {', '.join(diagnostics)}" if diagnostics else ""
    shown = with_intervals(table[cols], uncertainty.intervals) if not table.empty else table[cols]
    text = (f"# Evaluation on {spec.name} ({spec.kind})\n\nHeld-out queries of the test users; "
            f"metrics as LaMP defines them ({', '.join(metrics)}){note}. {describe_uncertainty(uncertainty)}\n\n"
            + markdown_table(shown))
    if not uncertainty.differences.empty:
        diffs = uncertainty.differences[uncertainty.differences.metric.isin(metrics)]
        text += ("\n## Differences from PerFit and from the best trivial baseline\n\n"
                 f"d = metric(method) - metric(vs), {config.uncertainty.level:.0%} paired bootstrap interval, "
                 "permutation p-value (two-sided)"
                 + "".join(f"; {m}: {'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better" for m in metrics)
                 + ".\n\n" + markdown_table(differences_table(diffs)))
    return text


def _lamp_ids(frame: pd.DataFrame) -> list[str]:
    """Query ids (LaMP's are unique); ``user/query`` when a task reuses query ids across users."""
    ids = [str(q) for q in frame["query_id"]]
    if len(set(ids)) == len(ids):
        return ids
    return [f"{u}/{q}" for u, q in zip(frame["user_id"], frame["query_id"])]


def describe_lora_selection(summary: dict) -> str:
    """The ``results.md`` section on the per-user LoRAs' model selection."""
    lines = ["## Model selection of the per-user LoRAs (equal budgets)", ""]
    for method, s in summary.items():
        kept = ", ".join(f"{n} at epoch {epoch}" for epoch, n in s["kept_epoch_counts"].items())
        if not s["users_validated"]:
            lines.append(f"- {method}: no model selection (val_per_user 0): every user trained on all its "
                         f"history examples for all epochs ({kept}).")
            continue
        start = "the base model" if method == "lora" else "the task model"
        lines.append(f"- {method}: {s['val_per_user']} history examples per user held out (the ones PerFit's "
                     f"stage 2 holds out), {s['users_validated']} of {s['users']} users selected; kept {kept} "
                     f"(epoch 0 = no adapter, i.e. {start}); validation loss {s['val_loss_start']:.3f} before "
                     f"training, {s['val_loss_last']:.3f} after the last epoch, {s['val_loss_kept']:.3f} as kept.")
    return "\n".join(lines + ["", "Per user and epoch: `lora_selection.csv`.", ""])


def write_lora_selection(result: EvalResult, directory: Path) -> dict:
    """Write ``lora_selection.csv`` and add its section to ``results.md`` (after ``write_results``);
    returns ``selection_summary`` (empty when no per-user LoRA ran)."""
    if result.lora_selection.empty:
        return {}
    directory = Path(directory)
    atomic_write_text(directory / "lora_selection.csv", result.lora_selection.to_csv(index=False))
    summary = selection_summary(result.lora_selection)
    results = directory / "results.md"
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    atomic_write_text(results, text.rstrip("\n") + "\n\n" + describe_lora_selection(summary))
    return summary
