"""The benchmark scripts run end to end on a tiny model (their timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from perfit_probe_tests.conftest import PYREFT_DIR
from perfit_probe_tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_bench_perfit_runs_and_both_sides_agree(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "bench_perfit.py"), "--model", str(model), "--users", "6",
         "--layers", "1,2", "--rank", "2", "--rows-per-forward", "4", "--scaling-sizes", "1,2,4",
         "--scaling-repeats", "1", "--step-rows", "3", "--step-repeats", "1", "--prompt-tokens", "12",
         "--pyreft-dir", str(PYREFT_DIR), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "bench_perfit.json").read_text())
    stage2 = result["stage2"]
    assert stage2["users"] == 6 and stage2["batched_s"] > 0 and stage2["sequential_s"] > 0
    assert stage2["max_param_change"] > 0 and stage2["coords_differing"] <= stage2["coords"] // 1000
    assert [row["users_per_step"] for row in result["scaling"]["sizes"]] == [1, 2, 4]
    step = result["step"]
    assert step["pyreft_params"] == step["loreft_params"] and step["pyreft_step_s"] > 0
    assert step["lora_params"] == step["lora_params_formula"]
    table = (out / "bench_perfit.md").read_text()
    assert "Ceiling of batching" in table and "same LoReFT step in pyreft" in table


def test_bench_cache_runs_and_every_method_returns_the_same_vectors(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "bench_cache.py"), "--model", str(model), "--layers", "1,2",
         "--prompts", "4", "--min-words", "5", "--max-words", "12", "--batch-size", "2", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "bench_cache.json").read_text())["results"]
    methods = {r["method"] for r in results}
    assert {"hf", "tlens", "nnsight", "perfit-probe", "bare-forward"} <= methods
    assert all(r["layers"] == [1, 2] and r["seconds"] > 0 for r in results)
    diffs = [r["max_abs_diff_vs_perfit"] for r in results if r["method"] != "bare-forward"]
    assert diffs and all(d is not None and d < 1e-5 for d in diffs)


def test_capability_script_runs_and_writes_its_tables(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "capability.py"), "--model", str(model), "--no-demo",
         "--recipe", "layers=(1, 3);epochs1=1;epochs2=1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "capability.json").read_text())
    (recipe,) = result["recipes"]
    assert recipe["changes"] == {"layers": [1, 3], "epochs1": 1, "epochs2": 1}
    assert recipe["fit"]["layers"] == [1, 3] and recipe["verdict"] in ("learns", "partial", "no gain")
    assert len(recipe["per_user"]) == 10 and recipe["summary"]["n_queries"] == 60
    assert "| layers=(1, 3);epochs1=1;epochs2=1 |" in (out / "capability.md").read_text()
