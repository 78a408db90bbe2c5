"""Regenerate the steering figures of a run from its saved CSVs (no model is run).

Usage: ``python analyses/steer_figures.py RUN_DIR [--out DIR]`` reads ``RUN_DIR/steer/steer.csv``
and ``swap_pairs.csv`` and writes ``steer_swap.png``, ``steer_ablation.png``,
``steer_dose.png`` and ``steer_control.png`` into ``--out`` (default ``RUN_DIR/figures``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perfit_probe.plotting.steer_figures import save_steer_figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="figures directory (default RUN_DIR/figures)")
    args = parser.parse_args(argv)
    steer_dir = args.run_dir / "steer"
    if not (steer_dir / "steer.csv").is_file():
        print(f"no {steer_dir / 'steer.csv'}: run `perfit-probe steer {args.run_dir}` first", file=sys.stderr)
        return 2
    for path in save_steer_figures(steer_dir, args.out or args.run_dir / "figures"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
