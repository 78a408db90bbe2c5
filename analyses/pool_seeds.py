"""Pool the test users of a finished multi-seed run: ``OUT/pooled/`` as ``run --seeds`` writes it.

Usage: python analyses/pool_seeds.py OUT CONFIG

``OUT`` is a directory written by ``perfit-probe run CONFIG --seeds ... --out OUT`` (its
``seeds_summary.json`` names the runs); ``CONFIG`` the same TOML file, which gives the task and the
evaluation's uncertainty settings. Runs ``perfit_probe.stages.pooled.write_pooled``, the function
``run --seeds`` itself calls, so a multi-seed run made before pooling existed can be pooled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perfit_probe.config import load_pipeline_config, stage_configs
from perfit_probe.data.tasks import task_spec
from perfit_probe.errors import PerfitError
from perfit_probe.pipeline import check_capability
from perfit_probe.stages.pooled import write_pooled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    summary = json.loads((args.out / "seeds_summary.json").read_text())
    runs = {int(seed): args.out / Path(path).name for seed, path in summary["runs"].items()}
    config = load_pipeline_config(args.config)
    try:
        check_capability(config.capability)
    except PerfitError as exc:
        raise SystemExit(str(exc)) from None
    written = write_pooled(runs, args.out, task_spec(config.task.name), stage_configs(config)["evaluate"],
                           capability=config.capability)
    if written is None:
        raise SystemExit(f"no eval/predictions.csv in the runs of {args.out}")
    print(written / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
