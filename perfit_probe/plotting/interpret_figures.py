"""Figures of the interpretation read-outs, as pure functions of the CSVs in ``RUN/interpret``.

Each ``plot_*`` function takes saved frames (see ``perfit_probe.evaluation.interpret``) and
returns a ``matplotlib.figure.Figure`` built without ``pyplot``; ``save_interpret_figures``
writes the ones whose data exist as PNGs. Nothing here runs a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perfit_probe.plotting import save_figures

log = logging.getLogger(__name__)

_COLORS = {"full": "#2ca02c", "personal": "#1f77b4", "pca": "#9467bd", "other_user": "#8c564b",
           "random": "#7f7f7f"}


def read_frame(directory: Path, name: str) -> pd.DataFrame:
    """``{name}.csv`` of a ``RUN/interpret`` directory (empty when missing or empty)."""
    path = Path(directory) / f"{name}.csv"
    if not path.is_file() or path.stat().st_size <= 1:
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"user_id": str})


def _site_axes(frame: pd.DataFrame, width: float) -> tuple[list[str], Figure, list]:
    """One panel per site of ``frame`` (in order of appearance), ``width`` inches each."""
    sites = list(dict.fromkeys(frame.site))
    fig = Figure(figsize=(width * len(sites), 3.6), layout="constrained")
    return sites, fig, list(fig.subplots(1, len(sites), squeeze=False).ravel())


def plot_kl(kl: pd.DataFrame) -> Figure:
    """Mean KL(p_enhanced || p_steered) against alpha, one line per steering vector, with intervals."""
    sites, fig, axes = _site_axes(kl, 4.4)
    for ax, site in zip(axes, sites):
        part = kl[kl.site == site]
        for method, rows in part.groupby("method", sort=False):
            rows = rows.sort_values("alpha")
            color = _COLORS.get(method, "#333333")
            ax.plot(rows.alpha, rows["mean"], marker="o", color=color, label=method)
            ax.fill_between(rows.alpha, rows.lo, rows.hi, color=color, alpha=0.15)
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("alpha (scale of the added vector)")
        ax.set_ylabel("KL(enhanced || steered plain), nats")
    axes[0].legend(fontsize=8)
    return fig


def plot_angles(angles: pd.DataFrame) -> Figure:
    """Principal-angle spectra (stage 1; stage 2 median over users) against the random null band."""
    sites, fig, axes = _site_axes(angles, 4.4)
    for ax, site in zip(axes, sites):
        part = angles[angles.site == site]
        for (bank, group), rows in part.groupby(["bank", "group"], sort=False):
            spectrum = rows.groupby("index").agg(angle=("angle_deg", "median"), lo=("null_lo", "first"),
                                                 med=("null_median", "first"), hi=("null_hi", "first"))
            label = f"{bank}" + ("" if group == "all" else f" ({group})")
            color = "#1f77b4" if bank == "stage1" else "#2ca02c"
            ax.plot(spectrum.index, spectrum.angle, marker="o", color=color,
                    label=label + (" (median over users)" if bank == "stage2" else ""))
            ax.fill_between(spectrum.index, spectrum.lo, spectrum.hi, color="#7f7f7f", alpha=0.15)
            ax.plot(spectrum.index, spectrum.med, ls="--", color="#7f7f7f")
        ax.set_ylim(0, 90)
        ax.set_title(f"{site}\n(grey: random subspaces, 95% band)", fontsize=9)
        ax.set_xlabel("principal angle index")
        ax.set_ylabel("angle to the delta subspace (degrees)")
        ax.legend(fontsize=8)
    return fig


def plot_monitor(monitoring: pd.DataFrame) -> Figure:
    """Per user: mean projection of the held-out plain states on the personal direction vs mean gold."""
    sites, fig, axes = _site_axes(monitoring, 4.2)
    for ax, site in zip(axes, sites):
        means = monitoring[monitoring.site == site].groupby("user_id")[["projection", "gold"]].mean()
        ax.scatter(means.projection, means.gold, color="#1f77b4")
        if len(means) > 2 and means.projection.std() > 0:
            slope, icpt = np.polyfit(means.projection, means.gold, 1)
            xs = np.linspace(means.projection.min(), means.projection.max(), 10)
            ax.plot(xs, slope * xs + icpt, color="#d62728", lw=1)
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("projection on the user's personal direction")
        ax.set_ylabel("mean gold rating")
    return fig


def save_interpret_figures(interpret_dir: Path, figure_dir: Path) -> list[Path]:
    """Write the figures whose data exist; return their paths."""
    kl, angles = read_frame(interpret_dir, "kl"), read_frame(interpret_dir, "angles")
    monitoring = read_frame(interpret_dir, "monitoring")
    makers = {"interpret_kl": (lambda: plot_kl(kl), not kl.empty),
              "interpret_angles": (lambda: plot_angles(angles), not angles.empty),
              "interpret_monitor": (lambda: plot_monitor(monitoring),
                                    not monitoring.empty and monitoring.gold.notna().any())}
    return save_figures(makers, figure_dir, 120)
