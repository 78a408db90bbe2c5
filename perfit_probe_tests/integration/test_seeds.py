"""Issue 14, seeds: the pipeline once per seed, each in its own run directory, and the spread
of every headline number across seeds. Oracles: hand-computed means of the runs' own
``metrics.json``, and a second run with the same seed giving the same numbers."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest

from perfit_probe.cli import main
from perfit_probe.config import seed_config, stage_configs
from perfit_probe.errors import ConfigError
from perfit_probe.pipeline import demo_config
from perfit_probe.stages.pipeline import run_seeds
from perfit_probe.stages.seed_summary import flatten_metrics, seed_summary
from perfit_probe_tests.tiny import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flatten_keeps_numeric_results_and_drops_timings():
    metrics = {"evaluate": {"perfit": {"mae": 0.5, "rmse": 1}, "base": {"mae": 0.75}},
               "fit": {"stage1_train_s": 3.0, "stage2_train_s_per_user": 1.0, "stage2": {"last_epoch_loss": 2.0},
                       "world_size": 1, "params": {"per_user": 260}, "note": "x", "ok": True, "sites": [1, 2]},
               "analysis": {"uncentred": {"personal": {"rank@0.9": 3}}},
               "timings": {"fit": 9.0}, "pipeline": {"total_wall_s": 10.0, "peak_rss_gib": 1.0}}
    assert flatten_metrics(metrics) == {"evaluate/perfit/mae": 0.5, "evaluate/perfit/rmse": 1.0,
                                        "evaluate/base/mae": 0.75, "fit/stage2/last_epoch_loss": 2.0,
                                        "fit/world_size": 1.0, "fit/params/per_user": 260.0,
                                        "analysis/uncentred/personal/rank@0.9": 3.0}


def test_summary_is_mean_std_min_max_over_seeds():
    runs = {0: {"evaluate": {"perfit": {"mae": 0.5}}, "fit": {"loss": 1.0}},
            1: {"evaluate": {"perfit": {"mae": 1.0}}, "fit": {"loss": float("nan")}},
            2: {"evaluate": {"perfit": {"mae": 1.5}}}}
    table = seed_summary(runs).set_index("metric")
    row = table.loc["evaluate/perfit/mae"]
    assert row["n"] == 3 and row["mean"] == 1.0 and row["min"] == 0.5 and row["max"] == 1.5
    assert row["std"] == pytest.approx(0.5)  # sample std: sqrt(((-.5)^2 + 0 + .5^2) / 2)
    assert list(row[["seed0", "seed1", "seed2"]]) == [0.5, 1.0, 1.5]
    loss = table.loc["fit/loss"]  # missing or NaN in some seeds: summarised over the others
    assert loss["n"] == 1 and loss["mean"] == 1.0 and math.isnan(loss["std"]) and math.isnan(loss["seed2"])


def test_seed_config_sets_every_stage_seed():
    config = demo_config(n_layers=4)
    config = replace(config, fit=replace(config.fit, seed=9))
    resolved = stage_configs(seed_config(config, 5))
    assert {name: stage.seed for name, stage in resolved.items()} == dict.fromkeys(resolved, 5)
    assert resolved["cache"].seed == 5 and config.task.seed == 0 and config.fit.seed == 9
    with pytest.raises(ConfigError, match="repeat"):
        run_seeds(config, "unused", [1, 1])


def _numbers(run_dir):
    return flatten_metrics(json.loads((run_dir / "metrics.json").read_text()))


def _check_pooled(out, runs, printed):
    """``OUT/pooled/``: every seed's queries together. Oracle: MAE is a mean over queries, so the
    pooled MAE is the seeds' MAEs weighted by their query counts (from each seed's own results.csv)."""
    pooled = out / "pooled"
    assert str(pooled / "results.md") in printed
    results = pd.read_csv(pooled / "results.csv").set_index("method")
    seeds = [pd.read_csv(run_dir / "eval" / "results.csv").set_index("method") for run_dir in runs.values()]
    for method in ("perfit", "lora", "user_median"):
        n = [t.loc[method, "n_queries"] for t in seeds]
        assert results.loc[method, "n_queries"] == sum(n)
        assert results.loc[method, "mae"] == pytest.approx(sum(t.loc[method, "mae"] * k for t, k in zip(seeds, n)) / sum(n))
    diffs = pd.read_csv(pooled / "differences.csv")
    mae = diffs[(diffs.metric == "mae") & (diffs.against == "reference")].set_index("method")
    users = sum(len(pd.read_csv(r / "eval" / "predictions.csv").query("method == 'perfit'").user_id.unique())
                for r in runs.values())
    assert mae.loc["lora", "n_users"] <= users and mae.loc["lora", "n_queries"] == results.loc["perfit", "n_queries"]
    assert mae.loc["lora", "estimate"] == pytest.approx(results.loc["lora", "mae"] - results.loc["perfit", "mae"])
    assert (diffs["detectable"] > 0).all()
    assert "Claim 3" in (pooled / "claims.md").read_text()
    # seed by seed: each seed's own difference (its eval/differences.csv, same reference) is in seeds.csv
    across = pd.read_csv(pooled / "seeds.csv").set_index(["method", "against", "metric"])
    for seed, run_dir in runs.items():
        own = pd.read_csv(run_dir / "eval" / "differences.csv")
        own = own[(own.against == "reference") & (own.metric == "mae")].set_index("method")
        assert across.loc[("lora", "reference", "mae"), f"seed{seed}"] == pytest.approx(own.loc["lora", "estimate"])
    assert across.loc[("lora", "reference", "mae"), "k"] == 2 and "Across seeds" in (pooled / "claims.md").read_text()


def test_two_seeds_two_runs_and_a_summary_of_their_numbers(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model", "gpt2")
    out = tmp_path / "seeds"
    common = ["demo", "--model", str(model), "--task", "synthetic", "--users", "6",
              "--stages", "cache,analyze,fit,evaluate", "--no-progress"]
    assert main([*common, "--seeds", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "seeds_summary.md") in printed and str(out / "seed1") in printed
    runs = {seed: out / f"seed{seed}" for seed in (0, 1)}
    for seed, run_dir in runs.items():
        assert (run_dir / "report.md").is_file() and (run_dir / "eval" / "results.csv").is_file()
        info = json.loads((run_dir / "run.json").read_text())
        assert info["seed"] == seed and info["config"]["resolved"]["fit"]["seed"] == seed
        assert info["config"]["resolved"]["evaluate"]["seed"] == seed
    numbers = {seed: _numbers(run_dir) for seed, run_dir in runs.items()}
    summary = pd.read_csv(out / "seeds_summary.csv").set_index("metric")
    assert set(summary.index) == set(numbers[0]) | set(numbers[1])
    for key in ("evaluate/perfit/mae", "evaluate/lora/mae", "fit/stage2/last_epoch_loss"):
        assert key in summary.index
    checked = 0
    for key, row in summary.iterrows():
        values = [numbers[s][key] for s in (0, 1) if math.isfinite(numbers[s].get(key, float("nan")))]
        if len(values) == 2:
            assert row["mean"] == pytest.approx((values[0] + values[1]) / 2, rel=1e-12, abs=1e-12)
            assert row["min"] == min(values) and row["max"] == max(values)
            assert row["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), rel=1e-9, abs=1e-12)
            checked += 1
    assert checked > 20
    assert any(numbers[0][k] != numbers[1][k] for k in numbers[0] if k in numbers[1])  # the seeds differ
    data = json.loads((out / "seeds_summary.json").read_text())
    assert data["seeds"] == [0, 1]
    assert data["metrics"]["evaluate/perfit/mae"]["mean"] == pytest.approx(summary.loc["evaluate/perfit/mae", "mean"])
    assert "| evaluate/perfit/mae |" in (out / "seeds_summary.md").read_text()
    _check_pooled(out, runs, printed)
    # a single --seed keeps today's layout, and the same seed gives the same numbers
    single = tmp_path / "single"
    assert main([*common, "--seed", "1", "--out", str(single)]) == 0
    capsys.readouterr()
    assert (single / "metrics.json").is_file() and not (single / "seed1").exists()
    assert _numbers(single) == numbers[1]
    # --seed and --seeds together are refused, in one line
    assert main([*common, "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "both")]) == 2
    assert "--seed and --seeds cannot be given together" in capsys.readouterr().err
