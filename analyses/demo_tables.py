"""Print the README's demo tables from a run directory (every number comes from its files).

    python analyses/demo_tables.py figures/demo

Sections: the verdicts (``claims.md``), claim 3 (``eval/results.csv`` with the intervals of
``eval/uncertainty.csv``), claims 1-2 per site (``analysis/ranks.csv``, ``analysis/null_tests.csv``,
``analysis/collective.csv``, ``analysis/controls.csv``, ``analysis/identification.csv``), the
causal checks (``steer/verdicts.md``) and the cost (``metrics.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def _ci(frame: pd.DataFrame, method: str, metric: str) -> str:
    row = frame[(frame.method == method) & (frame.metric == metric)]
    if row.empty:
        return "-"
    r = row.iloc[0]
    return f"{r.estimate:.3f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def claim3(run: Path) -> str:
    results = pd.read_csv(run / "eval" / "results.csv")
    intervals = pd.read_csv(run / "eval" / "uncertainty.csv")
    lines = ["| method | MAE [95% CI] | RMSE [95% CI] | MAE of expected rating | trainable params per user | shared params |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in results.itertuples():
        expected = "-" if pd.isna(getattr(row, "expected_mae", float("nan"))) else f"{row.expected_mae:.3f}"
        lines.append(f"| {row.method} | {_ci(intervals, row.method, 'mae')} | {_ci(intervals, row.method, 'rmse')} | "
                     f"{expected} | {int(row.params_per_user):,} | {int(row.shared_params):,} |")
    return "\n".join(lines)


def claims12(run: Path) -> str:
    a = run / "analysis"
    ranks, nulls = pd.read_csv(a / "ranks.csv"), pd.read_csv(a / "null_tests.csv")
    collective, controls = pd.read_csv(a / "collective.csv"), pd.read_csv(a / "controls.csv")
    ident = pd.read_csv(a / "identification.csv")

    def rank(site, source, centered):
        r = ranks[(ranks.site == site) & (ranks.source == source) & (ranks.centered == centered)
                  & (ranks.statistic == "rank@0.9")]
        return "-" if r.empty else f"{r.value.iloc[0]:g}"

    def null_p(site, centered):
        r = nulls[(nulls.site == site) & (nulls.null == "gaussian_null") & (nulls.centered == centered)
                  & (nulls.statistic == "rank@0.9")]
        return "-" if r.empty else f"{r.p_value.iloc[0]:.3f}"

    text = ident[ident.features.isin(["item_ids", "history_tfidf"])]
    text_best = text.accuracy.max() if not text.empty else float("nan")
    lines = ["| layer | r@0.9 uncentred: deltas / Gaussian (p) / other-user / format-random | r@0.9 centred: same | "
             "energy along the mean delta | cos(mean delta, other-user / format-random mean delta) | "
             "user id accuracy: hidden state / other-user history (text baseline best: "
             f"{text_best:.2f}) |", "|---|---|---|---:|---|---|"]
    for site in dict.fromkeys(ranks.site):
        layer = int(ranks[ranks.site == site].layer.iloc[0])
        cells = []
        for centered in (False, True):
            cells.append(f"{rank(site, 'deltas', centered)} / {rank(site, 'gaussian_null', centered)} "
                         f"({null_p(site, centered)}) / {rank(site, 'other_user', centered)} / "
                         f"{rank(site, 'format_random', centered)}")
        share = collective[(collective.site == site) & (collective.source == "deltas")
                           & (collective.statistic == "energy_share")].value
        cos = controls[controls.site == site].set_index("control").cos_mean_delta
        acc = ident[ident.site == site].set_index("features").accuracy
        lines.append(f"| {layer} | {cells[0]} | {cells[1]} | {share.iloc[0]:.3f} | "
                     f"{cos.get('other_user', float('nan')):.3f} / {cos.get('format_random', float('nan')):.3f} | "
                     f"{acc.get('hidden_state', float('nan')):.2f} / {acc.get('hidden_state_other_user', float('nan')):.2f} |")
    return "\n".join(lines)


def cost(run: Path) -> str:
    pipe = json.loads((run / "metrics.json").read_text())["pipeline"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in pipe["stage_wall_s"].items())
    return f"{pipe['total_wall_s']:.0f} s of pipeline time ({stages}); peak RSS {pipe['peak_rss_gib']:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    run = parser.parse_args().run
    print((run / "claims.md").read_text())
    print("## Claim 3\n\n" + claim3(run) + "\n")
    print("## Claims 1-2\n\n" + claims12(run) + "\n")
    verdicts = run / "steer" / "verdicts.md"
    if verdicts.is_file():
        print("## Causal checks\n\n" + verdicts.read_text())
    print("## Cost\n\n" + cost(run))


if __name__ == "__main__":
    main()
