"""Tests and intervals of the causal checks, and the one-line verdicts the report quotes.

Pure functions of the checks' tables (``perfit_probe.evaluation.steer``); the resampling
building blocks are those of ``perfit_probe.evaluation.uncertainty`` (``resample_weights``:
cluster-bootstrap counts of users; ``swap_patterns``: user-blocked sign patterns).

**Swap** (one row per (donor A, recipient B) pair; pairs share users, so the unit is the
*recipient*, all of whose pairs are kept together):

- ``s_AB = sign(dist_own - dist_swap)`` (+1: B's prediction moved toward A's behaviour).
  The share of pairs with ``s = +1`` is tested with a sign-flip test over recipients of the
  per-recipient means ``m_B = mean_A s_AB``: ``T = mean_B m_B``; under "no directional
  movement" each ``m_B`` is symmetric about 0, so ``T* = mean_B eps_B m_B`` with random signs
  ``eps`` is its null distribution; two-sided ``p = (1 + #{|T*| >= |T|}) / (1 + n_perm)``, or
  the exact share over all ``2^n_recipients`` patterns when that is ``<= n_perm``. The mean
  distance reduction is tested the same way with ``m_B`` the recipient's mean reduction.
- The correlation of the shift ``p_AB - p_BB`` with the gap ``mu_A - mu_B`` (ratings) is
  tested by permuting the donors *within* each recipient (each recipient's gaps shuffled
  among its own pairs): recipient-level effects (any foreign intervention pulls B's
  predictions the same way) stay in the null, only "which donor" is broken;
  ``p = (1 + #{|r*| >= |r|}) / (1 + n_perm)``.
- Intervals: percentile intervals of a bootstrap over recipients (``resample_weights``; a
  recipient drawn twice brings its pairs twice); the share is the pooled share of the drawn
  pairs, the correlation the weighted Pearson correlation.

**Ablation**: the real subspace's effect ``lost`` (metric change toward worse) against
``n`` random subspaces: ``percentile = 100 (#{random < real} + #{random = real} / 2) / n``
and the one-sided empirical ``p = (1 + #{random >= real}) / (1 + n)``.

**Dose**: per alpha, cluster-bootstrap intervals over test users of the headline metric
and of the mean prediction (the same resampled users at every alpha), and of the best
alpha (the alpha with the best metric in each resample).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from perfit_probe.evaluation.uncertainty import (
    QueryStats,
    metric_from_sums,
    resample_weights,
    swap_patterns,
)

_TIE = 1e-12


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _group_sums(values: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    np.add.at(out, codes, values)
    return out


def sign_flip_p(per_unit: np.ndarray, patterns: np.ndarray, exact: bool) -> float:
    """Two-sided p of ``mean(per_unit) = 0`` by flipping each unit's sign (``patterns`` 0/1: flip)."""
    observed = abs(float(per_unit.mean()))
    flipped = np.abs(((1 - 2 * patterns) @ per_unit) / len(per_unit))
    extreme = int((flipped >= observed - _TIE * max(1.0, observed)).sum())
    return extreme / len(patterns) if exact else (1 + extreme) / (1 + len(patterns))


def weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x``, ``y`` with row weights ``w [..., n]`` (nan where undefined)."""
    w = np.atleast_2d(w)
    total = w.sum(-1, keepdims=True)
    mx, my = (w @ x)[:, None] / total, (w @ y)[:, None] / total
    dx, dy = x[None] - mx, y[None] - my
    cov = (w * dx * dy).sum(-1)
    var = (w * dx ** 2).sum(-1) * (w * dy ** 2).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, cov / np.sqrt(np.where(var > 0, var, 1)), np.nan)


def within_group_permutations(codes: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_perm, n]`` index arrays, each permuting the rows only among rows of the same code."""
    base = np.argsort(codes, kind="stable")
    order = np.argsort(codes[None, :] + rng.random((n_perm, len(codes))), axis=1)
    out = np.empty((n_perm, len(codes)), dtype=np.int64)
    out[:, base] = order
    return out


