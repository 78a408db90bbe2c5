"""``RUN/analysis/report.md``: the shift analysis as paper-style tables, with its nulls and controls.

:func:`render_report` is a pure function of an ``AnalysisResult``
(``perfit_probe.analysis.tables``): rank tables next to the nulls, collective statistics, the
controls and user identification against the text baselines.
"""

from __future__ import annotations

import math

import pandas as pd

from perfit_probe.analysis.tables import EXTRA_TABLES, TABLES, TEXT_SITE, AnalysisResult

SOURCE_LABELS = {
    "deltas": "deltas",
    "gaussian_null": "Gaussian vectors with matched norms",
    "control": "random-text control deltas",
    "shuffled": "user-shuffled deltas",
    "other_user": "other-user history deltas",
    "format_random": "format-matched random history deltas",
    "permuted": "rating-permuted history deltas",
}

SOURCE_NOTES = {
    "gaussian_null": "ranks: median and central range over repeated draws",
    "control": "neutral words of the history's token length, not format-matched",
    "shuffled": "a user's enhanced mean minus another user's plain mean; mean-centred it differs "
                "from the deltas only by the spread of plain means, so it is no yardstick for "
                "centred ranks",
    "other_user": "the items the retriever picks for the user's query from a donor user's profile",
    "format_random": "random items from all users' profiles with random outputs, length-matched",
    "permuted": "the user's own retrieved items with their outputs permuted among them",
}

