"""Publish a demo run's small results into ``figures/demo/`` and redraw the figures from them.

Usage: python analyses/publish_demo.py RUN_DIR [--dest figures]

Copies the run's tables and reports (no activations, no weights) into ``DEST/demo/`` with the
run-directory layout, then regenerates every figure from those copies only, so the committed
figures can be redrawn at any time with::

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
    "run.json", "metrics.json", "report.md",
    "analysis/*.csv", "analysis/analysis.json", "analysis/report.md",
    "eval/results.csv", "eval/results.md",
    "steer/steer.csv", "steer/swap_pairs.csv",
    "perfit/curves.csv", "perfit/params.json", "perfit/split.json", "perfit/task.json",
    "deltas/deltas.csv",
)


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
    for path in save_shift_figures(target / "analysis", args.dest):
        print(path)
    if (target / "steer" / "steer.csv").is_file():
        for path in save_steer_figures(target / "steer", args.dest):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
