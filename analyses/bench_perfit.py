"""Benchmark of PerFit training, both sides in one process, on the same model and data.

1. Stage 2 for N users (default 100): batched (all users' rows in shared forward passes,
   ``train_personal``) versus one user at a time (``train_personal_sequential``, the way the
   reference implementations loop over users), same examples, same steps; the two results
   are also compared numerically.
2. One training step of a collective LoReFT intervention versus the same step with LoRA
   (peft, rank 8 on q_proj/v_proj) at matched data: wall time and trainable parameters.

Writes ``figures/bench_perfit.json`` and ``figures/bench_perfit.md``. Run::

    .venv/bin/python analyses/bench_perfit.py --users 100 --prompt-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from perfit_probe._io import atomic_write_text, write_json
from perfit_probe._repro import package_versions, seed_everything
from perfit_probe.config import TrainConfig
from perfit_probe.data import load_task
from perfit_probe.data.prompts import build_examples
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.batching import collate, encode, token_logprobs
from perfit_probe.interventions.fit import lora_parameter_count
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.interventions.train import train_personal, train_personal_sequential
from perfit_probe.models import load_model
from perfit_probe.sites import Site, batch_positions, parse_positions


def _examples(loaded, n_users: int, per_user: int, prompt_tokens: int, seed: int):
    task = load_task("synthetic", n_users=n_users, max_queries=per_user, seed=seed)
    rows = build_examples(task.users, task.spec, loaded.tokenizer, variants=("plain",), chat=False, seed=seed)
    out: dict[str, list] = {}
    for ex in rows:
        out.setdefault(ex.user_id, []).append(
            encode(loaded.tokenizer, ex.prompt, ex.target, eos=True, max_prompt_tokens=prompt_tokens))
    return {u: v[:per_user] for u, v in out.items()}


def bench_stage2(loaded, examples, spec, config, rows_per_forward) -> dict:
    users = list(examples)
    collective = InterventionBank.initialised(spec, ["collective"], "random", seed=0)
    start = InterventionBank.initialised(spec, users, "zero", seed=1)
    cfg = TrainConfig(**{**config.__dict__, "rows_per_forward": rows_per_forward})
    batched = start.subset(users)
    t0 = time.perf_counter()
    train_personal(loaded, collective, batched, examples, cfg)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequential, _ = train_personal_sequential(loaded, collective, start.subset(users), examples, cfg)
    sequential_s = time.perf_counter() - t0
    return _agreement(batched, sequential, start, config) | {
        "users": len(users), "steps_per_user": config.epochs * -(-len(examples[users[0]]) // config.batch_size),
        "rows_per_forward": rows_per_forward, "batched_s": batched_s, "sequential_s": sequential_s,
        "speedup": sequential_s / batched_s}


@torch.no_grad()
def _agreement(batched, sequential, start, config) -> dict:
    """How far the batched and the one-user-at-a-time results are apart.

    Adam's first steps move every coordinate by about lr whatever the size of its gradient,
    so a coordinate whose gradient is at rounding level can flip sign between the two runs:
    the max difference is bounded by 2 lr, and the relative norm of the difference between
    the two updates (and the number of coordinates that differ) are the informative numbers.
    """
    pairs = list(zip(batched.parameters(), sequential.parameters(), start.parameters()))
    diff = max(float((a - b).abs().max()) for a, b, _ in pairs)
    moved = max(float((b - s).abs().max()) for _, b, s in pairs)
    update_diff = sum(float((a - b).pow(2).sum()) for a, b, _ in pairs) ** 0.5
    update = sum(float((b - s).pow(2).sum()) for _, b, s in pairs) ** 0.5
    flipped = sum(int(((a - b).abs() > 0.5 * config.lr).sum()) for a, b, _ in pairs)
    n_coords = sum(a.numel() for a, _, _ in pairs)
    return {"max_param_diff": diff, "max_param_change": moved, "relative_update_diff": update_diff / max(update, 1e-30),
            "coords_differing": flipped, "coords": n_coords}


def bench_scaling(loaded, examples, spec, config, sizes: list[int], repeats: int) -> dict:
    """Seconds per user of one stage-2 step (one row per user) as a function of users per step.

    ``t(1) / (t(B) / B)`` is the most that putting B users in one step can save on this
    device at the same work per row: the ceiling of the batched speed-up.
    """
    users = list(examples)
    collective = InterventionBank.initialised(spec, ["collective"], "random", seed=0)
    one_each = {u: examples[u][:1] for u in users}
    cfg = TrainConfig(**{**config.__dict__, "epochs": 1, "batch_size": 1, "rows_per_forward": max(sizes)})
    rows = []
    for size in sizes:
        subset = users[:size]
        personal = InterventionBank.initialised(spec, subset, "zero", seed=1)
        train_personal(loaded, collective, personal, {u: one_each[u] for u in subset}, cfg)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            train_personal(loaded, collective, personal, {u: one_each[u] for u in subset}, cfg)
        per_user = (time.perf_counter() - t0) / repeats / size
        rows.append({"users_per_step": size, "s_per_user": per_user})
    base = rows[0]["s_per_user"]
    for row in rows:
        row["ceiling"] = base / row["s_per_user"]
    return {"sizes": rows, "ceiling": max(r["ceiling"] for r in rows)}


def _time_steps(step, n: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def bench_step(loaded, rows, spec, n_steps: int, pyreft_dir: Path) -> dict:
    """Seconds per training step (forward, backward, AdamW) for LoReFT and for LoRA r8 q/v."""
    from peft import LoraConfig, get_peft_model

    pad = int(loaded.tokenizer.pad_token_id)
    batch = collate(rows, pad)
    bank = InterventionBank.initialised(spec, ["collective"], "random", seed=0).requires_grad_(True)
    iv = Intervention(collective=bank)
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-4)

    def reft_step():
        with iv.attached(loaded.model):
            iv.set_batch(batch.prompt_mask)
            logp, mask = token_logprobs(loaded.model(**batch.inputs(), use_cache=False).logits, batch.labels)
        loss = -logp.sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    reft_s = _time_steps(reft_step, n_steps)
    reft_params = sum(p.numel() for p in bank.parameters())
    result = {"rows": len(rows), "tokens": int(batch.attention_mask.sum()), "loreft_step_s": reft_s,
              "loreft_params": reft_params, "loreft_spec": spec.to_dict()}
    result.update(bench_pyreft_step(loaded, batch, spec, n_steps, pyreft_dir))
    lora_formula = lora_parameter_count(loaded.model, 8)  # before peft wraps the layers
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lopt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def lora_step():
        logp, mask = token_logprobs(model(**batch.inputs(), use_cache=False).logits, batch.labels)
        loss = -logp.sum() / mask.sum()
        lopt.zero_grad()
        loss.backward()
        lopt.step()

    lora_s = _time_steps(lora_step, n_steps)
    result.update({"lora_step_s": lora_s, "time_ratio_loreft_over_lora": reft_s / lora_s,
                   "lora_params": lora_params, "lora_params_formula": lora_formula,
                   "param_ratio_loreft_over_lora": reft_params / lora_params})
    return result


def bench_pyreft_step(loaded, batch, spec, n_steps: int, pyreft_dir: Path) -> dict:
    """The same LoReFT step (layers, positions, rank, rows) in the reference pyreft, if installed.

    pyreft pins transformers 4.45, so ``make setup`` installs it (and pyvene) without
    dependencies outside site-packages; its LoReFT path runs on our transformers and is
    tested to give our logits and gradients (``test_reference_loreft.py``).
    """
    if not pyreft_dir.is_dir():
        return {"pyreft": f"not installed in {pyreft_dir} (run `make setup`)"}
    sys.path.append(str(pyreft_dir))
    import pyreft

    layers = [site.layer for site in spec.sites]
    if any(site.kind != "resid_post" for site in spec.sites):
        return {"pyreft": "compared at hook_resid_post sites only"}
    modules = [pyreft.LoreftIntervention(embed_dim=spec.d_model, low_rank_dimension=spec.rank, dtype=torch.float32)
               for _ in layers]
    reft = pyreft.get_reft_model(loaded.model, pyreft.ReftConfig(representations=[
        {"layer": layer, "component": "block_output", "low_rank_dimension": spec.rank, "intervention": m}
        for layer, m in zip(layers, modules)]))
    index, _ = batch_positions(spec.positions, batch.prompt_mask, spec.position_clamp)
    locations = {"sources->base": (None, [index.tolist()] * len(layers))}
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        _, out = reft(batch.inputs(), unit_locations=locations, labels=batch.labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    seconds = _time_steps(step, n_steps)
    return {"pyreft": "pyreft " + getattr(pyreft, "__version__", "0.1.0"), "pyreft_step_s": seconds,
            "pyreft_params": sum(p.numel() for p in params)}


def markdown(result: dict) -> str:
    s2, st = result["stage2"], result["step"]
    lines = [
        "# PerFit training benchmark", "",
        f"Model {result['model']}, device {result['device']}, {result['threads']} torch threads, "
        f"load average at start {result['load_average']} (shared machine: timings are noisy).", "",
        "## Stage 2: batched users versus one user at a time", "",
        f"Personal LoReFT rank {result['spec']['rank']} at {', '.join(result['spec']['sites'])}, positions "
        f"{result['spec']['positions']}; prompts cut to their last {result['prompt_tokens']} tokens; "
        "same examples, order and number of steps on both sides.", "",
        "| users | steps/user | rows/forward | batched (s) | sequential (s) | speed-up | max param diff |",
        "|---|---|---|---|---|---|---|",
        f"| {s2['users']} | {s2['steps_per_user']} | {s2['rows_per_forward']} | {s2['batched_s']:.1f} | "
        f"{s2['sequential_s']:.1f} | {s2['speedup']:.2f}x | {s2['max_param_diff']:.1e} |", "",
        f"Largest parameter change {s2['max_param_change']:.1e}; norm of the difference between the two "
        f"updates / norm of the update: {s2['relative_update_diff']:.1e}; coordinates differing by more "
        f"than lr/2: {s2['coords_differing']} of {s2['coords']}. Adam's first step moves every coordinate by "
        "about lr whatever the size of its gradient, so a coordinate whose gradient is at rounding level "
        "can flip sign between the two runs (the batched forward pads rows to a common length, which "
        "changes the summation order); the tests check equality to 2e-5 on models where no gradient is "
        "at rounding level.", "",
    ]
    if "scaling" in result:
        sc = result["scaling"]
        lines += [
            "## Ceiling of batching on this device", "",
            "One stage-2 step with one row per user, timed for growing numbers of users per step. "
            "Time per user at 1 user per step, divided by time per user at B users per step, is the most "
            "that putting B users in one step can save here at the same work per row.", "",
            "| users per step | s per user | ceiling |", "|---|---|---|",
            *[f"| {r['users_per_step']} | {r['s_per_user']:.3f} | {r['ceiling']:.2f}x |" for r in sc["sizes"]], "",
            f"Ceiling on {result['device']} with {result['threads']} threads: {sc['ceiling']:.2f}x; measured "
            f"speed-up above: {s2['speedup']:.2f}x.", "",
        ]
    lines += [
        "## One training step: LoReFT versus LoRA (rank 8, q_proj/v_proj)", "",
        "| method | trainable params | s/step |", "|---|---|---|",
        f"| LoReFT ({st['loreft_spec']['kind']}, rank {st['loreft_spec']['rank']}, "
        f"{', '.join(st['loreft_spec']['sites'])}, {st['loreft_spec']['positions']}) | {st['loreft_params']} | {st['loreft_step_s']:.3f} |",
        *([f"| same LoReFT step in {st['pyreft']} | {st['pyreft_params']} | {st['pyreft_step_s']:.3f} |"]
          if "pyreft_step_s" in st else []),
        f"| LoRA r8 q/v | {st['lora_params']} | {st['lora_step_s']:.3f} |",
        f"| ratio LoReFT / LoRA | {st['param_ratio_loreft_over_lora']:.3f} | {st['time_ratio_loreft_over_lora']:.2f} |", "",
        f"Step batch: {st['rows']} rows, {st['tokens']} tokens. "
        + (f"{st['pyreft']} is installed without its dependencies (it pins transformers 4.45); its "
           "logits and gradients equal ours on the same parameters (`test_reference_loreft.py`)."
           if "pyreft_step_s" in st else f"pyreft not compared: {st['pyreft']}."), "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--per-user", type=int, default=1, help="examples per user (= steps with batch size 1)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompts keep their last N tokens")
    parser.add_argument("--layers", default="8,12")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rows-per-forward", type=int, default=50)
    parser.add_argument("--scaling-sizes", default="1,2,4,8,16,32,64",
                        help="users per step of the batching-ceiling measurement (empty: skip it)")
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument("--step-rows", type=int, default=8)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--pyreft-dir", type=Path, default=Path(sys.prefix) / "extras" / "pyreft",
                        help="where `make setup` put the reference pyreft (compared when present)")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    sites = tuple(Site(int(layer)) for layer in args.layers.split(","))
    spec = BankSpec("loreft", sites, parse_positions("f1+l2"), args.rank, loaded.d_model)
    examples = _examples(loaded, args.users, args.per_user, args.prompt_tokens, args.seed)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=args.per_user, seed=args.seed)
    result = {"model": loaded.identity.name, "device": str(loaded.device), "threads": torch.get_num_threads(),
              "load_average": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
              "versions": package_versions(), "spec": spec.to_dict(), "prompt_tokens": args.prompt_tokens}
    result["stage2"] = bench_stage2(loaded, examples, spec, config, args.rows_per_forward)
    sizes = [int(x) for x in args.scaling_sizes.split(",") if x]
    if sizes:
        result["scaling"] = bench_scaling(loaded, examples, spec, config, sizes, args.scaling_repeats)
    rows = [e for exs in examples.values() for e in exs][: args.step_rows]
    step_spec = BankSpec("loreft", sites, parse_positions("f1+l2"), 8, loaded.d_model)
    result["step"] = bench_step(loaded, rows, step_spec, args.step_repeats, args.pyreft_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_perfit.json", result)
    atomic_write_text(args.out / "bench_perfit.md", markdown(result))
    print(markdown(result))
    print(json.dumps({"stage2": result["stage2"], "step": result["step"]}, indent=1))


if __name__ == "__main__":
    main()
