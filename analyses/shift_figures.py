"""Regenerate the shift-analysis figures of a run from its saved CSVs (no recomputation).

Usage: python analyses/shift_figures.py RUN_DIR [--out figures/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perfit_probe.plotting.shift_figures import save_shift_figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory with analysis/*.csv")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output directory (default: figures/)")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    analysis = args.run_dir / "analysis"
    if not (analysis / "ranks.csv").is_file():
        parser.error(f"{analysis} has no ranks.csv: run `perfit-probe analyze {args.run_dir}` first")
    for path in save_shift_figures(analysis, args.out, dpi=args.dpi):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
