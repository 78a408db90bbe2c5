"""``perfit-probe evaluate RUN_DIR``: LaMP metrics of PerFit against the baselines."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import add_model_arguments, csv_items, model_from_args
from perfit_probe.evaluation.evaluate import DECODINGS, METHODS, EvalConfig
from perfit_probe.evaluation.lora import LoraBaselineConfig
from perfit_probe.stages import evaluate as evaluate_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory fitted by `perfit-probe fit`")
    add_model_arguments(parser, from_run=True)
    parser.add_argument("--methods", type=csv_items, default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--decoding", choices=DECODINGS, default="auto",
                        help="auto: constrained to the label set for classification/rating, greedy for generation")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=None, help="history items in the rag prompt (default: the fit's)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longer prompts keep their last tokens (default: no limit)")
    parser.add_argument("--stemmer", action="store_true", help="ROUGE with the Porter stemmer (LaMP: none)")
    lora = parser.add_argument_group("LoRA baselines: per user, OPPU's task LoRA, OPPU (OPPU defaults)")
    lora.add_argument("--lora-rank", type=int, default=8)
    lora.add_argument("--lora-lr", type=float, default=1e-4)
    lora.add_argument("--lora-epochs", type=int, default=2)
    lora.add_argument("--lora-targets", type=csv_items, default=(), help="module names (default: q_proj,v_proj)")
    lora.add_argument("--lora-task-lr", type=float, default=1e-4, help="OPPU's shared task LoRA: learning rate")
    lora.add_argument("--lora-task-epochs", type=int, default=2, help="OPPU's shared task LoRA: epochs")
    lora.add_argument("--lora-val-per-user", type=int, default=None,
                      help="history examples per user held out to pick each per-user LoRA's epoch (0 = none) "
                           "(default: the fit's --val-per-user, the same examples PerFit's stage 2 holds out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The ``EvalConfig`` that parsed arguments describe."""
    lora = LoraBaselineConfig(rank=args.lora_rank, alpha=float(args.lora_rank), lr=args.lora_lr,
                              epochs=args.lora_epochs, targets=args.lora_targets)
    lora_task = replace(lora, lr=args.lora_task_lr, epochs=args.lora_task_epochs)
    return EvalConfig(methods=args.methods, decoding=args.decoding, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, k=args.k, max_prompt_tokens=args.max_prompt_tokens,
                      use_stemmer=args.stemmer, lora=lora, lora_task=lora_task, seed=args.seed,
                      val_per_user=args.lora_val_per_user)


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    config = config_from_args(args)
    loaded = model_from_args(args, args.run_dir)
    result = evaluate_stage.run(config, args.run_dir, loaded, progress=not args.no_progress)
    print((args.run_dir / "eval" / "results.md").read_text())
    print(f"wrote {args.run_dir / 'eval'} ({len(result.evaluation.table)} methods)")
    return 0
