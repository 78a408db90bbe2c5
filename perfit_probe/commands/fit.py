"""``perfit-probe fit``: train PerFit's collective (stage 1) and personal (stage 2) interventions.

Example::

    perfit-probe fit --task movielens --users 20 --layers 8,12 --positions f1+l2 \\
        --collective-rank 8 --personal-rank 4 --epochs1 2 --epochs2 2 --batch-size 8 --out runs/x

Under ``torchrun --nproc-per-node N perfit-probe fit ...`` stage-2 users are sharded across
the N processes (stage 1 runs on rank 0).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from perfit_probe.commands.common import MAX_QUERIES_HELP, TASK_PATH_HELP, add_model_arguments, model_from_args
from perfit_probe.data.profile_examples import PERSONAL_SOURCES, PROFILE_EXAMPLE_MODES
from perfit_probe.data.splits import TEST_USER_CHOICES
from perfit_probe.interventions.fit import PERSONAL_INITS, FitConfig, run_fit
from perfit_probe.interventions.modules import INITS, INTERVENTION_KINDS
from perfit_probe.interventions.train import describe_selection
from perfit_probe.rundir import seed_everything
from perfit_probe.sites import POSITION_CLAMPS

_DEFAULTS = {f.name: f.default for f in fields(FitConfig)}


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers wants comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    d = _DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument("--task", default=d["task"], help="movielens, synthetic, LaMP-1, LaMP-2M, ... (default %(default)s)")
    data.add_argument("--task-path", type=Path, default=None, help=TASK_PATH_HELP)
    data.add_argument("--task-outputs", type=Path, default=None, help="LaMP gold outputs file")
    data.add_argument("--users", type=int, default=d["n_users"], help="users to load (default %(default)s; 0 = all)")
    data.add_argument("--max-queries", type=int, default=None, help=MAX_QUERIES_HELP)
    data.add_argument("--test-users", type=int, default=None, help="users with a personal intervention (default: half)")
    data.add_argument("--heldout", type=int, default=d["n_heldout"],
                      help="held-out queries per test user (default: all of them, as OPPU)")
    data.add_argument("--test-users-by", default=d["test_users_by"], choices=TEST_USER_CHOICES,
                      help="test users are those with the most history (OPPU) or queries (default %(default)s)")
    data.add_argument("--personal-data", default=d["personal_data"], choices=PERSONAL_SOURCES,
                      help="stage 2 trains on the user's profile items as task examples (OPPU) or on its "
                      "non-held-out queries (default %(default)s)")
    data.add_argument("--max-profile-examples", type=int, default=d["max_profile_examples"],
                      help="most recent profile items per test user trained on (default %(default)s; 0 = all)")
    data.add_argument("--profile-examples", default=d["profile_examples"], choices=PROFILE_EXAMPLE_MODES,
                      help="task_only: no stage 2 on tasks whose items have no task form (LaMP-1, LaMP-7)")
    data.add_argument("--variant", default=d["prompt_variant"], choices=("plain", "enhanced", "control"),
                      help="prompt variant trained on (default %(default)s)")
    data.add_argument("--k", type=int, default=d["k"], help="retrieved history items (enhanced prompts)")
    data.add_argument("--retriever", default=d["retriever"], help="history retriever (default %(default)s)")
    data.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                      help="apply the chat template (default: when the tokenizer has one)")
    data.add_argument("--max-prompt-tokens", type=int, default=d["max_prompt_tokens"])
    iv = parser.add_argument_group("intervention")
    iv.add_argument("--layers", type=_layers, default=d["layers"], help="comma-separated layers (default 8,12)")
    iv.add_argument("--site-kind", default=d["site_kind"], help="resid_post (default), resid_pre, attn_out, mlp_out")
    iv.add_argument("--positions", default=d["positions"], help="prompt positions, e.g. l1, f1+l2 (default %(default)s)")
    iv.add_argument("--position-clamp", default=d["position_clamp"], choices=POSITION_CLAMPS,
                    help="how short prompts clamp f<p>+l<s>: pyreft (each side to n//2) or cover "
                    "(first to n//2, last to ceil(n/2); one side alone to n) (default %(default)s)")
    iv.add_argument("--share-weights", action=argparse.BooleanOptionalAction, default=d["share_weights"],
                    help="one intervention per site for all positions, or (--no-share-weights) separate "
                    "first-p and last-s interventions as pyreft (default %(default)s)")
    iv.add_argument("--intervention", default=d["intervention"], choices=INTERVENTION_KINDS)
    iv.add_argument("--collective-rank", type=int, default=d["collective_rank"])
    iv.add_argument("--personal-rank", type=int, default=d["personal_rank"])
    iv.add_argument("--stacking", default=d["stacking"], choices=("sum", "compose"))
    iv.add_argument("--collective-init", default=d["collective_init"], choices=INITS)
    iv.add_argument("--personal-init", default=d["personal_init"], choices=PERSONAL_INITS)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs1", type=int, default=d["epochs1"], help="stage-1 epochs")
    train.add_argument("--epochs2", type=int, default=d["epochs2"], help="stage-2 epochs")
    train.add_argument("--lr", type=float, default=None, help="learning rate of both stages")
    train.add_argument("--lr1", type=float, default=None, help=f"stage-1 learning rate (default {d['lr1']})")
    train.add_argument("--lr2", type=float, default=None, help=f"stage-2 learning rate (default {d['lr2']})")
    train.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    train.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    train.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help="rows per step (stage 1), per user per step (stage 2)")
    train.add_argument("--rows-per-forward", type=int, default=d["rows_per_forward"], help="memory cap")
    train.add_argument("--val-per-user", type=int, default=d["val_per_user"],
                       help="history examples per test user held out of stage 2 to keep each user's best "
                       "epoch (0 = keep the last; default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--out", type=Path, required=True, help="run directory (may already hold a cache)")
    parser.add_argument("--force", action="store_true", help="replace an existing fit in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> FitConfig:
    """The ``FitConfig`` that parsed arguments describe."""
    lr1 = args.lr1 if args.lr1 is not None else args.lr if args.lr is not None else _DEFAULTS["lr1"]
    lr2 = args.lr2 if args.lr2 is not None else args.lr if args.lr is not None else _DEFAULTS["lr2"]
    return FitConfig(
        task=args.task, task_path=args.task_path, task_outputs=args.task_outputs,
        n_users=args.users or None, max_queries=args.max_queries, n_test_users=args.test_users,
        n_heldout=args.heldout, test_users_by=args.test_users_by, personal_data=args.personal_data,
        max_profile_examples=args.max_profile_examples or None, profile_examples=args.profile_examples,
        layers=tuple(args.layers), site_kind=args.site_kind, positions=args.positions,
        position_clamp=args.position_clamp, share_weights=args.share_weights,
        intervention=args.intervention, collective_rank=args.collective_rank, personal_rank=args.personal_rank,
        epochs1=args.epochs1, epochs2=args.epochs2, lr1=lr1, lr2=lr2, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, rows_per_forward=args.rows_per_forward,
        val_per_user=args.val_per_user,
        stacking=args.stacking, collective_init=args.collective_init, personal_init=args.personal_init,
        prompt_variant=args.variant, k=args.k, retriever=args.retriever, chat=args.chat,
        max_prompt_tokens=args.max_prompt_tokens, seed=args.seed, model=args.model, dtype=args.dtype,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.validate()  # fail on bad options before loading anything
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        import torch
        import torch.distributed as dist

        use_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        seed_everything(config.seed)
        loaded = model_from_args(args)
        run_dir = run_fit(config, args.out, loaded, rank=rank, world_size=world_size,
                          progress=not args.quiet and rank == 0, overwrite=args.force)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        fit = run_dir.metrics().get("fit", {})
        params = fit.get("params", {})
        s1, s2 = fit.get("stage1", {}), fit.get("stage2", {})
        print(f"fit written to {run_dir.path / 'perfit'}")
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
    return 0

