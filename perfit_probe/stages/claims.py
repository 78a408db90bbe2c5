"""The paper's three claims, judged from the statistics a pipeline run wrote (no sentence is hand-written).

Each verdict is computed from a generated file of the run directory, at level ``alpha``:

- **Claim 1, low rank** (``analysis/null_tests.csv``, ``analysis/ranks.csv``): at each site, the
  rank at tau = 0.9 of the deltas against repeated draws of isotropic Gaussian vectors with the
  deltas' norms (``gaussian_null``, uncentred and centred). *Holds* at a site when the observed
  rank is below the draws with p < alpha. Whether low rank is specific to history is judged
  against the format-matched controls: the rank of the controls' deltas at the same site.
- **Claim 2, collective + personal** (``analysis/collective.csv``, ``analysis/controls.csv``,
  ``analysis/identification.csv``): the collective shift is the share of the deltas' energy
  along their mean and its cosine to each control's mean delta (a cosine near 1 with
  ``other_user``/``format_random`` means the collective shift is a format effect); the
  personal shift is nearest-centroid identification of a held-out query's user from its
  residual shift, against chance (p < alpha) and against the same classifier on the prompt
  text (retrieved item ids, TF-IDF of the history): *beyond prompt text* only when the hidden
  state identifies better than the best text baseline.
- **Claim 3, PerFit matches per-user LoRA/OPPU** (``eval/differences.csv``, ``eval/results.csv``):
  the paired difference of the headline metric between OPPU (and the per-user LoRA) and PerFit
  with its 95% bootstrap interval over test users and permutation p; *no detectable difference*
  unless the interval excludes 0 and p < alpha (the interval's ends are then the largest
  differences the run can exclude), and the same against the best trivial baseline, which
  *beats* PerFit when the difference is decided in its favour. Each sentence also gives the true
  difference the run detects with 80% power (``detectable_difference``: 2.8 standard errors).

- **Capability** (a ``capability.json`` of ``perfit_probe.evaluation.capability``, when given):
  the verdict of the check whose recipe is the run's fit recipe: whether its personal stage can
  learn a planted per-user bias at all.

``claim_table(run_dir)`` returns one row per verdict; ``claims_markdown(frame)`` words them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from perfit_probe._io import to_jsonable
from perfit_probe.config import FIT_DATA_FIELDS, FitConfig
from perfit_probe.errors import ArtifactError
from perfit_probe.evaluation.metrics import HIGHER_IS_BETTER, METRICS
from perfit_probe.evaluation.uncertainty import detectable_difference

CLAIM_COLUMNS = ["claim", "scope", "verdict", "statistic", "value", "reference", "ci_low", "ci_high", "p_value",
           "sentence"]
"""Columns of ``claims.csv``."""

FORMAT_CONTROLS = ("other_user", "format_random", "permuted", "control")


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else None


def _row(claim: str, scope: str, verdict: str, statistic: str, value: float, sentence: str, *,
         reference: float = float("nan"), ci: tuple[float, float] = (float("nan"), float("nan")),
         p: float = float("nan")) -> dict:
    return {"claim": claim, "scope": scope, "verdict": verdict, "statistic": statistic, "value": value,
            "reference": reference, "ci_low": ci[0], "ci_high": ci[1], "p_value": p, "sentence": sentence}


def _p(p: float) -> str:
    return "n/a" if p != p else f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def claim1(analysis: Path, alpha: float) -> list[dict]:
    """Low rank against repeated isotropic Gaussian draws, and the controls' ranks."""
    nulls, ranks = _read(analysis / "null_tests.csv"), _read(analysis / "ranks.csv")
    if nulls is None:
        return []
    rows = []
    for centered in (False, True):
        part = nulls[(nulls["null"] == "gaussian_null") & (nulls["statistic"] == "rank@0.9")
                     & (nulls["centered"] == centered)]
        if part.empty:
            continue
        holds = part[part["p_value"] < alpha]
        scope = "centred" if centered else "uncentred"
        worst = part.loc[part["p_value"].idxmax()]
        controls = ""
        if ranks is not None:
            r = ranks[(ranks["statistic"] == "rank@0.9") & (ranks["centered"] == centered)]
            mine = r[r["source"] == "deltas"].set_index("site")["value"]
            parts = []
            for control in FORMAT_CONTROLS:
                theirs = r[r["source"] == control].set_index("site")["value"]
                common = mine.index.intersection(theirs.index)
                if len(common):
                    lower = int((mine[common] < theirs[common]).sum())
                    parts.append(f"{control} {lower}/{len(common)}")
            if parts:
                controls = (" Sites where the history's deltas have a lower rank than a control's: "
                            + ", ".join(parts) + ".")
        verdict = "holds" if len(holds) == len(part) else "partly" if len(holds) else "not shown"
        sentence = (f"Claim 1 ({scope}): the deltas' rank at 90% energy is below {int(part['n_draws'].iloc[0])} "
                    f"isotropic Gaussian draws with p < {alpha:g} at {len(holds)} of {len(part)} sites "
                    f"(ranks {', '.join(f'{v:g}' for v in part['observed'])} vs null medians "
                    f"{', '.join(f'{v:g}' for v in part['null_median'])}; largest p {_p(worst['p_value'])}): "
                    f"**{verdict}**.{controls}")
        rows.append(_row("1", scope, verdict, "sites_below_gaussian_null", float(len(holds)), sentence,
                         reference=float(len(part)), p=float(worst["p_value"])))
    return rows


