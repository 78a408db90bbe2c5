"""``perfit-probe steer RUN_DIR``: user swap, subspace ablation, dose response, control."""

from __future__ import annotations

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, RunDirArg, load_cli_model
from perfit_probe.config import RecordedModel, SteerConfig
from perfit_probe.stages import steer as steer_stage


def steer(run_dir: RunDirArg, config: Flat[SteerConfig], model: Flat[RecordedModel] = RecordedModel(),
          figures: bool = True, progress: bool = True) -> int:
    """Causal checks: user swap, subspace ablation, dose response, control.

    Args:
        run_dir: A run directory fitted by `perfit-probe fit`.
        config: Which checks and how (``perfit_probe.config.SteerConfig``).
        model: The model (default: the one RUN_DIR/run.json records).
        figures: Draw the figures (else the CSVs only).
        progress: Show a progress bar.
    """
    seed_everything(config.seed)
    loaded = load_cli_model(model, model, run_dir)
    result = steer_stage.run(config, run_dir, loaded, figures=figures, progress=progress).checks
    shown = result.rows[result.rows.experiment != "reference"]
    for row in shown.itertuples():
        print(f"  {row.experiment:>9} {row.setting:>24} {row.metric:>24} = {row.value:.4g}")
    for line in result.verdicts:
        print(f"  {line}")
    print(f"wrote {run_dir / 'steer' / 'steer.csv'}")
    return 0
