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
import time
from pathlib import Path

import torch

from perfit_probe.data import load_task
from perfit_probe.data.prompts import build_examples
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.batching import collate, encode, token_logprobs
from perfit_probe.interventions.fit import lora_parameter_count
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.interventions.train import TrainConfig, train_personal, train_personal_sequential
from perfit_probe.models import load_model
from perfit_probe.rundir import atomic_write_text, package_versions, seed_everything, write_json


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
    diff = max(float((a - b).abs().max()) for a, b in zip(batched.parameters(), sequential.parameters()))
    moved = max(float((a - b).abs().max()) for a, b in zip(batched.parameters(), start.parameters()))
    return {"users": len(users), "steps_per_user": config.epochs * -(-len(examples[users[0]]) // config.batch_size),
            "rows_per_forward": rows_per_forward, "batched_s": batched_s, "sequential_s": sequential_s,
            "speedup": sequential_s / batched_s, "max_param_diff": diff, "max_param_change": moved}


def _time_steps(step, n: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def bench_step(loaded, rows, spec, n_steps: int) -> dict:
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
    return {"rows": len(rows), "tokens": int(batch.attention_mask.sum()), "loreft_step_s": reft_s,
            "lora_step_s": lora_s, "time_ratio_loreft_over_lora": reft_s / lora_s,
            "loreft_params": reft_params, "lora_params": lora_params,
            "lora_params_formula": lora_formula, "loreft_spec": spec.to_dict(),
            "param_ratio_loreft_over_lora": reft_params / lora_params}


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
        "## One training step: LoReFT versus LoRA (rank 8, q_proj/v_proj)", "",
        "| method | trainable params | s/step |", "|---|---|---|",
        f"| LoReFT ({st['loreft_spec']['kind']}, rank {st['loreft_spec']['rank']}, "
        f"{', '.join(st['loreft_spec']['sites'])}, {st['loreft_spec']['positions']}) | {st['loreft_params']} | {st['loreft_step_s']:.3f} |",
        f"| LoRA r8 q/v | {st['lora_params']} | {st['lora_step_s']:.3f} |",
        f"| ratio LoReFT / LoRA | {st['param_ratio_loreft_over_lora']:.3f} | {st['time_ratio_loreft_over_lora']:.2f} |", "",
        f"Step batch: {st['rows']} rows, {st['tokens']} tokens. pyreft not compared (it pins transformers 4.45).", "",
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
    parser.add_argument("--step-rows", type=int, default=8)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    sites = tuple(f"blocks.{int(layer)}.hook_resid_post" for layer in args.layers.split(","))
    spec = BankSpec("loreft", sites, "f1+l2", args.rank, loaded.d_model)
    examples = _examples(loaded, args.users, args.per_user, args.prompt_tokens, args.seed)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=args.per_user, seed=args.seed)
    result = {"model": loaded.identity.name, "device": str(loaded.device), "threads": torch.get_num_threads(),
              "load_average": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
              "versions": package_versions(), "spec": spec.to_dict(), "prompt_tokens": args.prompt_tokens}
    result["stage2"] = bench_stage2(loaded, examples, spec, config, args.rows_per_forward)
    rows = [e for exs in examples.values() for e in exs][: args.step_rows]
    step_spec = BankSpec("loreft", sites, "f1+l2", 8, loaded.d_model)
    result["step"] = bench_step(loaded, rows, step_spec, args.step_repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_perfit.json", result)
    atomic_write_text(args.out / "bench_perfit.md", markdown(result))
    print(markdown(result))
    print(json.dumps({"stage2": result["stage2"], "step": result["step"]}, indent=1))


if __name__ == "__main__":
    main()