def claim2(analysis: Path, alpha: float) -> list[dict]:
    """Collective shift (energy share, cosine to the controls' mean delta) and personal shift
    (identification against chance and against the prompt text)."""
    rows = []
    collective, controls = _read(analysis / "collective.csv"), _read(analysis / "controls.csv")
    if collective is not None:
        share = collective[(collective["source"] == "deltas") & (collective["statistic"] == "energy_share")]
        if not share.empty:
            cos = ""
            if controls is not None and "cos_mean_delta" in controls:
                by = controls.groupby("control")["cos_mean_delta"].agg(["min", "max"])
                cos = (" Cosine of the mean delta with each control's mean delta (min-max over sites): "
                       + ", ".join(f"{c} {r['min']:.2f}-{r['max']:.2f}" for c, r in by.iterrows())
                       + "; near 1 for a control means the collective shift is also there without the user's own history.")
            lo, hi = share["value"].min(), share["value"].max()
            verdict = "holds" if lo >= 0.5 else "partly" if hi >= 0.5 else "not shown"
            rows.append(_row("2", "collective", verdict, "energy_share_along_mean", float(share["value"].median()),
                             f"Claim 2 (collective): the mean delta holds {lo:.0%}-{hi:.0%} of the deltas' energy "
                             f"across sites: **{verdict}**.{cos}", ci=(float(lo), float(hi))))
    ident = _read(analysis / "identification.csv")
    if ident is not None and not ident.empty:
        hidden = ident[ident["features"] == "hidden_state"]
        text = ident[ident["features"].isin(["item_ids", "history_tfidf"])]
        other = ident[ident["features"] == "hidden_state_other_user"]
        if not hidden.empty:
            best = hidden.loc[hidden["accuracy"].idxmax()]
            above = int((hidden["p_value"] < alpha).sum())
            text_best = text.loc[text["accuracy"].idxmax()] if not text.empty else None
            beyond = text_best is not None and best["accuracy"] > text_best["accuracy"]
            verdict = ("holds" if above and (text_best is None or beyond) else
                       "confounded by prompt text" if above else "not shown")
            parts = [f"Claim 2 (personal): a held-out query's user is named from its hidden-state shift with accuracy "
                     f"{hidden['accuracy'].min():.2f}-{best['accuracy']:.2f} across sites (chance {best['chance']:.2f}; "
                     f"p < {alpha:g} at {above} of {len(hidden)} sites)"]
            if text_best is not None:
                parts.append(f"the same classifier on the prompt text ({text_best['features']}) reaches "
                             f"{text_best['accuracy']:.2f}")
            if not other.empty:
                parts.append(f"and on the shift of another user's history {other['accuracy'].max():.2f} at best")
            rows.append(_row("2", "personal", verdict, "identification_accuracy", float(best["accuracy"]),
                             "; ".join(parts) + f": **{verdict}**.",
                             reference=float(text_best["accuracy"]) if text_best is not None else float("nan"),
                             p=float(hidden["p_value"].min())))
    return rows


