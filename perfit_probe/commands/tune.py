"""``perfit-probe tune``: a random search of PerFit's and the LoRA baselines' settings, on validation only.

Example::

    perfit-probe tune --task movielens --users 24 --max-queries 12 --heldout 6 \\
        --max-profile-examples 12 --val-per-user 3 --trials 8 --out runs/tuned
    perfit-probe tune ... --perfit.collective-ranks 4,8 --perfit.layer-sets 8+14,14 --lora.ranks 8 ...
    perfit-probe tune ... --trials 8 --apply --out runs/tuned   # then fit and evaluate with the choice

The options of ``perfit-probe fit`` give the base settings (data, prompts, what is not
searched); ``TuneConfig``'s the budget and the choices, ``--evaluate.*`` how trials are scored
and the LoRA baselines' base settings. The stage (``perfit_probe.stages.tune``) runs the search
and writes ``RUN/tune/``.
"""

from __future__ import annotations

from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, load_cli_model
from perfit_probe.config import FitConfig, ModelSource, TuneConfig
from perfit_probe.evaluation.tune import config_fields
from perfit_probe.stages import tune as tune_stage


def tune(out: Path, config: Flat[FitConfig] = FitConfig(val_per_user=3), search: Flat[TuneConfig] = TuneConfig(),
         source: Flat[ModelSource] = ModelSource(), apply: bool = False, force: bool = False,
         progress: bool = True) -> int:
    """Random search of PerFit's and the LoRA baselines' settings, scored on validation data only.

    Args:
        out: Run directory (new, or one made with the same model).
        config: The base fit (``perfit_probe.config.FitConfig``): data, prompts and what is not
            searched; ``val_per_user`` validation rows per test user score the stage-2 trials.
        search: The budget and the choices (``perfit_probe.config.TuneConfig``).
        source: Where model weights are looked for.
        apply: Then fit and evaluate OUT with the tuned settings.
        force: Replace an earlier search in OUT (and, with --apply, its fit).
        progress: Show progress bars.
    """
    config.validate()
    search.validate()  # fail on bad options before loading anything
    seed_everything(config.seed)
    loaded = load_cli_model(config, source)
    result = tune_stage.run(search, out, loaded, fit=config, progress=progress, overwrite=force, apply=apply)
    for line in summary_lines(result):
        print(line)
    if result.evaluation is not None:
        print((result.evaluation.eval_dir / "results.md").read_text())
        print(f"applied: fit and evaluated {result.run.path} ({len(result.evaluation.table)} methods)")
    return 0


def summary_lines(result: tune_stage.TuneStageResult) -> list[str]:
    """What ``perfit-probe tune`` prints: each stage's kept trial, the flags, where the files are."""
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
