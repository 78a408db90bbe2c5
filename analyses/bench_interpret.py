"""Time the ``interpret`` stage on a run directory, next to one plain scoring pass over the same prompts.

    python analyses/bench_interpret.py runs/demo-<time>        # a copy of the run is used

Prints the stage's wall time and its ratio to one base-model pass of constrained scoring over
the run's held-out prompts (timed in the same process, on the same model and threads), so the
number can be compared across machines. The stage's target on the demo: under 2 minutes on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from perfit_probe.commands.common import recorded_model
    from perfit_probe.evaluation.evaluate import heldout_examples, predict
    from perfit_probe.config import InterpretConfig
    from perfit_probe.models import load_model
    from perfit_probe.stages import interpret as interpret_stage
    from perfit_probe.stages.fitted import load_fitted_run, prompt_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with cache, fit and evaluate done")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recorded = recorded_model(args.run)
    loaded = load_model(recorded["name"] or "smollm2", dtype=recorded["dtype"] or "float32",
                        device=recorded["device"] or "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("cache"))
        fitted = load_fitted_run(run, loaded)
        settings = prompt_settings(run)
        examples = heldout_examples(fitted.task, fitted.split, loaded.tokenizer, variants=("plain",), k=settings.k,
                                    retriever=settings.retriever, chat=settings.chat, seed=settings.seed)
        t0 = time.perf_counter()
        predict(loaded, [e.prompt for e in examples], fitted.task.spec, chat=settings.chat,
                max_prompt_tokens=settings.max_prompt_tokens)
        unit = time.perf_counter() - t0
        t0 = time.perf_counter()
        interpret_stage.run(InterpretConfig(), run, loaded, figures=True)
        stage = time.perf_counter() - t0
    print(f"| what | wall s | x one scoring pass |\n|---|---:|---:|\n"
          f"| one base-model scoring pass over {len(examples)} held-out prompts | {unit:.1f} | 1.00 |\n"
          f"| interpret stage (default settings, figures included) | {stage:.1f} | {stage / unit:.1f} |")
    print(f"target: under 120 s on 2 CPU cores -> {'met' if stage < 120 else 'NOT met'} ({args.threads} threads)")


if __name__ == "__main__":
    main()
