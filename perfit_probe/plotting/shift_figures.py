"""Figures of the shift analysis, as pure functions of its saved tables.

Every ``plot_*`` function takes frames read from ``RUN/analysis/*.csv`` (see
``perfit_probe.analysis.tables.AnalysisResult``) and returns a ``matplotlib.figure.Figure``;
nothing here recomputes activations or statistics beyond selecting and plotting rows.
Figures are built without ``pyplot`` (no global state, no display backend needed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from perfit_probe.analysis.tables import TABLES

log = logging.getLogger(__name__)

SOURCE_STYLE = {
    "deltas": {"color": "#1f77b4", "label": "deltas"},
    "gaussian_null": {"color": "#7f7f7f", "label": "Gaussian, matched norms"},
    "control": {"color": "#ff7f0e", "label": "random-text control"},
    "shuffled": {"color": "#2ca02c", "label": "user-shuffled"},
    "other_user": {"color": "#d62728", "label": "other-user history"},
    "format_random": {"color": "#9467bd", "label": "format-matched random history"},
    "permuted": {"color": "#8c564b", "label": "rating-permuted history"},
}


def read_tables(analysis_dir: Path) -> dict[str, pd.DataFrame]:
    """The analysis CSVs of ``analysis_dir`` by table name (``FileNotFoundError`` if absent)."""
    analysis_dir = Path(analysis_dir)
    dtypes = {"user_id": str, "user_a": str, "user_b": str}
    return {name: pd.read_csv(analysis_dir / filename, dtype=dtypes) for name, filename in TABLES.items()}


def _pick_sites(sites: list[str], max_sites: int) -> list[str]:
    if len(sites) <= max_sites:
        return sites
    return [sites[i] for i in np.unique(np.linspace(0, len(sites) - 1, max_sites).round().astype(int))]


def _ordered_sites(frame: pd.DataFrame) -> list[str]:
    return list(frame.drop_duplicates("site").sort_values("layer", kind="stable")["site"])


def _grid(n: int, width: float = 3.6, height: float = 3.0) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def plot_cumulative_variance(
    curves: pd.DataFrame, *, centered: bool = False, sites: list[str] | None = None,
    max_sites: int = 6, taus: tuple[float, ...] = (0.8, 0.9, 0.95),
) -> Figure:
    """Cumulative explained energy vs number of components, one panel per site, with nulls."""
    sub = curves[curves["centered"] == centered]
    sites = sites or _pick_sites(_ordered_sites(sub), max_sites)
    fig, axes = _grid(len(sites))
    for ax, site in zip(axes, sites):
        for source, group in sub[sub.site == site].groupby("source", sort=False):
            style = SOURCE_STYLE.get(source, {"label": source})
            ax.plot(group["component"], group["cumulative"], **style)
        for tau in taus:
            ax.axhline(tau, color="k", lw=0.5, ls=":")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("components k")
        ax.set_ylabel("energy(k)")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Cumulative explained energy ({'centred' if centered else 'uncentred'})")
    return fig


def plot_rank_vs_layer(
    ranks: pd.DataFrame, *, tau: float = 0.9, centered: bool = False, per_mille: bool = False,
) -> Figure:
    """``r(tau)`` (or per-mille) against layer for the deltas and each null, with bootstrap CIs."""
    stat = f"{'per_mille' if per_mille else 'rank'}@{tau:g}"
    sub = ranks[(ranks["centered"] == centered) & (ranks["statistic"] == stat)]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for source, group in sub.groupby("source", sort=False):
        group = group.sort_values("layer")
        style = SOURCE_STYLE.get(source, {"label": source})
        ax.plot(group["layer"], group["value"], marker="o", ms=3, **style)
        if group["ci_low"].notna().any():
            ax.fill_between(group["layer"], group["ci_low"], group["ci_high"], alpha=0.2,
                            color=style.get("color"))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{'per-mille rank' if per_mille else 'rank'} at energy {tau:g}")
    ax.set_title(f"Rank of the shifts vs layer ({'centred' if centered else 'uncentred'})")
    ax.legend(fontsize=8)
    return fig


def plot_pc_projection(projection: pd.DataFrame, site: str) -> Figure:
    """Users' deltas (and per-query deltas) on the deltas' uncentred PC1-PC2, coloured by user,
    with the collective shift (mean delta) drawn as an arrow from the origin (no shift)."""
    sub = projection[projection.site == site]
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.subplots()
    users = sorted(sub.loc[sub.kind == "user", "user_id"].unique())
    cmap = _user_colours(users)
    queries = sub[sub.kind == "query"]
    if not queries.empty:
        ax.scatter(queries["pc1"], queries["pc2"], s=6, alpha=0.35,
                   c=[cmap[u] for u in queries["user_id"]], linewidths=0)
    people = sub[sub.kind == "user"]
    ax.scatter(people["pc1"], people["pc2"], s=28, c=[cmap[u] for u in people["user_id"]],
               edgecolors="k", linewidths=0.4, label="user deltas")
    mean = sub[sub.kind == "collective"]
    if not mean.empty:
        x, y = float(mean["pc1"].iloc[0]), float(mean["pc2"].iloc[0])
        ax.annotate("", xy=(x, y), xytext=(0, 0),
                    arrowprops={"arrowstyle": "-|>", "color": "k", "lw": 1.8})
        ax.scatter([0], [0], marker="x", c="k", s=30, label="no shift")
        ax.plot([], [], color="k", label="collective shift (mean delta)")
    r1 = float(sub["ratio1"].iloc[0]) if len(sub) else float("nan")
    r2 = float(sub["ratio2"].iloc[0]) if len(sub) else float("nan")
    ax.set_xlabel(f"PC1 ({100 * r1:.1f}% energy)")
    ax.set_ylabel(f"PC2 ({100 * r2:.1f}% energy)")
    ax.set_title(f"Deltas on PC1-PC2, {site}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _user_colours(users: list[str]) -> dict:
    cmap = colormaps["tab20"] if len(users) <= 20 else colormaps["hsv"]
    n = max(len(users), 1)
    return {u: cmap(i % 20 if len(users) <= 20 else i / n) for i, u in enumerate(users)}


def plot_cosine_to_mean(user_stats: pd.DataFrame, *, sources: tuple[str, ...] = ("deltas",
                        "gaussian_null", "control")) -> Figure:
    """Distribution over users of ``cos(delta_u, mean delta)`` per layer, for each source."""
    sites = _ordered_sites(user_stats)
    present = [s for s in sources if (user_stats.source == s).any()]
    fig = Figure(figsize=(max(6.4, 0.45 * len(sites) * len(present)), 4.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(present), 1)
    for j, source in enumerate(present):
        data = [user_stats.loc[(user_stats.site == s) & (user_stats.source == source), "cos_to_mean"]
                for s in sites]
        pos = np.arange(len(sites)) + (j - (len(present) - 1) / 2) * width
        style = SOURCE_STYLE.get(source, {"color": None, "label": source})
        parts = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                           showfliers=False, manage_ticks=False)
        for box in parts["boxes"]:
            box.set_facecolor(style["color"])
            box.set_alpha(0.6)
        ax.plot([], [], color=style["color"], lw=6, alpha=0.6, label=style["label"])
    layers = user_stats.drop_duplicates("site").set_index("site").loc[sites, "layer"]
    ax.set_xticks(np.arange(len(sites)), [str(v) for v in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(delta_u, mean delta)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("Cosine of each user's delta to the mean delta")
    ax.legend(fontsize=8)
    return fig


def plot_user_cosine(user_cosine: pd.DataFrame, site: str) -> Figure:
    """User x user cosine heatmap of the deltas at ``site``."""
    sub = user_cosine[user_cosine.site == site]
    mat = sub.pivot(index="user_a", columns="user_b", values="cosine")
    order = list(dict.fromkeys(sub["user_a"]))
    mat = mat.loc[order, order]
    fig = Figure(figsize=(5.4, 4.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mat.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine")
    if len(order) <= 30:
        ax.set_xticks(range(len(order)), order, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), order, fontsize=6)
    else:
        ax.set_xlabel("user")
        ax.set_ylabel("user")
    ax.set_title(f"User x user cosine of deltas, {site}", fontsize=10)
    return fig


def save_shift_figures(analysis_dir: Path, out_dir: Path, *, dpi: int = 120) -> list[Path]:
    """Draw every shift figure from the CSVs in ``analysis_dir`` into ``out_dir`` (PNG)."""
    tables = read_tables(analysis_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Figure] = {}
    centers = sorted(tables["ranks"]["centered"].unique())
    for centered in centers:
        tag = "centred" if centered else "uncentred"
        figures[f"shift_cumvar_{tag}"] = plot_cumulative_variance(tables["curves"], centered=centered)
        figures[f"shift_rank_vs_layer_{tag}"] = plot_rank_vs_layer(tables["ranks"], centered=centered)
    figures["shift_cos_to_mean"] = plot_cosine_to_mean(tables["user_stats"])
    for site in _ordered_sites(tables["projection"]) if not tables["projection"].empty else []:
        figures[f"shift_pc12_{_slug(site)}"] = plot_pc_projection(tables["projection"], site)
    for site in _ordered_sites(tables["user_cosine"]) if not tables["user_cosine"].empty else []:
        figures[f"shift_user_cosine_{_slug(site)}"] = plot_user_cosine(tables["user_cosine"], site)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    log.info("wrote %d figures into %s", len(paths), out_dir)
    return paths


def _slug(site: str) -> str:
    return site.replace(".", "_")
