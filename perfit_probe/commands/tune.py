"""``perfit-probe tune``: a random search of PerFit's and the LoRA baselines' settings, on validation only.

Example::

    perfit-probe tune --task movielens --users 24 --max-queries 12 --heldout 6 \\
        --max-profile-examples 12 --val-per-user 3 --trials 8 --out runs/tuned
    perfit-probe tune ... --trials 8 --apply --out runs/tuned   # then fit and evaluate with the choice

The options of ``perfit-probe fit`` give the base settings (data, prompts, what is not searched);
the search options give the choices (``perfit_probe.evaluation.search_space``). The stage
(``perfit_probe.stages.tune``) runs the search and writes ``RUN/tune/``.
"""

from __future__ import annotations

import argparse

from perfit_probe._repro import seed_everything
from perfit_probe.commands import fit as fit_command
from perfit_probe.commands.common import csv_items, model_from_args
from perfit_probe.evaluation.evaluate import DECODINGS, EvalConfig
from perfit_probe.evaluation.lora import LoraBaselineConfig
from perfit_probe.evaluation.search_space import SEARCHES, SELECT_BY, LoraSpace, PerFitSpace, TuneConfig
from perfit_probe.evaluation.tune import config_fields
from perfit_probe.stages import tune as tune_stage


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in csv_items(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in csv_items(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _layer_sets(text: str) -> tuple[tuple[int, ...], ...]:
    return tuple(_ints(part) for part in text.split(";") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fit_command.add_arguments(parser)
    parser.set_defaults(val_per_user=3)  # stage-2 trials are scored on these rows
    d, p, q = TuneConfig(), PerFitSpace(), LoraSpace()
    group = parser.add_argument_group("search (PerFit: lr and epochs of both stages, ranks, layers, positions; "
                                      "LoRA: lr, epochs, rank of the task LoRA and of the per-user LoRA)")
    group.add_argument("--trials", type=int, default=d.n_trials,
                       help="trials per stage of each searched method, the same for all (default %(default)s)")
    group.add_argument("--search", type=csv_items, default=d.searches,
                       help=f"methods searched, a subset of {','.join(SEARCHES)} (default: both)")
    group.add_argument("--lrs", type=_floats, default=None, help=f"PerFit learning rates (default {_show(p.lrs)})")
    group.add_argument("--epoch-choices", type=_ints, default=None, help=f"PerFit epochs (default {_show(p.epochs)})")
    group.add_argument("--collective-ranks", type=_ints, default=None, help=f"default {_show(p.collective_ranks)}")
    group.add_argument("--personal-ranks", type=_ints, default=None, help=f"default {_show(p.personal_ranks)}")
    group.add_argument("--layer-sets", type=_layer_sets, default=None,
                       help="layer sets separated by ';', e.g. '8,14;6,12;14' (default: --layers and sets at "
                            "27/47%%, 17/37%% and 47/67%% of the depth)")
    group.add_argument("--position-choices", type=csv_items, default=None,
                       help=f"position specs (default {_show(p.positions)})")
    group.add_argument("--lora-lrs", type=_floats, default=None, help=f"LoRA learning rates (default {_show(q.lrs)})")
    group.add_argument("--lora-epoch-choices", type=_ints, default=None,
                       help=f"LoRA epochs (default {_show(q.epochs)})")
    group.add_argument("--lora-ranks", type=_ints, default=None, help=f"LoRA ranks (default {_show(q.ranks)})")
    group.add_argument("--stage1-val-queries", type=int, default=d.stage1_val_queries,
                       help="queries held out of each train user to score stage-1 trials (default %(default)s)")
    group.add_argument("--select-by", choices=SELECT_BY, default=d.select_by,
                       help="keep the trial with the best task metric (ties: lower loss) or the lowest "
                            "validation loss (default %(default)s)")
    ev = parser.add_argument_group("scoring and LoRA base settings (as `perfit-probe evaluate`)")
    ev.add_argument("--decoding", choices=DECODINGS, default="auto")
    ev.add_argument("--eval-batch-size", type=int, default=16, help="prompts per scoring pass")
    ev.add_argument("--eval-max-prompt-tokens", type=int, default=None,
                    help="longer prompts keep their last tokens when scored (default: no limit)")
    ev.add_argument("--lora-targets", type=csv_items, default=(), help="LoRA modules (default: q_proj,v_proj)")
    parser.add_argument("--apply", action="store_true",
                        help="then fit and evaluate --out with the tuned settings (`fit` + `evaluate`)")


def _show(values) -> str:
    return ",".join(str(v) for v in values)


def tune_config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The ``TuneConfig`` that parsed arguments describe (unset choices: the default space)."""
    perfit = {k: v for k, v in (("lrs", args.lrs), ("epochs", args.epoch_choices),
                                ("collective_ranks", args.collective_ranks), ("personal_ranks", args.personal_ranks),
                                ("layer_sets", args.layer_sets), ("positions", args.position_choices)) if v is not None}
    lora = {k: v for k, v in (("lrs", args.lora_lrs), ("epochs", args.lora_epoch_choices),
                              ("ranks", args.lora_ranks)) if v is not None}
    return TuneConfig(n_trials=args.trials, searches=tuple(args.search), perfit=PerFitSpace(**perfit),
                      lora=LoraSpace(**lora), stage1_val_queries=args.stage1_val_queries,
                      select_by=args.select_by, seed=args.seed)


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The base ``EvalConfig`` of the scoring and the LoRA baselines."""
    lora = LoraBaselineConfig(targets=tuple(args.lora_targets))
    return EvalConfig(decoding=args.decoding, batch_size=args.eval_batch_size,
                      max_prompt_tokens=args.eval_max_prompt_tokens, lora=lora, lora_task=lora, seed=args.seed)


# ---------------------------------------------------------------------- the command
def _summary(result: tune_stage.TuneStageResult) -> list[str]:
    search = result.search
    lines = [f"tune written to {result.tune_dir} ({len(search.trials)} trials)"]
    for (method, stage), trial in search.chosen.items():
        n = sum(1 for t in search.trials if (t.method, t.stage) == (method, stage))
        lines.append(f"  {method} {stage}: trial {trial.trial} of {n}, {trial.metric} {trial.value:.4f} "
                     f"(validation loss {trial.val_loss:.4f}, {trial.n_val} rows): "
                     f"{config_fields(method, stage, trial.settings)}; "
                     f"{search.wall_s.get(f'{method}/{stage}', float('nan')):.0f} s for {n} trials")
    for name, flags in tune_stage.command_flags(search).items():
        lines.append(f"  {name} flags: {flags}")
    lines.append(f"  pipeline config keys: {result.tune_dir / 'tuned.toml'}")
    return lines


def run(args: argparse.Namespace) -> int:
    fit = fit_command.config_from_args(args)
    config = tune_config_from_args(args)
    fit.validate()
    config.validate()  # fail on bad options before loading anything
    seed_everything(fit.seed)
    loaded = model_from_args(args)
    result = tune_stage.run(config, args.out, loaded, fit=fit, evaluate=eval_config_from_args(args),
                            progress=not args.quiet, overwrite=args.force, apply=args.apply)
    for line in _summary(result):
        print(line)
    if result.evaluation is not None:
        print((result.evaluation.eval_dir / "results.md").read_text())
        print(f"applied: fit and evaluated {result.run.path} ({len(result.evaluation.table)} methods)")
    return 0
