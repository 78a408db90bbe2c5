"""``perfit-probe evaluate RUN_DIR``: LaMP metrics of PerFit against the baselines."""

from __future__ import annotations

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, RunDirArg, load_cli_model
from perfit_probe.config import EvalConfig, RecordedModel
from perfit_probe.stages import evaluate as evaluate_stage


def evaluate(run_dir: RunDirArg, config: Flat[EvalConfig], model: Flat[RecordedModel] = RecordedModel(),
             progress: bool = True) -> int:
    """Evaluate a fitted run against baselines with the LaMP metrics.

    Args:
        run_dir: A run directory fitted by `perfit-probe fit`.
        config: What to evaluate (``perfit_probe.config.EvalConfig``).
        model: The model (default: the one RUN_DIR/run.json records).
        progress: Show a progress bar.
    """
    seed_everything(config.seed)
    loaded = load_cli_model(model, model, run_dir)
    result = evaluate_stage.run(config, run_dir, loaded, progress=progress)
    print((run_dir / "eval" / "results.md").read_text())
    print(f"wrote {run_dir / 'eval'} ({len(result.evaluation.table)} methods)")
    return 0
