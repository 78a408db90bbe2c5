"""Acceptance: the whole pipeline through the CLI at a tiny size; pipeline config files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from perfit_probe.cli import main
from perfit_probe.errors import ConfigError
from perfit_probe.pipeline import demo_config, load_pipeline_config, stage_configs
from perfit_probe_tests.tiny import save_tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_runs_every_stage_through_the_cli(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model", "llama")
    out = tmp_path / "run"
    assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "8",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and str(out) in printed
    for path in ("run.json", "metrics.json", "report.md", "cache/manifest.json", "deltas/deltas.safetensors",
                 "analysis/report.md", "perfit/split.json", "perfit/bank", "eval/results.csv",
                 "steer/steer.csv"):
        assert (out / path).exists(), path
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "pipeline" and info["seed"] == 0
    assert info["config"]["resolved"]["fit"]["n_users"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["pipeline"]["stage_wall_s"]) == {"cache", "analyze", "fit", "evaluate", "steer"}
    results = pd.read_csv(out / "eval" / "results.csv")
    assert set(results["method"]) == {"base", "rag", "stage1", "perfit", "lora", "lora_task", "oppu", "user_mean",
                                      "user_median", "user_majority", "global_majority", "global_mean", "bm25_top1"}
    assert (out / "eval" / "differences.csv").is_file() and (out / "figures" / "eval_intervals.png").is_file()
    report = (out / "report.md").read_text()
    assert "Shift analysis" in report and "Evaluation" in report and "figures/" in report
    assert "## PerFit training" in report and "stage-2 model selection" in report
    # the run directory is never overwritten
    assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "8",
                 "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "report.md").read_text() == report
    # later stages on the run directory load the model recorded in run.json by default
    assert main(["steer", str(out), "--experiments", "dose", "--no-figures"]) == 0
    assert "dose" in capsys.readouterr().out


def test_same_seed_same_results(tmp_path):
    model = save_tiny_model(tmp_path / "model", "gpt2")
    for name in ("a", "b"):
        assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "6",
                     "--stages", "cache,analyze,fit,evaluate", "--out", str(tmp_path / name),
                     "--no-progress"]) == 0
    for rel in ("eval/results.csv", "analysis/ranks.csv"):
        a = pd.read_csv(tmp_path / "a" / rel).drop(columns=["train_s", "lora_train_s"], errors="ignore")
        b = pd.read_csv(tmp_path / "b" / rel).drop(columns=["train_s", "lora_train_s"], errors="ignore")
        time_cols = [c for c in a.columns if c.endswith("_s") or "_s_" in c or c.startswith("time")]
        pd.testing.assert_frame_equal(a.drop(columns=time_cols), b.drop(columns=time_cols))


def test_demo_config_places_sites_inside_any_model():
    for n in (4, 12, 30, 32):
        resolved = stage_configs(demo_config(n_layers=n))
        assert all(0 <= int(s) < n for s in resolved["cache"].sites)
        assert all(0 <= layer < n for layer in resolved["fit"].layers)
    resolved = stage_configs(demo_config(n_layers=30))
    assert resolved["fit"].layers == (8, 14) and resolved["cache"].n_users == 24


def test_example_configs_parse_and_resolve():
    files = sorted(EXAMPLES.glob("*.toml"))
    assert len(files) >= 3
    for path in files:
        resolved = stage_configs(load_pipeline_config(path))
        assert resolved["fit"].task == resolved["cache"].task


def test_movielens_example_is_the_demo():
    from_file = stage_configs(load_pipeline_config(EXAMPLES / "movielens-smollm2-cpu.toml"))
    assert from_file == stage_configs(demo_config())


def test_bad_config_files_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    cases = {
        "[model\nname = 1": "malformed TOML",
        "[modle]\nname = 'x'": "unknown section",
        "[fit]\nlayerz = [1]": "unknown key",
        "[task]\nnmae = 'x'": "unknown key",
        "stages = ['cache', 'dance']": "unknown stage",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            stage_configs(load_pipeline_config(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline_config(tmp_path / "missing.toml")
