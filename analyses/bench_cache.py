"""Benchmark: perfit-probe's activation cache against the usual ways of reading hidden states.

On the same prompts, batches (longest first, left padding, batch size ``--batch-size``) and
requested layers (last prompt token, ``resid_post``), it times:

  (a) ``hf``            Hugging Face forward with ``output_hidden_states=True`` (whole network);
  (b) ``tlens``         transformer-lens ``TransformerBridge.run_with_cache`` with a names filter;
  (b') ``tlens-stop``   the same with ``stop_at_layer`` (transformer-lens's own early stop);
  (c) ``nnsight``       an nnsight ``trace`` saving each requested block's output;
  (d) ``perfit-probe``  ``cache_activations`` (hooks backend, early stop, inference mode),
                        *including* tokenization, sorting and writing the shards to disk;
  (e) ``bare-forward``  the floor: a bare Hugging Face forward of the base model truncated after
                        the deepest requested block, nothing read out.

Every method but (e) returns the last-token vectors; their agreement with (d) is reported.
Time is the minimum wall time over ``--repeats`` runs (methods interleaved, after a warm-up).
Memory is the *peak resident set size of the process above its size at the start of the
method* (Linux: ``/proc/self/clear_refs`` resets the high-water mark, ``VmHWM`` reads it; freed
memory is returned to the OS with ``malloc_trim`` first). It counts everything the method
allocates (activations, hidden-state tuples, caches), but glibc may keep or reuse memory, so
treat small differences as noise. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

Writes ``figures/bench_cache.json`` and ``figures/bench_cache.md``. Run:
``.venv/bin/python analyses/bench_cache.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import psutil
import torch

from perfit_probe._repro import package_versions
from perfit_probe.backends import model_inputs
from perfit_probe.cache import cache_activations
from perfit_probe.data.records import Example
from perfit_probe.models import load_model
from perfit_probe.sites import decoder_layers, gather_positions, parse_positions

LAST = parse_positions("last")
WORDS = ("the user rated movie star wars fargo toy story heat drama comedy thriller romance action "
         "adventure history profile query title genre year review score five four three two one "
         "liked disliked watched again with friends family story ending music actors").split()
SCENARIOS = {"middle": [6, 9, 12], "late": [6, 12, 18, 24, 28]}


def make_prompts(n: int, min_words: int, max_words: int, seed: int) -> list[str]:
    """Synthetic prompts of mixed lengths, sorted longest first (the batching every method uses)."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]
    return sorted(prompts, key=lambda p: -len(p.split()))


def batches(loaded, prompts: list[str], batch_size: int):
    tok = loaded.tokenizer
    tok.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start:start + batch_size], padding=True, return_tensors="pt")
        yield enc["input_ids"].to(loaded.device), enc["attention_mask"].to(loaded.device)


