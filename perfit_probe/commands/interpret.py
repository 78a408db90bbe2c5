"""``perfit-probe interpret RUN_DIR``: steering with the measured shifts, alignment and read-outs."""

from __future__ import annotations

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, RunDirArg, load_cli_model
from perfit_probe.config import InterpretConfig, RecordedModel
from perfit_probe.stages import interpret as interpret_stage


def interpret(run_dir: RunDirArg, config: Flat[InterpretConfig], model: Flat[RecordedModel] = RecordedModel(),
              figures: bool = True) -> int:
    """Steer with the measured shifts; align and read out the learned interventions.

    Args:
        run_dir: A run directory with deltas (cache) and a fit.
        config: What to study (``perfit_probe.config.InterpretConfig``).
        model: The model (default: the one RUN_DIR/run.json records).
        figures: Draw the figures (else the CSVs and the report only).
    """
    seed_everything(config.seed)
    loaded = load_cli_model(model, model, run_dir)
    result = interpret_stage.run(config, run_dir, loaded, figures=figures).readouts
    for note in result.notes:
        print(f"  note: {note}")
    if not result.kl.empty:
        top = result.kl[result.kl.alpha == max(config.alphas)]
        for row in top.itertuples():
            print(f"  KL at alpha={row.alpha:g} {row.site} {row.method:>10}: {row.mean:.4f} [{row.lo:.4f}, {row.hi:.4f}]")
    if not result.alignment.empty:
        for (site, bank), part in result.alignment.groupby(["site", "bank"], sort=False):
            print(f"  {site} {bank}: overlap with the delta subspace {part.overlap.mean():.3f} "
                  f"(random {part.null_overlap.mean():.3f}, percentile {part.percentile.mean():.0f})")
    print(f"wrote {run_dir / 'interpret' / 'report.md'}")
    return 0
