"""Publish a run's small results into ``figures/demo/`` (or ``figures/NAME/``) and redraw the figures from them.

Usage: python analyses/publish_demo.py RUN_DIR [--dest figures] [--name demo]

A multi-seed directory (``run --seeds``) is published whole: ``seeds_summary.*``, ``pooled/`` and
each ``seed{s}/`` with its own figures, e.g.
``python analyses/publish_demo.py runs/movielens40 --name movielens40``.

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


SEEDS_PUBLISHED = ("seeds_summary.*", "pooled/*")
"""What a multi-seed directory adds beside its seeds' runs."""


def copy_run(run_dir: Path, target: Path, patterns=PUBLISHED) -> list[Path]:
    """Copy the files of ``run_dir`` matching ``patterns`` into ``target`` (same layout)."""
    copied = []
    for pattern in patterns:
        for src in sorted(run_dir.glob(pattern)):
            dst = target / src.relative_to(run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied.append(dst)
    return copied


def publish_seeds(run_dir: Path, target: Path) -> list[Path]:
    """A multi-seed run (``--seeds``): its summary, its pooled evaluation and each seed's run,
    each seed's figures beside its report (``seed{s}/figures/``)."""
    copied = copy_run(run_dir, target, SEEDS_PUBLISHED)
    for seed_dir in sorted(p for p in run_dir.glob("seed*") if p.is_dir()):
        copied += copy_run(seed_dir, target / seed_dir.name, (*PUBLISHED, "figures/*.png"))
    return copied


def publish_demo(run_dir: Path, dest: Path, target: Path) -> list[Path]:
    """One run: its files into ``target``, its figures into ``dest`` (the README's ``figures/``),
    then the shift and steering figures redrawn from the copies."""
    copied = copy_run(run_dir, target)
    report = target / "report.md"
    if report.is_file():  # the run's figures are published one level up, in DEST itself
        report.write_text(report.read_text().replace("](figures/", "](../"))
    for png in sorted((run_dir / "figures").glob("*.png")):
        shutil.copy2(png, dest / png.name)  # every figure as the run drew it
        copied.append(dest / png.name)
    if (target / "analysis").is_dir():
        copied += save_shift_figures(target / "analysis", dest)
    if (target / "steer" / "steer.csv").is_file():
        copied += save_steer_figures(target / "steer", dest)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dest", type=Path, default=Path("figures"))
    parser.add_argument("--name", default="demo", help="published as DEST/NAME (default: demo)")
    args = parser.parse_args(argv)
    target = args.dest / args.name
    if target.exists():
        shutil.rmtree(target)
    seeds = (args.run_dir / "seeds_summary.json").is_file()
    copied = publish_seeds(args.run_dir, target) if seeds else publish_demo(args.run_dir, args.dest, target)
    for path in copied:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
