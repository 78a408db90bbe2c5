"""Regenerate the evaluation figures of a run from its saved CSVs (no model is run).

Usage: ``python analyses/eval_figures.py RUN_DIR [--out DIR]`` reads ``RUN_DIR/eval/uncertainty.csv``
and ``differences.csv`` and writes ``eval_intervals.png`` and ``eval_differences.png`` into
``--out`` (default ``RUN_DIR/figures``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perfit_probe.plotting.eval_figures import save_eval_figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="figures directory (default RUN_DIR/figures)")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    eval_dir = args.run_dir / "eval"
    if not (eval_dir / "uncertainty.csv").is_file():
        print(f"no {eval_dir / 'uncertainty.csv'}: run `perfit-probe evaluate {args.run_dir}` first", file=sys.stderr)
        return 2
    for path in save_eval_figures(eval_dir, args.out or args.run_dir / "figures", dpi=args.dpi):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
