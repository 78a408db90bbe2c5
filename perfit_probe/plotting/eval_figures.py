"""Figures of the evaluation, as pure functions of ``RUN/eval/uncertainty.csv`` and ``differences.csv``.

``plot_intervals``: one panel per metric, methods on the y-axis, each metric with its
bootstrap interval as an error bar (PerFit green, trivial baselines grey, the best baseline's
value as a dashed line). ``plot_differences``: each method's difference from PerFit and from
the best trivial baseline on the headline metric, with its paired interval and p-value.
``save_eval_figures`` writes both as PNGs. Nothing here runs a model or recomputes a metric.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perfit_probe.evaluation.baselines import BASELINES
from perfit_probe.evaluation.metrics import HIGHER_IS_BETTER
from perfit_probe.evaluation.uncertainty import DIFFERENCE_COLUMNS, INTERVAL_COLUMNS
from perfit_probe.plotting import save_figures

log = logging.getLogger(__name__)

INTERVALS_FILE = "uncertainty.csv"
DIFFERENCES_FILE = "differences.csv"
_PERFIT, _BASELINE, _OTHER = "#2ca02c", "#7f7f7f", "#1f77b4"


def read_uncertainty(eval_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``uncertainty.csv`` and ``differences.csv`` of a ``RUN/eval`` directory (empty frames if absent)."""
    eval_dir = Path(eval_dir)
    frames = []
    for name, columns in ((INTERVALS_FILE, INTERVAL_COLUMNS), (DIFFERENCES_FILE, DIFFERENCE_COLUMNS)):
        path = eval_dir / name
        frame = pd.read_csv(path, dtype={"method": str, "reference": str}) if path.is_file() \
            and path.stat().st_size > 1 else pd.DataFrame(columns=list(columns))
        frames.append(frame)
    return frames[0], frames[1]


def _color(method: str) -> str:
    return _PERFIT if method == "perfit" else _BASELINE if method in BASELINES else _OTHER


def _errorbars(ax, frame: pd.DataFrame, value: str = "estimate") -> None:
    """Points at ``frame[value]`` with ``ci_low``/``ci_high`` error bars, one row per method, top down."""
    y = np.arange(len(frame))[::-1]
    est = frame[value].to_numpy(float)
    low = np.clip(est - frame.ci_low.to_numpy(float), 0, None)
    high = np.clip(frame.ci_high.to_numpy(float) - est, 0, None)
    for yi, e, lo, hi, method in zip(y, est, low, high, frame.method):
        ax.errorbar(e, yi, xerr=[[lo], [hi]], fmt="o", color=_color(method), capsize=3, ms=5)
    ax.set_yticks(y, list(frame.method), fontsize=8)
    ax.set_ylim(-0.7, len(frame) - 0.3)


def plot_intervals(intervals: pd.DataFrame, metrics: list[str] | None = None) -> Figure:
    """Each metric (a panel) of each method (a row) with its bootstrap interval."""
    metrics = metrics or list(dict.fromkeys(intervals.metric))
    fig = Figure(figsize=(3.8 * max(1, len(metrics)), 0.9 + 0.32 * intervals.method.nunique()),
                 layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False, sharey=True).ravel()
    if intervals.empty:
        axes[0].text(0.5, 0.5, "no intervals", ha="center", va="center")
        return fig
    methods = list(dict.fromkeys(intervals.method))
    for ax, metric in zip(axes, metrics):
        part = intervals[intervals.metric == metric].set_index("method").reindex(methods).reset_index()
        _errorbars(ax, part)
        base = part[part.method.isin(list(BASELINES))].dropna(subset=["estimate"])
        if not base.empty:
            best = base.estimate.max() if HIGHER_IS_BETTER.get(metric, False) else base.estimate.min()
            ax.axvline(best, color=_BASELINE, lw=1, ls="--")
        ax.set_xlabel(metric)
        ax.grid(axis="x", alpha=0.3)
    level = intervals.level.iloc[0]
    fig.suptitle(f"metrics with {level:.0%} cluster-bootstrap intervals over "
                 f"{int(intervals.n_users.max())} test users", fontsize=10)
    return fig


def plot_differences(differences: pd.DataFrame, metric: str | None = None) -> Figure:
    """Differences from PerFit and from the best baseline on ``metric`` (default: the first)."""
    metric = metric or (differences.metric.iloc[0] if not differences.empty else "")
    part = differences[differences.metric == metric]
    groups = list(dict.fromkeys(zip(part.against, part.reference)))
    fig = Figure(figsize=(4.4 * max(1, len(groups)), 0.9 + 0.32 * max(1, part.method.nunique())),
                 layout="constrained")
    axes = fig.subplots(1, max(1, len(groups)), squeeze=False).ravel()
    if part.empty:
        axes[0].text(0.5, 0.5, "no differences", ha="center", va="center")
        return fig
    for ax, (against, reference) in zip(axes, groups):
        rows = part[(part.against == against) & (part.reference == reference)].reset_index(drop=True)
        _errorbars(ax, rows)
        ax.axvline(0, color="black", lw=1)
        for yi, (e, p) in zip(np.arange(len(rows))[::-1], zip(rows.estimate, rows.p_value)):
            ax.annotate(f"p={p:.2g}", (e, yi), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
        label = "PerFit" if against == "reference" and reference == "perfit" else \
            f"{reference} (best baseline)" if against == "best_baseline" else reference
        ax.set_xlabel(f"{metric}(method) - {metric}({reference})")
        ax.set_title(f"vs {label}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    return fig


def save_eval_figures(eval_dir: Path, figures_dir: Path, dpi: int = 120) -> list[Path]:
    """Read ``eval_dir``'s ``uncertainty.csv``/``differences.csv`` and write the PNGs into ``figures_dir``."""
    intervals, differences = read_uncertainty(eval_dir)
    makers = {"eval_intervals": (lambda: plot_intervals(intervals), not intervals.empty),
              "eval_differences": (lambda: plot_differences(differences), not differences.empty)}
    return save_figures(makers, figures_dir, dpi)