NULL_LABELS = {
    "gaussian_null": "isotropic Gaussian, matched norms",
    "anisotropic_null": "Gaussian with the deltas' covariance, mean zero",
}


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
        "r(tau) = smallest k with energy(k) >= tau; per-mille = 1000 r / max rank, the max "
        "rank being min(n_users, d_model) uncentred and min(n_users - 1, d_model) mean-centred. "
        f"Intervals: {100 * cfg.get('ci_level', 0.95):g}% percentile intervals of the statistic "
        f"over {cfg.get('bootstrap')} bootstrap resamples of users ({cfg.get('n_boot')} "
        "resamples); for the Gaussian null, the median rank and the central range of "
        f"{cfg.get('n_null_draws')} independent draws.",
        "",
        "Sources: " + "; ".join(f"`{k}`: {v}" + (f" ({SOURCE_NOTES[k]})" if k in SOURCE_NOTES else "")
                                for k, v in SOURCE_LABELS.items()) + ".",
    ]
    if meta.get("skipped_sources"):
        lines += ["", f"Not available in these deltas (skipped): {', '.join(meta['skipped_sources'])}."]
    if meta.get("controls_not_cached"):
        lines += ["", "Control variants not cached (add them to the cache stage's `variants`): "
                  + ", ".join(meta["controls_not_cached"]) + "."]
    lines += ["", "## Headline", ""] + _headline(result, taus)
    for centered in (False, True):
        if not (result.ranks["centered"] == centered).any():
            continue
        lines += ["", f"## Ranks, {'mean-centred' if centered else 'uncentred'} deltas", ""]
        lines += _rank_table(result, centered, taus)
    lines += ["", "## Ranks against repeated Gaussian null draws", ""] + _null_test_table(result)
    lines += ["", "## Intervals that miss their point estimate", ""] + _interval_check(result)
    lines += ["", "## Collective versus personal shift", ""] + _collective_table(result)
    lines += ["", "## Controls for claims 1-2", ""] + _controls_section(result, cfg.get("alpha", 0.05))
    lines += ["", "## User identification: hidden states against prompt text", ""]
    lines += _identification_section(result)
    lines += ["", "## Files", "",
              ", ".join(f"`{name}`" for name in {**TABLES, **EXTRA_TABLES}.values())
              + " in this directory; "
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
        for source in [s for s in SOURCE_LABELS if s != "deltas"]:
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
                 for s in SOURCE_LABELS if s != "deltas"
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


def _range(values, digits: int = 3) -> str:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return _fmt(lo, digits) if math.isclose(lo, hi) else f"{_fmt(lo, digits)}-{_fmt(hi, digits)}"


def _null_test_table(result: AnalysisResult) -> list[str]:
    tests = result.null_tests
    if tests.empty:
        return ["(no repeated null draws: n_null_draws = 0)"]
    n_draws = int(tests["n_draws"].iloc[0])
    lines = [
        f"The deltas' r(tau) against {n_draws} independent draws of each null. p = (1 + number "
        "of draws with rank <= observed) / (1 + draws): small when the deltas' rank is lower "
        "than nearly every draw (conservative with tied ranks; `null_tests.csv` also has a "
        "p-value with ties broken at random, exactly uniform under the null). Nulls: "
        + "; ".join(f"`{k}`: {v}" for k, v in NULL_LABELS.items()) + ". The anisotropic null "
        "keeps the spread of the personal shifts and drops the collective one: uncentred, it "
        "tests whether the low rank comes from the shared mean; centred, it reproduces the "
        "deltas' own spectrum, so a large p is expected (a calibration check).",
        "",
        "| layer | site | null | centred | statistic | observed | null median [range] | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in tests.sort_values(["layer", "null", "centered", "statistic"], kind="stable").itertuples():
        lines.append(f"| {row.layer} | `{row.site}` | {row.null} | {'yes' if row.centered else 'no'} | "
                     f"{row.statistic} | {_fmt(row.observed)} | {_fmt(row.null_median)} "
                     f"[{_fmt(row.null_low, 1)}, {_fmt(row.null_high, 1)}] | {row.p_value:.3g} |")
    return lines


def _interval_check(result: AnalysisResult) -> list[str]:
    """Every interval that does not contain its value, grouped, with the reason."""
    groups: dict[tuple, list[str]] = {}
    for frame in (result.ranks, result.collective):
        if frame.empty:
            continue
        has = frame["ci_low"].notna() & frame["ci_high"].notna()
        miss = frame[has & ((frame["value"] < frame["ci_low"] - 1e-9)
                            | (frame["value"] > frame["ci_high"] + 1e-9))]
        for row in miss.itertuples():
            if row.statistic.startswith("per_mille@"):
                continue  # same interval as the rank, rescaled
            centred = getattr(row, "centered", None)
            tag = "" if centred is None else (" (centred)" if centred else " (uncentred)")
            side = "below" if row.value < row.ci_low else "above"
            groups.setdefault((row.source, row.statistic + tag, side), []).append(str(row.layer))
    if not groups:
        return ["Every interval contains its point estimate."]
    lines = [
        f"{sum(len(v) for v in groups.values())} interval(s) miss their point estimate (per-mille "
        "rows, which repeat the rank intervals, not counted). Reasons: a bootstrap resample of "
        "users has fewer effective users (duplicates in the classic bootstrap, unequal weights "
        "in the Bayesian one). (1) The rank of a spread-out (not low-rank) set of deltas falls "
        "with the number of effective users, so resampled ranks sit below the full-sample rank. "
        "(2) Statistics of the mean direction (collective norm, energy share, cosine to the "
        "mean, norm ratios) are biased under resampling when users spread widely around a "
        "small mean: the resampled mean leans towards heavily weighted users, so its norm and "
        "the alignment with it grow. These intervals measure stability across user samples, "
        "not coverage of a population value.",
        "",
    ]
    for (source, stat, side), layers in groups.items():
        lines.append(f"- {source} {stat}: value {side} its interval at layer(s) {', '.join(layers)}")
    return lines


def _controls_section(result: AnalysisResult, alpha: float) -> list[str]:
    ctl = result.controls
    if ctl.empty:
        return ["(no control deltas: cache the `control`, `other_user`, `format_random` or "
                "`permuted` variants)"]
    ranks, coll = result.ranks, result.collective
    lines = [
        "Per site and control: cos = cosine between the real mean delta and the control's mean "
        "delta (uncentred); norms = mean over users of ||delta_u||, real vs control; paired test "
        "= Wilcoxon signed-rank of the per-user norms (two-sided), with the median of "
        f"(real - control); direction at alpha = {alpha:g}. r@0.9 and the energy share along "
        "the control's own mean delta are the control deltas' own rank and collective statistics.",
        "",
        "| layer | site | control | cos(mean real, mean control) | norm real / control | "
        "median diff | Wilcoxon p | direction | r@0.9 uncentred | r@0.9 centred | energy share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ctl.sort_values(["layer", "control"], kind="stable").itertuples():
        r_u = _value(ranks, site=row.site, source=row.control, statistic="rank@0.9", centered=False)
        r_c = _value(ranks, site=row.site, source=row.control, statistic="rank@0.9", centered=True)
        share = _value(coll, site=row.site, source=row.control, statistic="energy_share")
        cell = lambda f, d=0: _fmt(f.iloc[0].value, d) if not f.empty else "n/a"  # noqa: E731
        lines.append(
            f"| {row.layer} | `{row.site}` | {row.control} | {_fmt(row.cos_mean_delta, 3)} | "
            f"{_fmt(row.norm_real_mean, 2)} / {_fmt(row.norm_control_mean, 2)} | "
            f"{_fmt(row.norm_diff_median, 2)} | {row.wilcoxon_p:.2g} | {row.direction} | "
            f"{cell(r_u)} | {cell(r_c)} | {cell(share, 3)} |")
    lines.append("")
    for control, group in ctl.groupby("control", sort=False):
        group = group.sort_values("layer")
        by_dir = {d: [str(v) for v in group.loc[group.direction == d, "layer"]]
                  for d in ("real > control", "control > real", "no clear difference")}
        words = {"real > control": "real history larger", "control > real": "control larger",
                 "no clear difference": "no clear difference"}
        parts = [f"{words[d]} at layer(s) {', '.join(layers)}" for d, layers in by_dir.items() if layers]
        verdict = ("layer-dependent" if by_dir["real > control"] and by_dir["control > real"]
                   else "the same at every layer" if len([1 for v in by_dir.values() if v]) == 1
                   else "mixed")
        lines.append(
            f"- `{control}` ({SOURCE_LABELS.get(control, control)}): cos of the mean deltas "
            f"{_range(group['cos_mean_delta'].tolist())}; paired per-user norms: "
            + "; ".join(parts) + f" ({verdict}).")
    return lines


def _identification_section(result: AnalysisResult) -> list[str]:
    ident = result.identification
    if ident.empty:
        return ["(no per-query deltas: no user identification)"]
    text = ident[ident.site == TEXT_SITE]
    hidden = ident[ident.site != TEXT_SITE]
    lines = [
        "The same classifier and held-out split (the last queries of each user) on: per-query "
        "hidden-state shifts (`hidden_state`), the same under each cached control variant "
        "(`hidden_state_<variant>`, labelled by the query's owner), and features of the "
        "enhanced prompt's added history alone: one-hot retrieved item ids (`item_ids`) and "
        "TF-IDF of the history text (`history_tfidf`), which do not depend on the site.",
        "",
        "| layer | site | features | accuracy | chance | p |",
        "|---|---|---|---|---|---|",
    ]
    for row in pd.concat([text, hidden.sort_values(["layer", "features"], kind="stable")]).itertuples():
        layer = "-" if row.site == TEXT_SITE else str(row.layer)
        lines.append(f"| {layer} | `{row.site}` | {row.features} | {_fmt(row.accuracy, 3)} | "
                     f"{_fmt(row.chance, 3)} | {row.p_value:.2g} |")
    lines += [""] + _identification_verdict(text, hidden)
    return lines


def _identification_verdict(text: pd.DataFrame, hidden: pd.DataFrame) -> list[str]:
    real = hidden[hidden.features == "hidden_state"]
    if real.empty:
        return []
    out = []
    acc = real.set_index("site")["accuracy"]
    if not text.empty:
        best = text.loc[text["accuracy"].idxmax()]
        wins = int((acc < best.accuracy).sum())
        ties = int((acc == best.accuracy).sum())
        n = len(acc)
        if wins == n:
            lead = "The prompt text wins at every site"
        elif wins == 0 and ties == 0:
            lead = "The hidden-state shifts win at every site"
        else:
            lead = f"The prompt text wins at {wins} of {n} sites" + (f" (ties at {ties})" if ties else "")
        out.append(
            f"- {lead}: the best text baseline (`{best.features}`) names the user of a held-out "
            f"query with accuracy {_fmt(best.accuracy, 3)}, the hidden-state shifts with "
            f"{_range(acc.tolist())} (chance {_fmt(real['chance'].iloc[0], 3)})."
            + (" Identification and the F statistic then measure which history text was added "
               "at least as much as a representation shift." if wins else ""))
    for features, group in hidden[hidden.features != "hidden_state"].groupby("features", sort=False):
        variant = features.removeprefix("hidden_state_")
        paired = group.set_index("site")["accuracy"].reindex(acc.index)
        higher = int((paired >= acc).sum())
        out.append(
            f"- Under the `{variant}` control the hidden-state shifts identify the user with "
            f"accuracy {_range(group['accuracy'].tolist())}, as high as or higher than with the "
            f"user's own history at {higher} of {len(acc)} sites.")
    return out
