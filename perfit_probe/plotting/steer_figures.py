"""Figures of the causal checks, as pure functions of ``RUN/steer/steer.csv`` and ``swap_pairs.csv``.

Each ``plot_*`` function takes the saved frames (see ``perfit_probe.evaluation.steer``) and
returns a ``matplotlib.figure.Figure`` built without ``pyplot``; ``save_steer_figures`` writes
them all as PNGs. Nothing here runs a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

STEER_FILE = "steer.csv"
PAIRS_FILE = "swap_pairs.csv"
FIGURES = ("steer_swap", "steer_ablation", "steer_dose", "steer_control")
_COLORS = {"base": "#7f7f7f", "stage1": "#1f77b4", "perfit": "#2ca02c",
           "perfit_ablate_personal": "#d62728", "perfit_ablate_random": "#ff7f0e",
           "random_bank": "#9467bd", "shuffled_users": "#8c564b"}
_LABELS = {"base": "base model", "stage1": "stage 1", "perfit": "PerFit",
           "perfit_ablate_personal": "PerFit, personal\nsubspace ablated",
           "perfit_ablate_random": "PerFit, random\nsubspace ablated",
           "random_bank": "random bank\n(matched norms)", "shuffled_users": "users shuffled"}


def read_steer(steer_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``steer.csv`` and (possibly empty) ``swap_pairs.csv`` of a ``RUN/steer`` directory."""
    steer_dir = Path(steer_dir)
    rows = pd.read_csv(steer_dir / STEER_FILE, dtype={"setting": str})
    pairs_path = steer_dir / PAIRS_FILE
    pairs = pd.read_csv(pairs_path, dtype={"donor": str, "recipient": str}) if pairs_path.is_file() \
        and pairs_path.stat().st_size > 1 else pd.DataFrame()
    return rows, pairs


def _headline(rows: pd.DataFrame) -> str:
    """The LaMP metric of the rows (the reference rows' first metric)."""
    ref = rows[rows.experiment == "reference"]
    names = [m for m in ref.metric.unique() if m != "mean_pred"]
    return names[0] if names else "mean_pred"


def _bars(rows: pd.DataFrame, experiment: str, title: str) -> Figure:
    sub = rows[rows.experiment == experiment]
    metrics = [m for m in (_headline(rows),) if m in set(sub.metric)]  # means over users cancel out
    fig = Figure(figsize=(4.6 * len(metrics), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        part = sub[sub.metric == metric]
        settings = list(part.setting)
        ax.bar(range(len(settings)), part.value, color=[_COLORS.get(s, "#333333") for s in settings])
        ax.set_xticks(range(len(settings)), [_LABELS.get(s, s) for s in settings], rotation=30,
                      ha="right", fontsize=8)
        ax.set_ylabel(metric)
        for i, v in enumerate(part.value):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    return fig


def plot_swap(pairs: pd.DataFrame, rows: pd.DataFrame | None = None) -> Figure:
    """Distance of the recipient's behaviour to the donor's: own intervention vs donor's.

    Points below the diagonal moved toward the donor. Rating tasks get a second panel: the
    shift of the mean predicted rating against the donor-recipient gap in history ratings.
    """
    rating = "donor_mean" in pairs.columns
    fig = Figure(figsize=(4.2 * (2 if rating else 1), 4.0), layout="constrained")
    axes = fig.subplots(1, 2 if rating else 1, squeeze=False).ravel()
    ax = axes[0]
    if pairs.empty:
        ax.text(0.5, 0.5, "no swap pairs", ha="center", va="center")
        return fig
    ax.scatter(pairs.own_distance, pairs.swap_distance, s=14, alpha=0.7, color="#2ca02c")
    hi = float(max(pairs.own_distance.max(), pairs.swap_distance.max())) * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], color="#7f7f7f", lw=1, ls="--")
    ax.set_xlabel("distance to donor, own intervention")
    ax.set_ylabel("distance to donor, donor's intervention")
    share = float((pairs.swap_distance < pairs.own_distance).mean())
    ax.set_title(f"user swap: {share:.0%} of pairs move toward the donor", fontsize=9)
    if rating:
        ax = axes[1]
        gap = pairs.donor_mean - pairs.recipient_mean
        shift = pairs.swap_pred - pairs.own_pred
        ax.scatter(gap, shift, s=14, alpha=0.7, color="#1f77b4")
        ax.axhline(0, color="#7f7f7f", lw=1)
        ax.axvline(0, color="#7f7f7f", lw=1)
        ax.set_xlabel("donor mean - recipient mean (history ratings)")
        ax.set_ylabel("shift of mean predicted rating")
        corr = np.corrcoef(gap, shift)[0, 1] if len(pairs) > 2 and gap.std() > 0 and shift.std() > 0 else float("nan")
        ax.set_title(f"correlation {corr:.2f}", fontsize=9)
    return fig


def plot_ablation(rows: pd.DataFrame) -> Figure:
    """Metric of stage 1, PerFit, and PerFit with the personal / a random subspace ablated."""
    extra = (rows.experiment == "ablation") & rows.metric.isin(["gain_removed", "k", "energy"])
    k = rows[(rows.experiment == "ablation") & (rows.metric == "k")].value
    title = "subspace ablation" + (f" (k = {int(k.iloc[0])})" if len(k) else "")
    return _bars(rows[~extra], "ablation", title)


def plot_dose(rows: pd.DataFrame) -> Figure:
    """Metric (and mean predicted rating) against the scale alpha of the personal edit."""
    sub = rows[rows.experiment == "dose"]
    sub = sub[~sub.setting.str.startswith("spearman")].copy()
    sub["alpha"] = sub.setting.astype(float)
    metrics = [m for m in (_headline(rows), "mean_pred") if m in set(sub.metric)]
    fig = Figure(figsize=(4.2 * max(1, len(metrics)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        part = sub[sub.metric == metric].sort_values("alpha")
        ax.plot(part.alpha, part.value, marker="o", color="#2ca02c")
        ax.axvline(1.0, color="#7f7f7f", lw=1, ls="--")
        ax.set_xlabel("alpha (scale of the personal edit)")
        ax.set_ylabel(metric)
        rho = rows[(rows.experiment == "dose") & (rows.setting == "spearman_0_1") & (rows.metric == metric)].value
        if len(rho):
            ax.set_title(f"Spearman on [0, 1]: {rho.iloc[0]:.2f}", fontsize=9)
    fig.suptitle("dose response")
    return fig


def plot_control(rows: pd.DataFrame) -> Figure:
    """Stage 1 and PerFit against a norm-matched random bank and shuffled users."""
    return _bars(rows, "control", "control interventions")


def save_steer_figures(steer_dir: Path, figures_dir: Path, dpi: int = 120) -> list[Path]:
    """Read ``steer_dir``'s CSVs and write the steering PNGs into ``figures_dir``."""
    rows, pairs = read_steer(steer_dir)
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    makers = {"steer_swap": (lambda: plot_swap(pairs, rows), not pairs.empty),
              "steer_ablation": (lambda: plot_ablation(rows), "ablation" in set(rows.experiment)),
              "steer_dose": (lambda: plot_dose(rows), "dose" in set(rows.experiment)),
              "steer_control": (lambda: plot_control(rows), "control" in set(rows.experiment))}
    written = []
    for name, (make, available) in makers.items():
        if not available:
            log.info("no %s results: figure skipped", name)
            continue
        path = figures_dir / f"{name}.png"
        make().savefig(path, dpi=dpi)
        written.append(path)
    return written