def swap_tests(pairs: pd.DataFrame, rng: np.random.Generator, *, n_boot: int = 2000, n_perm: int = 10000,
               level: float = 0.95) -> list[dict]:
    """Counts, p-values and recipient-bootstrap intervals of the swap (see the module docstring)."""
    if pairs.empty:
        return []
    recipients = pd.Index(sorted(pairs.recipient.astype(str).unique()))
    codes = recipients.get_indexer(pairs.recipient.astype(str))
    n_rec = len(recipients)
    weights = resample_weights(n_rec, n_boot, rng)
    patterns, exact = swap_patterns(n_rec, n_perm, rng)
    per_rec = _group_sums(np.ones(len(pairs)), codes, n_rec)
    rows = [{"metric": "n_recipients", "value": float(n_rec)},
            {"metric": "n_perm", "value": float(len(patterns))}]

    def mean_rows(name: str, values: np.ndarray, count: bool) -> None:
        sums = _group_sums(values, codes, n_rec)
        boot = (weights @ sums) / (weights @ per_rec)
        low, high = _interval(boot, level)
        if count:
            rows.append({"metric": f"n_{name.removesuffix('_share')}", "value": float(values.sum())})
        rows.extend([{"metric": f"{name}_ci_low", "value": low}, {"metric": f"{name}_ci_high", "value": high}])

    for name, own, swap in (("toward_donor_share", "own_distance", "swap_distance"),
                            ("toward_donor_pred_share", "own_distance_pred", "swap_distance_pred")):
        diff = (pairs[own] - pairs[swap]).to_numpy(dtype=np.float64)
        mean_rows(name, (diff > 0).astype(np.float64), count=True)
        signs = _group_sums(np.sign(diff), codes, n_rec) / per_rec
        rows.append({"metric": f"{name}_p", "value": sign_flip_p(signs, patterns, exact)})
    reduction = (pairs.own_distance - pairs.swap_distance).to_numpy(dtype=np.float64)
    mean_rows("distance_reduction", reduction, count=False)
    rows.append({"metric": "distance_reduction_p",
                 "value": sign_flip_p(_group_sums(reduction, codes, n_rec) / per_rec, patterns, exact)})
    if "donor_mean" in pairs.columns and len(pairs) > 2:
        gap = (pairs.donor_mean - pairs.recipient_mean).to_numpy(dtype=np.float64)
        shift = (pairs.swap_pred - pairs.own_pred).to_numpy(dtype=np.float64)
        observed = float(weighted_corr(gap, shift, np.ones(len(gap)))[0])
        boot = weighted_corr(gap, shift, weights[:, codes])
        low, high = _interval(boot, level)
        perms = within_group_permutations(codes, n_perm, rng)
        null = np.abs(weighted_corr_rows(gap[perms], shift))
        p = (1 + int((null >= abs(observed) - _TIE).sum())) / (1 + n_perm) if np.isfinite(observed) else float("nan")
        rows.extend([{"metric": "shift_gap_correlation_ci_low", "value": low},
                     {"metric": "shift_gap_correlation_ci_high", "value": high},
                     {"metric": "shift_gap_correlation_p", "value": float(p)}])
    return [{"experiment": "swap", "setting": "pairs", **r} for r in rows]


