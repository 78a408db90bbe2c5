"""Publish a demo run's small results into ``figures/demo/`` and redraw the figures from them.

Usage: python analyses/publish_demo.py RUN_DIR [--dest figures]

Copies the run's tables and reports (no activations, no weights) into ``DEST/demo/`` with the
run-directory layout and its figures into ``DEST/``, then redraws the shift and steering figures
from those copies only, so they can be redrawn at any time with::

    python analyses/shift_figures.py figures/demo --out figures
    python analyses/steer_figures.py figures/demo --out figures
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from perfit_probe.plotting.shift_figures import save_shift_figures
from perfit_probe.plotting.steer_figures import save_steer_figures

PUBLISHED = (
    "run.json", "metrics.json", "report.md", "claims.md", "claims.csv",
    "analysis/*.csv", "analysis/analysis.json", "analysis/report.md",
    "eval/*.csv", "eval/*.md", "eval/evaluation.json", "eval/predictions/*.json",
    "steer/*.csv", "steer/verdicts.md",
    "interpret/*.csv", "interpret/*.json", "interpret/report.md",
    "perfit/curves.csv", "perfit/params.json", "perfit/split.json", "perfit/task.json",
    "deltas/deltas.csv", "deltas/history.csv",
)
"""The run's tables, reports and metrics: every file a README number comes from (no
activations, weights or subspace bases)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dest", type=Path, default=Path("figures"))
    args = parser.parse_args(argv)
    target = args.dest / "demo"
    if target.exists():
        shutil.rmtree(target)
    for pattern in PUBLISHED:
        for src in sorted(args.run_dir.glob(pattern)):
            dst = target / src.relative_to(args.run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            if dst.name == "report.md" and dst.parent == target:
                # the run's figures are published one level up, in DEST itself
                dst.write_text(dst.read_text().replace("](figures/", "](../"))
            print(dst)
    for png in sorted((args.run_dir / "figures").glob("*.png")):
        shutil.copy2(png, args.dest / png.name)  # every figure as the run drew it
        print(args.dest / png.name)
    for path in save_shift_figures(target / "analysis", args.dest):
        print(path)
    if (target / "steer" / "steer.csv").is_file():
        for path in save_steer_figures(target / "steer", args.dest):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
