"""``run_analysis``: analyse a run directory's delta vectors, write CSVs, report and figures.

Reads ``RUN/deltas`` (written by ``perfit-probe cache``), runs
:func:`perfit_probe.analysis.tables.analyze_deltas`, and writes::

    RUN/analysis/*.csv, analysis.json   the tidy tables (see ``AnalysisResult``)
    RUN/analysis/report.md             paper-style rank tables next to the nulls, collective stats
    RUN/figures/shift_*.png            figures drawn from the saved CSVs only
    RUN/metrics.json ["analysis"]      headline numbers (``AnalysisResult.summary``)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from perfit_probe.analysis.tables import TABLES, AnalysisConfig, AnalysisResult, analyze_deltas
from perfit_probe.deltas import Deltas
from perfit_probe.rundir import RunDir, atomic_write_text, staged_dir

log = logging.getLogger(__name__)

SOURCE_LABELS = {
    "deltas": "deltas",
    "gaussian_null": "Gaussian vectors with matched norms",
    "control": "random-text control deltas",
    "shuffled": "user-shuffled deltas",
}


def run_analysis(
    run_dir: Path | str, config: AnalysisConfig | None = None, *, figures: bool = True
) -> AnalysisResult:
    """Analyse ``RUN/deltas`` and write tables, ``report.md``, figures and metrics.

    ``figures=False`` skips the PNGs (``analyses/shift_figures.py`` can draw them later from
    the CSVs).
    """
    config = config or AnalysisConfig()
    run = RunDir.open(run_dir)
    deltas = Deltas.load(run.path / "deltas")
    log.info("analysing %d users x %d sites (d_model %d)", len(deltas.user_ids),
             len(deltas.sites), deltas.d_model)
    run.add_stage("analyze", config)
    with run.timed("analyze"):
        result = analyze_deltas(deltas, config)
    with staged_dir(run.path / "analysis") as staged:  # an earlier analysis stays until this one is whole
        result.save(staged)
        atomic_write_text(staged / "report.md", render_report(result, model=run.info().get("model")))
    out = run.path / "analysis"
    if figures:
        # Figures are drawn from the CSVs just saved; plotting is the last stage of the data
        # flow, imported here only so that one call leaves a complete analysis behind.
        from perfit_probe.plotting.shift_figures import save_shift_figures

        save_shift_figures(out, run.sub("figures"))
    run.add_metrics("analysis", result.summary())
    log.info("wrote %s", out / "report.md")
    return result


def render_report(result: AnalysisResult, model: dict | None = None) -> str:
    """The markdown report of an analysis (numbers only, with their nulls)."""
    meta = result.meta
    taus = [float(t) for t in meta.get("taus", [])]
    lines = ["# Shift analysis", ""]
    deltas_meta = meta.get("deltas_meta") or {}
    desc = [f"{meta.get('n_users')} users", f"{len(meta.get('sites', []))} sites",
            f"d_model {meta.get('d_model')}", f"{meta.get('n_queries', 0)} per-query deltas"]
    if deltas_meta.get("task"):
        desc.insert(0, f"task {deltas_meta['task']}")
    if model and model.get("name"):
        desc.insert(0, f"model {model['name']}")
    cfg = meta.get("config", {})
    lines += [
        "Input: " + ", ".join(desc) + ".",
        "",
        "Definitions: for stacked user deltas X (users x d_model), optionally mean-centred, "
        "energy(k) = share of ||X||_F^2 in the k leading singular directions; "
        "r(tau) = smallest k with energy(k) >= tau; per-mille = 1000 r / min(n_users, d_model). "
        f"Intervals: {100 * cfg.get('ci_level', 0.95):g}% percentile {cfg.get('bootstrap')} "
        f"bootstrap over users ({cfg.get('n_boot')} resamples). A resample has about half as "
        "many effective users, so rank intervals of spread-out sources (the nulls) sit below "
        "their point estimates: read them as stability across user samples.",
        "",
        "Sources: " + "; ".join(f"`{k}`: {v}" for k, v in SOURCE_LABELS.items()) + ".",
    ]
    if meta.get("skipped_sources"):
        lines += ["", f"Not available in these deltas (skipped): {', '.join(meta['skipped_sources'])}."]
    lines += ["", "## Headline", ""] + _headline(result, taus)
    for centered in (False, True):
        if not (result.ranks["centered"] == centered).any():
            continue
        lines += ["", f"## Ranks, {'mean-centred' if centered else 'uncentred'} deltas", ""]
        lines += _rank_table(result, centered, taus)
    lines += ["", "## Collective versus personal shift", ""] + _collective_table(result)
    lines += ["", "## Files", "",
              ", ".join(f"`{name}`" for name in TABLES.values()) + " in this directory; "
              "figures in `../figures/` (regenerate with `python analyses/shift_figures.py RUN_DIR`)."]
    return "\n".join(lines) + "\n"


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _value(frame: pd.DataFrame, **where) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for col, val in where.items():
        mask &= frame[col] == val
    return frame[mask]


def _headline(result: AnalysisResult, taus: list[float]) -> list[str]:
    tau = 0.9 if any(math.isclose(t, 0.9) for t in taus) else taus[0]
    stat = f"rank@{tau:g}"
    ranks = result.ranks
    out = []
    for centered in (False, True):
        ref = _value(ranks, source="deltas", statistic=stat, centered=centered)
        if ref.empty:
            continue
        best = ref.loc[ref["value"].idxmin()]
        label = "mean-centred" if centered else "uncentred"
        parts = []
        for source in ("gaussian_null", "control", "shuffled"):
            row = _value(ranks, source=source, statistic=stat, centered=centered, site=best.site)
            if not row.empty:
                parts.append(f"{_fmt(row.iloc[0].value)} for {SOURCE_LABELS[source]}")
        nulls = (" vs " + ", ".join(parts)) if parts else ""
        out.append(
            f"- {label}: the lowest r@{tau:g} of the deltas over sites is at `{best.site}`: "
            f"{_fmt(best.value)} of {int(best.max_rank)} possible "
            f"(CI [{_fmt(best.ci_low)}, {_fmt(best.ci_high)}]){nulls}."
        )
        med = {s: _value(ranks, source=s, statistic=stat, centered=centered)["value"].median()
               for s in SOURCE_LABELS if not _value(ranks, source=s, centered=centered).empty}
        out.append(f"- {label}, median r@{tau:g} over sites: "
                   + ", ".join(f"{s} {_fmt(v, 1)}" for s, v in med.items()) + ".")
    coll = result.collective
    share = _value(coll, source="deltas", statistic="energy_share")
    if not share.empty:
        best = share.loc[share["value"].idxmax()]
        parts = [f"{_fmt(_value(coll, source=s, statistic='energy_share', site=best.site).iloc[0].value, 3)}"
                 f" for {SOURCE_LABELS[s]}"
                 for s in ("gaussian_null", "control", "shuffled")
                 if not _value(coll, source=s, statistic="energy_share", site=best.site).empty]
        out.append(
            f"- Largest share of delta energy along the mean delta: {_fmt(best.value, 3)} at "
            f"`{best.site}` (CI [{_fmt(best.ci_low, 3)}, {_fmt(best.ci_high, 3)}])"
            + (" vs " + ", ".join(parts) if parts else "") + "."
        )
    acc = _value(coll, source="deltas", statistic="id_accuracy")
    if not acc.empty:
        best = acc.loc[acc["value"].idxmax()]
        chance = _value(coll, source="deltas", statistic="id_chance", site=best.site).iloc[0].value
        out.append(
            f"- User identification from held-out per-query residual shifts: best accuracy "
            f"{_fmt(best.value, 3)} at `{best.site}` vs chance {_fmt(chance, 3)} "
            f"(binomial p = {best.p_value:.2g}); median over sites {_fmt(acc['value'].median(), 3)}."
        )
    return out


def _rank_table(result: AnalysisResult, centered: bool, taus: list[float]) -> list[str]:
    ranks = result.ranks[result.ranks["centered"] == centered]
    mid = 0.9 if any(math.isclose(t, 0.9) for t in taus) else taus[0]
    header = ["layer", "site", "source"]
    for tau in taus:
        header += [f"r@{tau:g}", "‰"]
    header.append(f"r@{mid:g} CI")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (layer, site), group in ranks.groupby(["layer", "site"], sort=True):
        for source in SOURCE_LABELS:
            rows = group[group.source == source].set_index("statistic")
            if rows.empty:
                continue
            cells = [str(layer), f"`{site}`", source]
            for tau in taus:
                cells += [_fmt(rows.loc[f"rank@{tau:g}", "value"]),
                          _fmt(rows.loc[f"per_mille@{tau:g}", "value"], 1)]
            ci = rows.loc[f"rank@{mid:g}"]
            cells.append(f"[{_fmt(ci.ci_low)}, {_fmt(ci.ci_high)}]")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _collective_table(result: AnalysisResult) -> list[str]:
    coll = result.collective
    if coll.empty:
        return ["(no statistics)"]
    sources = [s for s in SOURCE_LABELS if (coll.source == s).any()]
    header = (["layer", "site"] + [f"energy share ({s})" for s in sources]
              + ["mean cos to mean", "median cos", "personal/collective norm (rms)",
                 "F between/within (p)", "user id acc (chance, p)"])
    lines = [
        "Energy share = share of delta energy along the mean delta; cos to mean, norm ratio: "
        "deltas only. F and user identification use the per-query deltas (residual = per-query "
        "delta minus the mean training delta; the last queries of each user are held out).",
        "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for (layer, site), group in coll.groupby(["layer", "site"], sort=True):
        d = group[group.source == "deltas"].set_index("statistic")

        def get(stat: str, digits: int = 3, frame: pd.DataFrame = d) -> str:
            return _fmt(frame.loc[stat, "value"], digits) if stat in frame.index else "n/a"

        cells = [str(layer), f"`{site}`"]
        for s in sources:
            cells.append(get("energy_share", frame=group[group.source == s].set_index("statistic")))
        cells += [get("cos_to_mean_mean"), get("cos_to_mean_median"), get("norm_ratio_rms", 2)]
        cells.append(f"{get('f_ratio', 2)} (p = {d.loc['f_ratio', 'p_value']:.2g})"
                     if "f_ratio" in d.index else "n/a")
        cells.append(f"{get('id_accuracy')} ({get('id_chance')}, p = {d.loc['id_accuracy', 'p_value']:.2g})"
                     if "id_accuracy" in d.index else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