def weighted_corr_rows(xs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``xs [m, n]`` with ``y [n]``."""
    dx = xs - xs.mean(1, keepdims=True)
    dy = y - y.mean()
    denom = np.sqrt((dx ** 2).sum(1) * (dy ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dx @ dy) / np.where(denom > 0, denom, 1), np.nan)


def random_percentile(real: float, random: Sequence[float]) -> dict:
    """Where ``real`` falls among ``random`` values (see the module docstring)."""
    random = np.asarray(random, dtype=np.float64)
    random = random[np.isfinite(random)]
    n = len(random)
    if n == 0 or not np.isfinite(real):
        return {"percentile": float("nan"), "p_value": float("nan"), "n": float(n)}
    below = float((random < real).sum())
    ties = float((random == real).sum())
    return {"percentile": 100 * (below + ties / 2) / n, "p_value": (1 + float((random >= real).sum())) / (1 + n),
            "n": float(n)}


def summary(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean and central ``level`` percentile range of ``values`` (nan entries ignored)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = _interval(values, level)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if len(finite) else float("nan"), "q025": low, "q975": high}


def dose_intervals(stats: dict[float, QueryStats], metric: str, higher_is_better: bool,
                   rng: np.random.Generator, *, n_boot: int = 2000, level: float = 0.95) -> list[dict]:
    """Intervals over test users at each alpha of ``metric`` and ``mean_pred`` (when present), and of the best alpha.

    ``stats[alpha]`` holds per-query statistics with the same queries at every alpha
    (``uncertainty.query_statistics``; ``mean_pred`` as statistics ``[expected, 1]``).
    """
    alphas = sorted(stats)
    if not alphas:
        return []
    users = pd.Index(sorted(set(stats[alphas[0]].keys.get_level_values(0))))
    weights = resample_weights(len(users), n_boot, rng)
    rows, boots = [], []
    for alpha in alphas:
        qs = stats[alpha]
        codes = users.get_indexer(qs.keys.get_level_values(0))
        for name in (metric, "mean_pred"):
            if name not in qs.stats:
                continue
            sums = np.zeros((len(users), qs.stats[name].shape[1]))
            np.add.at(sums, codes, qs.stats[name])
            boot = metric_from_sums(name, weights @ sums)
            low, high = _interval(boot, level)
            rows += [{"experiment": "dose", "setting": f"{alpha:g}", "metric": f"{name}_ci_low", "value": low},
                     {"experiment": "dose", "setting": f"{alpha:g}", "metric": f"{name}_ci_high", "value": high}]
            if name == metric:
                boots.append(boot)
    values = np.array([float(metric_from_sums(metric, stats[a].stats[metric].sum(0))) for a in alphas])
    pick = np.argmax if higher_is_better else np.argmin
    worst = -np.inf if higher_is_better else np.inf
    boot = np.stack(boots, 1)  # [n_boot, n_alphas]; ties go to the smallest alpha
    best_boot = np.array(alphas)[pick(np.where(np.isfinite(boot), boot, worst), axis=1)]
    low, high = _interval(best_boot, level)
    best = int(pick(np.where(np.isfinite(values), values, worst)))
    return rows + [{"experiment": "dose", "setting": "best", "metric": name, "value": float(value)}
                   for name, value in (("alpha", alphas[best]), ("alpha_ci_low", low), ("alpha_ci_high", high),
                                       (metric, values[best]))]


# ---------------------------------------------------------------------- verdicts
def _get(rows: pd.DataFrame, experiment: str, setting: str, metric: str) -> float:
    sel = rows[(rows.experiment == experiment) & (rows.setting.astype(str) == setting) & (rows.metric == metric)]
    return float(sel.value.iloc[0]) if len(sel) else float("nan")


def _p(value: float) -> str:
    return "n/a" if not np.isfinite(value) else (f"{value:.2g}" if value >= 0.001 else f"{value:.1e}")


def _g(value: float, digits: int = 3) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}g}"


def verdicts(rows: pd.DataFrame) -> list[str]:
    """One-line verdicts of the swap, ablation and dose checks from ``steer.csv`` (those that ran)."""
    out = []
    ex = set(rows.experiment)
    if "swap" in ex and np.isfinite(_get(rows, "swap", "pairs", "n_toward_donor")):
        n = int(_get(rows, "swap", "pairs", "n_pairs"))
        n_rec = int(_get(rows, "swap", "pairs", "n_recipients"))
        for name, what in (("toward_donor", "the donor's history behaviour"),
                           ("toward_donor_pred", "the donor's predicted behaviour")):
            k = int(_get(rows, "swap", "pairs", f"n_{name}"))
            out.append(f"user swap: {k} of {n} pairs move toward {what} (p = {_p(_get(rows, 'swap', 'pairs', f'{name}_share_p'))}, "
                       f"95% CI of the share {_get(rows, 'swap', 'pairs', f'{name}_share_ci_low'):.0%}-"
                       f"{_get(rows, 'swap', 'pairs', f'{name}_share_ci_high'):.0%}; "
                       f"sign-flip test and bootstrap over {n_rec} recipients)")
        corr = _get(rows, "swap", "pairs", "shift_gap_correlation")
        if np.isfinite(corr):
            out.append(f"user swap: the shift correlates {corr:.2f} with the donor-recipient gap "
                       f"(p = {_p(_get(rows, 'swap', 'pairs', 'shift_gap_correlation_p'))}, donors permuted within "
                       f"recipients; 95% CI {_get(rows, 'swap', 'pairs', 'shift_gap_correlation_ci_low'):.2f} to "
                       f"{_get(rows, 'swap', 'pairs', 'shift_gap_correlation_ci_high'):.2f})")
    pct = _get(rows, "ablation", "perfit_ablate_personal", "random_percentile")
    if "ablation" in ex and np.isfinite(pct):
        n = int(_get(rows, "ablation", "random_subspaces", "n"))
        k = int(_get(rows, "ablation", "subspace", "k"))
        out.append(f"ablation: the personal subspace (k = {k}) costs {_g(_get(rows, 'ablation', 'perfit_ablate_personal', 'metric_lost'))} "
                   f"of the metric ({_get(rows, 'ablation', 'perfit_ablate_personal', 'gain_removed'):.0%} of the personal gain), "
                   f"at the {pct:.0f}th percentile of {n} random {k}-dimensional subspaces (random: mean "
                   f"{_g(_get(rows, 'ablation', 'random_subspaces', 'metric_lost_mean'))}, 95% range "
                   f"{_g(_get(rows, 'ablation', 'random_subspaces', 'metric_lost_q025'))} to "
                   f"{_g(_get(rows, 'ablation', 'random_subspaces', 'metric_lost_q975'))}; empirical "
                   f"p = {_p(_get(rows, 'ablation', 'perfit_ablate_personal', 'random_p'))})")
    alpha = _get(rows, "dose", "best", "alpha")
    if "dose" in ex and np.isfinite(alpha):
        best = rows[(rows.experiment == "dose") & (rows.setting.astype(str) == "best")]
        metric = next((m for m in best.metric if not m.startswith("alpha")), "metric")
        line = (f"dose: best alpha {alpha:g} by {metric} ({_g(_get(rows, 'dose', 'best', metric))}; 95% CI of the best "
                f"alpha {_get(rows, 'dose', 'best', 'alpha_ci_low'):g} to {_get(rows, 'dose', 'best', 'alpha_ci_high'):g}, "
                "bootstrap over test users)")
        dose = rows[(rows.experiment == "dose") & (rows.metric == "mean_pred")]
        numeric = pd.to_numeric(dose.setting, errors="coerce")
        dose = dose[numeric.notna()].assign(alpha=numeric[numeric.notna()]).sort_values("alpha")
        if len(dose) > 1:
            line += (f"; mean prediction {dose.value.iloc[0]:.2f} at alpha {dose.alpha.iloc[0]:g} -> "
                     f"{dose.value.iloc[-1]:.2f} at alpha {dose.alpha.iloc[-1]:g}")
        out.append(line)
    return out