CLAIM3_METHODS = ("oppu", "lora")
"""The per-user LoRA methods claim 3 sets PerFit against."""


def headline_metric(available, kind: str | None = None) -> str | None:
    """The first of the task kind's metrics (any kind's when None) that ``available`` holds."""
    available = set(available)
    return next((m for k, ms in METRICS.items() if kind is None or k == kind for m in ms if m in available), None)


def claim3(evaluation: Path, kind: str | None, alpha: float) -> list[dict]:
    """PerFit against OPPU, the per-user LoRA and the best trivial baseline, on the headline metric."""
    diffs, results = _read(evaluation / "differences.csv"), _read(evaluation / "results.csv")
    if diffs is None or results is None:
        return []
    metric = headline_metric(diffs["metric"], kind)
    if metric is None:
        return []
    better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    table = results.set_index("method")
    params = table["params_per_user"] if "params_per_user" in table else pd.Series(dtype=float)
    rows = []
    for method in CLAIM3_METHODS:
        d = diffs[(diffs["method"] == method) & (diffs["against"] == "reference") & (diffs["metric"] == metric)]
        if d.empty:
            continue
        d = d.iloc[0]
        contains = _undecided(d, alpha)
        perfit_better = (d["estimate"] > 0) == (better == "lower")
        verdict = ("no detectable difference" if contains else
                   "PerFit better" if perfit_better else f"{method} better")
        ratio = (f"; PerFit trains {params.get('perfit', np.nan):,.0f} parameters per user, {method} "
                 f"{params.get(method, np.nan):,.0f}" if method in params and "perfit" in params else "")
        rows.append(_row("3", f"vs {method}", verdict, f"{metric}_difference", float(d["estimate"]),
                         f"Claim 3 (vs {method}): {metric} of {method} minus PerFit = {d['estimate']:+.3f} "
                         f"(95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, p = {_p(d['p_value'])}, "
                         f"{int(d['n_users'])} test users; {better} is better): **{verdict}**"
                         + (f" — differences beyond {max(abs(d['ci_low']), abs(d['ci_high'])):.3f} are excluded"
                            if contains else "") + _power(d, alpha) + f"{ratio}.",
                         ci=(float(d["ci_low"]), float(d["ci_high"])), p=float(d["p_value"])))
    d = diffs[(diffs["method"] == "perfit") & (diffs["against"] == "best_baseline") & (diffs["metric"] == metric)]
    if not d.empty:
        d = d.iloc[0]
        worse = (d["estimate"] > 0) == (better == "lower")
        contains = _undecided(d, alpha)
        verdict = ("no detectable difference" if contains else
                   f"the trivial baseline {d['reference']} beats PerFit" if worse else "PerFit beats the best trivial baseline")
        rows.append(_row("3", "vs best trivial baseline", verdict, f"{metric}_difference", float(d["estimate"]),
                         f"Trivial baselines first: PerFit minus the best trivial baseline ({d['reference']}) = "
                         f"{d['estimate']:+.3f} {metric} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, "
                         f"p = {_p(d['p_value'])}): **{verdict}**{_power(d, alpha)}.",
                         ci=(float(d["ci_low"]), float(d["ci_high"])), p=float(d["p_value"])))
    return rows


def _power(row: pd.Series, alpha: float) -> str:
    """The true difference the run detects with 80% power (``detectable_difference``), as a clause."""
    level = row.get("level", 0.95)
    mde = detectable_difference(float(row["ci_low"]), float(row["ci_high"]), float(level), alpha)
    return f"; a true difference of {mde:.3f} would be detected with 80% power" if np.isfinite(mde) else ""


def _undecided(row: pd.Series, alpha: float) -> bool:
    """A difference is decided only when its interval excludes 0 *and* the permutation p < alpha
    (with few users the two can disagree: an exact test over 4 users cannot go below 1/8)."""
    return bool(row["ci_low"] <= 0 <= row["ci_high"] or not row["p_value"] < alpha)


@functools.cache
def _default_recipe() -> dict:
    return to_jsonable(dataclasses.asdict(FitConfig()))


