"""The ``perfit-probe`` command line: a thin layer over importable functions.

Each sub-command lives in its own module under ``perfit_probe.commands`` with
``add_arguments(parser)`` and ``run(args) -> int``. Any ``PerfitError`` becomes a one-line
message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from perfit_probe import __version__
from perfit_probe.errors import PerfitError

COMMANDS = {
    "demo": "run the whole pipeline on the embedded model and MovieLens data",
    "run": "run the pipeline described by a TOML config file",
    "backends": "cache hidden states through every backend and print their agreement",
    "cache": "cache hidden states of users' prompts and compute delta vectors",
    "analyze": "low-rank and collective/personal analysis of a run's delta vectors",
    "fit": "train PerFit interventions (stage 1 collective, stage 2 per user)",
    "evaluate": "evaluate a fitted run against baselines with the LaMP metrics",
    "steer": "causal checks: user swap, subspace ablation, dose response, control",
    "interpret": "steer with the measured shifts; align and read out the learned interventions",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="perfit-probe",
        description="Study and use personalization shifts in LLM hidden states (PerFit).",
    )
    parser.add_argument("--version", action="version", version=f"perfit-probe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"perfit_probe.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"perfit_probe.commands.{name}":
                continue  # command not built in this version
            raise
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "transformer_lens", "nnsight"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        return int(args._run(args) or 0)
    except PerfitError as exc:
        print(f"perfit-probe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"perfit-probe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
