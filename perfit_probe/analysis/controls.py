"""Real history against its controls: direction of the mean shift and paired per-user norms.

For a site, with the real deltas ``x_u`` and a control's deltas ``c_u`` (the random-text
``control``, or a format-matched control variant of ``perfit_probe.data.controls``) of the
same ``n`` users:

- ``cos_mean_delta``: ``cos(mean_u x_u, mean_u c_u)``, uncentred: whether the control moves
  the mean hidden state along the same direction as the history does;
- ``norm_diff_median``: median over users of ``||x_u|| - ||c_u||``;
- ``wilcoxon_stat``, ``wilcoxon_p``: Wilcoxon signed-rank test of the paired norms
  (two-sided, zero differences dropped; ``p = 1`` when every difference is zero);
- ``direction``: ``real > control`` or ``control > real`` (the sign of the median difference)
  when ``wilcoxon_p < alpha``, else ``no clear difference``.

The rank and collective statistics of each control's own deltas are computed like those of
any source (``perfit_probe.analysis.tables``).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from scipy.stats import wilcoxon

CONTROL_COLUMNS = ["site", "layer", "control", "n_users", "cos_mean_delta", "norm_real_mean",
                   "norm_control_mean", "norm_diff_median", "wilcoxon_stat", "wilcoxon_p", "direction"]
"""Columns of the controls table (``controls.csv``), one row per site x control."""

DIRECTIONS = ("real > control", "control > real", "no clear difference")
_TINY = 1e-30


def compare_to_control(real: Float[np.ndarray, "users d_model"], control: Float[np.ndarray, "users d_model"],
                       alpha: float = 0.05) -> dict:
    """The statistics of the module docstring for ``real`` and ``control`` (``[n, d]`` each)."""
    real = np.asarray(real, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    if real.shape != control.shape:
        raise ValueError(f"real {real.shape} and control {control.shape} deltas differ in shape")
    mu_r, mu_c = real.mean(0), control.mean(0)
    denom = np.linalg.norm(mu_r) * np.linalg.norm(mu_c)
    cos = float(mu_r @ mu_c / denom) if denom > _TINY else float("nan")
    nr, nc = np.linalg.norm(real, axis=1), np.linalg.norm(control, axis=1)
    diff = nr - nc
    if np.all(diff == 0):
        stat, p = float("nan"), 1.0
    else:
        res = wilcoxon(nr, nc, alternative="two-sided", zero_method="wilcox")
        stat, p = float(res.statistic), float(res.pvalue)
    median = float(np.median(diff))
    if p < alpha and median > 0:
        direction = DIRECTIONS[0]
    elif p < alpha and median < 0:
        direction = DIRECTIONS[1]
    else:
        direction = DIRECTIONS[2]
    return {"n_users": len(real), "cos_mean_delta": cos, "norm_real_mean": float(nr.mean()),
            "norm_control_mean": float(nc.mean()), "norm_diff_median": median,
            "wilcoxon_stat": stat, "wilcoxon_p": p, "direction": direction}