def _recipe(fit: Mapping) -> dict:
    """A fit config's recipe: ``FitConfig``'s defaults for options a file predates, then the file's,
    without ``FIT_DATA_FIELDS`` but with the dtype; JSON's lists for tuples."""
    merged = {**_default_recipe(), **to_jsonable(dict(fit))}
    return {k: v for k, v in merged.items() if k not in FIT_DATA_FIELDS or k == "dtype"}


def _capability_records(path: Path) -> tuple[str | None, list[dict]]:
    """The model and the recipes of a ``capability.json``; a one-line ``ArtifactError`` otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        recipes = list(data["recipes"])
        missing = {key for recipe in recipes for key in ("recipe", "fit", "verdict") if key not in recipe}
        if missing:
            raise KeyError(f"a recipe without {sorted(missing)}")
        return data.get("model"), recipes
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path}: not a capability check's capability.json "
                            f"(analyses/capability.py writes one): {type(exc).__name__} {exc}") from None


def claim_capability(path: Path, fit: Mapping) -> list[dict]:
    """The capability check (``perfit_probe.evaluation.capability``'s ``capability.json`` at ``path``)
    of the recipe of ``fit`` (a resolved fit config as ``run.json`` stores it) on the same model:
    can this recipe's personal stage learn a planted per-user bias? A ``not checked`` row when no
    recipe there is the run's."""
    model, recipes = _capability_records(path)
    wanted = _recipe(fit)
    for recipe in recipes:
        if model != fit.get("model") or _recipe(recipe["fit"]) != wanted:
            continue
        summary, verdict = recipe["summary"], recipe["verdict"]
        consequence = ("it can, so a loss to a per-user baseline is not the recipe's inability to learn a bias"
                       if verdict == "learns" else
                       "so a loss to the per-user median may be this recipe's limit, not the representation's")
        return [_row("3", "capability", verdict, "perfit_mae_planted", float(summary["mae"]["perfit"]),
                     f"Capability of this run's fit recipe (recipe `{recipe['recipe']}` of `{Path(path).name}`): "
                     f"**{verdict}**: {recipe['sentence'].rstrip('.')}; {consequence}.",
                     reference=float(summary["noise_floor_realised"]), p=float(summary["p_vs_stage1"]))]
    names = ", ".join(f"`{r['recipe']}`" for r in recipes) or "none"
    return [_row("3", "capability", "not checked", "perfit_mae_planted", float("nan"),
                 f"Capability of this run's fit recipe: **not checked** — `{Path(path).name}` (model `{model}`) "
                 f"has no check of this recipe on model `{fit.get('model')}` (its recipes: {names}).")]


def run_fit_config(run_dir: Path) -> dict | None:
    """The resolved fit config a pipeline run's ``run.json`` records (None when it has none), its
    ``model`` replaced by the loaded model's identity name where recorded (as ``capability.json``'s)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    fit = ((info.get("config") or {}).get("resolved") or {}).get("fit")
    name = (info.get("model") or {}).get("name")
    return None if fit is None else {**fit, "model": name or fit.get("model")}


def claim_table(run_dir: Path, *, kind: str | None = None, alpha: float = 0.05,
                capability: Path | None = None) -> pd.DataFrame:
    """Every verdict the run's files support (empty when the stages have not run); with a
    ``capability.json``, the capability of the run's fit recipe (``claim_capability``)."""
    run_dir = Path(run_dir)
    rows = claim1(run_dir / "analysis", alpha) + claim2(run_dir / "analysis", alpha) + \
        claim3(run_dir / "eval", kind, alpha)
    fit = run_fit_config(run_dir)
    if capability is not None and fit is not None:
        rows += claim_capability(capability, fit)
    return pd.DataFrame.from_records(rows, columns=CLAIM_COLUMNS)


def claims_markdown(frame: pd.DataFrame, steer_verdicts: str = "") -> str:
    """The verdicts as a markdown section (and the causal checks' own verdict lines)."""
    lines = ["## Verdicts on the paper's claims (computed from this run's files)", ""]
    lines += [f"- {sentence}" for sentence in frame["sentence"]] or ["- (no stage output to judge)"]
    if steer_verdicts.strip():
        lines += ["", "Causal checks:", "", steer_verdicts.strip()]
    return "\n".join(lines) + "\n"
