"""Figures of the causal checks, as pure functions of ``RUN/steer/steer.csv``, ``swap_pairs.csv``
and ``ablation_random.csv``.

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

from perfit_probe.plotting import save_figures

log = logging.getLogger(__name__)

STEER_FILE = "steer.csv"
PAIRS_FILE = "swap_pairs.csv"
RANDOM_FILE = "ablation_random.csv"
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


def read_random_subspaces(steer_dir: Path) -> pd.DataFrame:
    """``ablation_random.csv`` of a ``RUN/steer`` directory (empty when absent)."""
    path = Path(steer_dir) / RANDOM_FILE
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def _row(rows: pd.DataFrame, experiment: str, setting: str, metric: str) -> float:
    sel = rows[(rows.experiment == experiment) & (rows.setting.astype(str) == setting) & (rows.metric == metric)]
    return float(sel.value.iloc[0]) if len(sel) else float("nan")


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
        _bar_axis(ax, sub[sub.metric == metric], metric)
    fig.suptitle(title)
    return fig


def _bar_axis(ax, part: pd.DataFrame, metric: str) -> None:
    settings = list(part.setting)
    ax.bar(range(len(settings)), part.value, color=[_COLORS.get(s, "#333333") for s in settings])
    ax.set_xticks(range(len(settings)), [_LABELS.get(s, s) for s in settings], rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel(metric)
    for i, v in enumerate(part.value):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)


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
    title = f"user swap: {share:.0%} of pairs move toward the donor"
    if rows is not None:
        p = _row(rows, "swap", "pairs", "toward_donor_share_p")
        low = _row(rows, "swap", "pairs", "toward_donor_share_ci_low")
        high = _row(rows, "swap", "pairs", "toward_donor_share_ci_high")
        if np.isfinite(p):
            title += f"\n(p = {p:.2g}, 95% CI {low:.0%}-{high:.0%}, over recipients)"
    ax.set_title(title, fontsize=9)
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
        title = f"correlation {corr:.2f}"
        p = _row(rows, "swap", "pairs", "shift_gap_correlation_p") if rows is not None else float("nan")
        if np.isfinite(p):
            title += (f" (p = {p:.2g}, 95% CI {_row(rows, 'swap', 'pairs', 'shift_gap_correlation_ci_low'):.2f} to "
                      f"{_row(rows, 'swap', 'pairs', 'shift_gap_correlation_ci_high'):.2f})")
        ax.set_title(title, fontsize=9)
    return fig


def plot_ablation(rows: pd.DataFrame, random: pd.DataFrame | None = None) -> Figure:
    """Metric of stage 1, PerFit, and PerFit with the personal / a random subspace ablated.

    With the random subspaces' table, a second panel: the histogram of their ``metric_lost``
    with the personal subspace's as a vertical line, and its percentile among them.
    """
    sub = rows[rows.experiment == "ablation"]
    metric = _headline(rows)
    bars = sub[sub.setting.isin(["stage1", "perfit", "perfit_ablate_personal", "perfit_ablate_random"])
               & (sub.metric == metric)]
    k = sub[sub.metric == "k"].value
    with_random = random is not None and not random.empty and "metric_lost" in random.columns
    fig = Figure(figsize=(9.2 if with_random else 4.6, 3.6), layout="constrained")
    axes = fig.subplots(1, 2 if with_random else 1, squeeze=False).ravel()
    _bar_axis(axes[0], bars, metric)
    fig.suptitle("subspace ablation" + (f" (k = {int(k.iloc[0])})" if len(k) else ""))
    if not with_random:
        return fig
    ax = axes[1]
    ax.hist(random.metric_lost, bins=min(20, max(5, len(random) // 3)), color="#ff7f0e", alpha=0.8,
            label=f"{len(random)} random subspaces")
    real = _row(rows, "ablation", "perfit_ablate_personal", "metric_lost")
    ax.axvline(real, color="#d62728", lw=2, label="personal subspace")
    low = _row(rows, "ablation", "random_subspaces", "metric_lost_q025")
    high = _row(rows, "ablation", "random_subspaces", "metric_lost_q975")
    ax.axvspan(low, high, color="#7f7f7f", alpha=0.15, label="random 2.5-97.5%")
    ax.set_xlabel(f"{_headline(rows)} lost by the ablation (positive: worse)")
    ax.set_ylabel("random subspaces")
    pct = _row(rows, "ablation", "perfit_ablate_personal", "random_percentile")
    ax.set_title(f"personal subspace at the {pct:.0f}th percentile "
                 f"(p = {_row(rows, 'ablation', 'perfit_ablate_personal', 'random_p'):.2g})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_dose(rows: pd.DataFrame) -> Figure:
    """Metric (and mean predicted rating) against the scale alpha of the personal edit.

    Shaded: the 95% intervals over test users at each alpha (``<metric>_ci_low/high`` rows);
    a dotted line marks the best alpha.
    """
    sub = rows[rows.experiment == "dose"].copy()
    sub["alpha"] = pd.to_numeric(sub.setting, errors="coerce")
    sub = sub[sub.alpha.notna()]
    metrics = [m for m in (_headline(rows), "mean_pred") if m in set(sub.metric)]
    fig = Figure(figsize=(4.2 * max(1, len(metrics)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        part = sub[sub.metric == metric].sort_values("alpha")
        ax.plot(part.alpha, part.value, marker="o", color="#2ca02c")
        low = sub[sub.metric == f"{metric}_ci_low"].set_index("alpha").value
        high = sub[sub.metric == f"{metric}_ci_high"].set_index("alpha").value
        if len(low) and len(high):
            band = pd.DataFrame({"low": low, "high": high}).sort_index()
            ax.fill_between(band.index, band.low, band.high, color="#2ca02c", alpha=0.2, lw=0,
                            label="95% CI over users")
            ax.legend(fontsize=7)
        best = _row(rows, "dose", "best", "alpha")
        if np.isfinite(best) and metric != "mean_pred":
            ax.axvline(best, color="#2ca02c", lw=1, ls=":")
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
    random = read_random_subspaces(steer_dir)
    makers = {"steer_swap": (lambda: plot_swap(pairs, rows), not pairs.empty),
              "steer_ablation": (lambda: plot_ablation(rows, random), "ablation" in set(rows.experiment)),
              "steer_dose": (lambda: plot_dose(rows), "dose" in set(rows.experiment)),
              "steer_control": (lambda: plot_control(rows), "control" in set(rows.experiment))}
    return save_figures(makers, figures_dir, dpi)
