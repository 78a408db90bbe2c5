"""``perfit-probe fit``: train PerFit's collective (stage 1) and personal (stage 2) interventions.

Example::

    perfit-probe fit --task movielens --users 20 --layers 8,12 --positions f1+l2 \\
        --collective-rank 8 --personal-rank 4 --epochs1 2 --epochs2 2 --batch-size 8 --out runs/x

Under ``torchrun --nproc-per-node N perfit-probe fit ...`` stage-2 users are sharded across
the N processes (stage 1 runs on rank 0).
"""

from __future__ import annotations

from pathlib import Path

from perfit_probe._repro import seed_everything
from perfit_probe.commands.common import Flat, load_cli_model
from perfit_probe.config import FitConfig, ModelSource
from perfit_probe.interventions.train import describe_selection
from perfit_probe.stages import fit as fit_stage
from perfit_probe.stages.distributed import torchrun


def fit(config: Flat[FitConfig], out: Path, source: Flat[ModelSource] = ModelSource(), force: bool = False,
        progress: bool = True) -> int:
    """Train PerFit interventions (stage 1 collective, stage 2 per user).

    Args:
        config: What to fit (``perfit_probe.config.FitConfig``).
        out: Run directory (may already hold a cache).
        source: Where model weights are looked for.
        force: Replace an existing fit in OUT.
        progress: Show progress bars.
    """
    config.validate()  # fail on bad options before loading anything
    with torchrun(config.device) as ranks:
        seed_everything(config.seed)
        loaded = load_cli_model(config, source, device=ranks.device)
        result = fit_stage.run(config, out, loaded, rank=ranks.rank, world_size=ranks.world_size,
                               progress=progress and ranks.rank == 0, overwrite=force)
    if ranks.rank == 0:
        print_fit(result)
    return 0


def print_fit(result: fit_stage.FitStageResult) -> None:
    """What ``perfit-probe fit`` prints: losses per stage, the stage-2 selection, parameter counts."""
    fit = result.metrics
    params = fit.get("params", {})
    s1, s2 = fit.get("stage1", {}), fit.get("stage2", {})
    print(f"fit written to {result.perfit_dir}")
    print(f"  stage 1: {fit.get('n_train_users')} users, {s1.get('steps', 0)} steps, "
          f"loss {s1.get('first_step_loss', float('nan')):.3f} -> {s1.get('last_step_loss', float('nan')):.3f}, "
          f"{fit.get('stage1_train_s', 0):.1f} s")
    print(f"  stage 2: {fit.get('n_test_users')} users, {s2.get('steps', 0)} steps each, "
          f"loss {s2.get('first_epoch_loss', float('nan')):.3f} -> {s2.get('last_epoch_loss', float('nan')):.3f} "
          f"(epoch means), {fit.get('stage2_train_s', 0):.1f} s")
    if s2.get("selection"):
        print(f"  stage-2 selection: {describe_selection(s2['selection'])}")
    print(f"  parameters: collective {params.get('collective')}, per user {params.get('per_user')} "
          f"(LoRA r8 q/v: {params.get('lora_r8_qv_per_user')})")
