"""Compare the numbers of two runs' ``metrics.json``, timings aside: is the behaviour unchanged?

    python analyses/compare_runs.py RUN_BEFORE RUN_AFTER [--out figures/demo_same_numbers.md]

Every numeric leaf of both files is compared (keys holding wall times, ``*_s`` durations, memory,
paths and dates are skipped); prints one line per difference and a summary, and writes the
summary as markdown with ``--out``. Exit status 1 when a number differs or a key is missing on
one side (keys new in the later run are listed, not counted as differences).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

SKIP = re.compile(r"(^|/)(timings|host|created|path|versions|started|peak_rss\w*|\w*_s|\w*train_s\w*)(/|$)")
"""Keys whose values are measurements of the machine, not results."""


def leaves(tree, prefix: str = "") -> dict[str, object]:
    """``{"a/b/c": value}`` for every leaf of a JSON tree."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list):
        out = {}
        for i, value in enumerate(tree):
            out.update(leaves(value, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def same(a, b, rel: float) -> bool:
    """Equal values; floats within ``rel`` relative tolerance (NaN equals NaN)."""
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=rel, abs_tol=rel)
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rel", type=float, default=0.0, help="relative tolerance of floats (default exact)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as markdown here")
    args = parser.parse_args()
    before = {k: v for k, v in leaves(json.loads((args.before / "metrics.json").read_text())).items()
              if not SKIP.search(k)}
    after = {k: v for k, v in leaves(json.loads((args.after / "metrics.json").read_text())).items()
             if not SKIP.search(k)}
    differ = [k for k in before if k in after and not same(before[k], after[k], args.rel)]
    missing = [k for k in before if k not in after]
    new = [k for k in after if k not in before]
    for key in differ:
        print(f"differs  {key}: {before[key]!r} -> {after[key]!r}")
    for key in missing:
        print(f"missing  {key}")
    lines = [f"# Same numbers? `{args.before}` vs `{args.after}`", "",
             f"- numbers compared (timings, memory, paths and dates aside): {len(before)}",
             f"- equal: {len(before) - len(differ) - len(missing)}",
             f"- different: {len(differ)}", f"- missing in the later run: {len(missing)}",
             f"- new in the later run: {len(new)}", ""]
    lines += [f"  - differs: `{k}`: {before[k]!r} -> {after[k]!r}" for k in differ[:50]]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