def run_hf(loaded, prompts, layers, batch_size, ctx):
    out = {l: [] for l in layers}
    with torch.inference_mode():
        for ids, mask in batches(loaded, prompts, batch_size):
            hidden = loaded.model(**model_inputs(ids, mask), output_hidden_states=True, use_cache=False).hidden_states
            for l in layers:
                out[l].append(gather_positions(hidden[l + 1], LAST, mask).cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def _run_tlens(loaded, prompts, layers, batch_size, ctx, stop: bool):
    bridge = ctx["bridge"]
    names = {f"blocks.{l}.hook_resid_post": l for l in layers}
    out = {l: [] for l in layers}
    extra = {"stop_at_layer": max(layers) + 1} if stop else {}
    with torch.inference_mode():
        for ids, mask in batches(loaded, prompts, batch_size):
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names,
                                             return_cache_object=False, **extra)
            for name, l in names.items():
                out[l].append(gather_positions(cache[name], LAST, mask).cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def run_tlens(loaded, prompts, layers, batch_size, ctx):
    return _run_tlens(loaded, prompts, layers, batch_size, ctx, stop=False)


def run_tlens_stop(loaded, prompts, layers, batch_size, ctx):
    return _run_tlens(loaded, prompts, layers, batch_size, ctx, stop=True)


def run_nnsight(loaded, prompts, layers, batch_size, ctx):
    lm = ctx["lm"]
    out = {l: [] for l in layers}
    with torch.inference_mode():
        for ids, mask in batches(loaded, prompts, batch_size):
            saved = {}
            with lm.trace(model_inputs(ids, mask), use_cache=False):
                for l in layers:
                    saved[l] = lm.model.layers[l].output.save()
            for l in layers:
                value = getattr(saved[l], "value", saved[l])
                value = value[0] if isinstance(value, (tuple, list)) else value
                out[l].append(gather_positions(value, LAST, mask).cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def run_perfit(loaded, prompts, layers, batch_size, ctx):
    examples = [Example("u", str(i), "plain", p) for i, p in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_activations(loaded, examples, Path(tmp) / "cache", sites=layers, batch_size=batch_size,
                                  padding_side="left", progress=False)
        values = cache.select().values
    return {l: values[:, j] for j, l in enumerate(layers)}


def run_bare(loaded, prompts, layers, batch_size, ctx):
    base = loaded.model.model
    full = base.layers
    base.layers = torch.nn.ModuleList(list(full)[: max(layers) + 1])
    try:
        with torch.inference_mode():
            for ids, mask in batches(loaded, prompts, batch_size):
                base(**model_inputs(ids, mask), use_cache=False)
    finally:
        base.layers = full
    return None


METHODS = {
    "hf": ("(a) HF forward, output_hidden_states=True", run_hf),
    "tlens": ("(b) transformer-lens run_with_cache + names_filter", run_tlens),
    "tlens-stop": ("(b') transformer-lens run_with_cache + stop_at_layer", run_tlens_stop),
    "nnsight": ("(c) nnsight trace + save", run_nnsight),
    "perfit-probe": ("(d) perfit-probe cache_activations (to disk)", run_perfit),
    "bare-forward": ("(e) bare HF forward through the deepest layer", run_bare),
}


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(fn, loaded, prompts, layers, batch_size, ctx):
    """``(result, seconds, peak memory above the start in bytes or None)``."""
    _trim()
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            base = psutil.Process().memory_info().rss
        except OSError:
            base = None
    start = time.perf_counter()
    result = fn(loaded, prompts, layers, batch_size, ctx)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        hwm = _hwm_bytes()
        peak = hwm - base if base is not None and hwm is not None else None
    return result, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--min-words", type=int, default=30)
    parser.add_argument("--max-words", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scenarios", default="middle,late", help=f"comma-separated, from {list(SCENARIOS)}")
    parser.add_argument("--layers", default="",
                        help="comma-separated layers: one 'custom' scenario instead of --scenarios (small models)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings stable on a shared machine)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    prompts = make_prompts(args.prompts, args.min_words, args.max_words, args.seed)
    n_tokens = [len(ids) for ids in loaded.tokenizer(prompts)["input_ids"]]
    methods = [m.strip() for m in args.methods.split(",")]
    ctx: dict = {}
    if any(m.startswith("tlens") for m in methods):
        from perfit_probe.backends.tlens import TransformerLensBackend
        ctx["bridge"] = TransformerLensBackend(loaded).bridge
    if "nnsight" in methods:
        from perfit_probe.backends.nnsight_backend import NNsightBackend
        ctx["lm"] = NNsightBackend(loaded).lm
    n_layers = len(decoder_layers(loaded.model))
    print(f"model {loaded.identity.name} ({n_layers} layers, d_model {loaded.d_model}) on {loaded.device}, "
          f"{torch.get_num_threads()} threads; {len(prompts)} prompts of {min(n_tokens)}-{max(n_tokens)} tokens "
          f"({sum(n_tokens)} in all), batch size {args.batch_size}")

    scenarios = {s.strip(): SCENARIOS[s.strip()] for s in args.scenarios.split(",")}
    if args.layers:
        scenarios = {"custom": [int(x) for x in args.layers.split(",")]}
    results = []
    for scenario, requested in scenarios.items():
        layers = [l for l in requested if l < n_layers]
        for name in methods:  # warm-up on two short prompts
            METHODS[name][1](loaded, prompts[-2:], layers, 2, ctx)
        times = {m: [] for m in methods}
        peaks, values = {}, {}
        for rep in range(args.repeats):
            order = methods if rep % 2 == 0 else methods[::-1]  # interleave against drift
            for name in order:
                result, seconds, peak = measure(METHODS[name][1], loaded, prompts, layers, args.batch_size, ctx)
                times[name].append(seconds)
                peaks.setdefault(name, peak)
                if result is not None:
                    values[name] = result
                print(f"  [{scenario} layers {layers}] {name:>13}: {seconds:7.2f} s")
        ref = values.get("perfit-probe")
        best = {m: min(t) for m, t in times.items()}
        for name in methods:
            diff = None
            if ref is not None and name in values:
                diff = max(float((values[name][l].float() - ref[l].float()).abs().max()) for l in layers)
            results.append({
                "scenario": scenario, "layers": layers, "method": name, "label": METHODS[name][0],
                "seconds": round(best[name], 3), "all_seconds": [round(t, 3) for t in times[name]],
                "time_vs_bare": round(best[name] / best["bare-forward"], 3) if "bare-forward" in best else None,
                "time_vs_perfit": round(best[name] / best["perfit-probe"], 3) if "perfit-probe" in best else None,
                "peak_mem_mb": round(peaks[name] / 2**20, 1) if peaks[name] is not None else None,
                "max_abs_diff_vs_perfit": diff,
            })

    setup = {
        "model": loaded.identity.to_dict(), "device": str(loaded.device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "n_prompts": len(prompts),
        "tokens_min": min(n_tokens), "tokens_max": max(n_tokens), "tokens_total": sum(n_tokens),
        "batch_size": args.batch_size, "repeats": args.repeats, "positions": "last", "padding": "left",
        "memory": ("peak torch.cuda.max_memory_allocated above the start" if loaded.device.type == "cuda"
                   else "peak process RSS (VmHWM after clear_refs) above the RSS at the start of the method"),
        "versions": package_versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cache.json").write_text(json.dumps({"setup": setup, "results": results}, indent=1) + "\n")
    (args.out / "bench_cache.md").write_text(markdown(setup, results))
    print(markdown(setup, results))


def markdown(setup: dict, results: list[dict]) -> str:
    """The results as a markdown table (one per scenario)."""
    lines = [
        f"Activation caching on {setup['model']['name']} ({setup['model']['n_layers']} layers), "
        f"{setup['device']}, {setup['threads']} threads: {setup['n_prompts']} prompts of "
        f"{setup['tokens_min']}-{setup['tokens_max']} tokens, batch size {setup['batch_size']}, last token, "
        f"best of {setup['repeats']} runs. Memory: {setup['memory']}.",
        "",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        rows = [r for r in results if r["scenario"] == scenario]
        lines += [f"**{scenario} layers {rows[0]['layers']}**", "",
                  "| method | time (s) | x bare forward | x perfit-probe | peak memory (MB) | max abs diff vs perfit-probe |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            diff = "-" if r["max_abs_diff_vs_perfit"] is None else f"{r['max_abs_diff_vs_perfit']:.1e}"
            mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            lines.append(f"| {r['label']} | {r['seconds']:.2f} | {r['time_vs_bare'] or 0:.2f} | "
                         f"{r['time_vs_perfit'] or 0:.2f} | {mem} | {diff} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
