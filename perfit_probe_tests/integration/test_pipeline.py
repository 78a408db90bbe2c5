"""The whole pipeline through the CLI at a tiny size; pipeline config files."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import perfit_probe
from perfit_probe.cli import main
from perfit_probe.config import load_pipeline_config, stage_configs
from perfit_probe.deltas import Deltas
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.baselines import BASELINES
from perfit_probe.pipeline import demo_config
from perfit_probe_tests.oracles import oracle_rank
from perfit_probe_tests.tiny import save_tiny_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


STAGE_FILES = ("run.json", "metrics.json", "report.md", "cache/manifest.json", "deltas/deltas.safetensors",
               "analysis/report.md", "analysis/ranks.csv", "perfit/split.json", "perfit/bank", "eval/results.csv",
               "eval/predictions.csv", "steer/steer.csv")
TEXT = {"user_id": str, "query_id": str, "gold": str, "output": str}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo through the CLI on a tiny llama with the synthetic task (8 users), run once:
    (model directory, run directory, exit status, printed text)."""
    root = tmp_path_factory.mktemp("pipeline")
    model = save_tiny_model(root / "model", "llama")
    out = root / "run"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped ``one_thread``
    try:
        with contextlib.redirect_stdout(printed):
            status = main(["demo", "--model", str(model), "--task", "synthetic", "--users", "8",
                           "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return model, out, status, printed.getvalue()


def test_demo_runs_every_stage_through_the_cli(demo_run, tmp_path, capsys):
    model, out, status, printed = demo_run
    assert status == 0
    assert "report:" in printed and str(out) in printed
    for path in STAGE_FILES:
        assert (out / path).exists(), path
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["pipeline"]["stage_wall_s"]) == {"cache", "analyze", "fit", "evaluate", "steer", "interpret"}
    results = pd.read_csv(out / "eval" / "results.csv")
    assert list(results["method"]) == ["base", "rag", "stage1", "perfit", "lora", "lora_task", "oppu", "steer_delta", "user_mean",
                                       "user_median", "user_majority", "global_majority", "global_mean", "bm25_top1"]
    assert (out / "eval" / "differences.csv").is_file() and (out / "figures" / "eval_intervals.png").is_file()
    report = (out / "report.md").read_text()
    assert "Shift analysis" in report and "Evaluation" in report and "figures/" in report
    # the verdicts are generated from the run's statistics and lead the report
    claims = pd.read_csv(out / "claims.csv")
    assert set(claims["claim"].astype(str)) == {"1", "2", "3"}
    assert all(sentence in report for sentence in claims["sentence"])
    assert metrics["claims"] == {f"{r.claim}/{r.scope}": r.verdict for r in claims.itertuples()}
    assert "## PerFit training" in report and "stage-2 model selection" in report
    # the report shows the evaluation table's numbers, each with its interval
    for row in results.itertuples():
        assert f"| {row.method} | {row.mae:.3f} [" in report
    # the run directory is never overwritten
    assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "8",
                 "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "report.md").read_text() == report
    # later stages on the run directory load the model recorded in run.json by default
    # (on a copy: this rewrites steer/)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["steer", str(copy), "--experiments", "dose", "--no-figures"]) == 0
    assert "dose" in capsys.readouterr().out
    assert set(pd.read_csv(copy / "steer" / "steer.csv").experiment) == {"reference", "dose"}


def test_split_is_disjoint_and_the_test_users_are_the_evaluated_ones(demo_run):
    _, out, _, _ = demo_run
    split = json.loads((out / "perfit" / "split.json").read_text())
    train, test = set(split["train_users"]), set(split["test_users"])
    everyone = set(Deltas.load(out / "deltas").user_ids)
    assert len(everyone) == 8 and not train & test and train | test == everyone
    assert len(test) == 4 and split["seed"] == 0  # test_fraction 0.5
    assert set(split["heldout"]) == test and all(len(q) == 6 for q in split["heldout"].values())  # n_heldout 6
    # personal interventions for exactly the test users
    assert set(json.loads((out / "perfit" / "bank" / "intervention.json").read_text())["keys"]) == test
    preds = pd.read_csv(out / "eval" / "predictions.csv", dtype=TEXT)
    for method, frame in preds.groupby("method"):
        assert set(frame.user_id) == test, method
        assert sorted(zip(frame.user_id, frame.query_id)) == sorted(
            (u, q) for u, qs in split["heldout"].items() for q in qs), method


def _check_results_against_predictions(out: Path, n_queries: int, n_users: int) -> None:
    """MAE, RMSE and expected-rating MAE of each method recomputed by hand from predictions.csv,
    and the LaMP-format prediction files equal to that CSV."""
    table = pd.read_csv(out / "eval" / "results.csv").set_index("method")
    preds = pd.read_csv(out / "eval" / "predictions.csv", dtype=TEXT)
    assert set(preds.method) == set(table.index)
    golds = json.loads((out / "eval" / "predictions" / "golds.json").read_text())
    gold_of = {row["id"]: row["output"] for row in golds["golds"]}
    for method, frame in preds.groupby("method"):
        row = table.loc[method]
        gold = frame.gold.astype(float).to_numpy()
        err = frame.output.astype(float).to_numpy() - gold  # constrained decoding: outputs are labels
        assert set(frame.output) <= {"1", "2", "3", "4", "5"}
        assert row.mae == pytest.approx(np.abs(err).mean())
        assert row.rmse == pytest.approx(np.sqrt(np.mean(err ** 2)))
        if frame.expected.notna().all():
            assert row.expected_mae == pytest.approx(np.abs(frame.expected.astype(float).to_numpy() - gold).mean())
        assert row.mean_pred == pytest.approx(frame.output.astype(float).mean())
        assert (row.n_queries, row.n_users) == (len(frame), frame.user_id.nunique()) == (n_queries, n_users)
        assert row.decoding == ("none" if method in BASELINES else "constrained")
        lamp = json.loads((out / "eval" / "predictions" / f"{method}.json").read_text())
        assert {r["id"]: r["output"] for r in lamp["golds"]} == dict(zip(frame.query_id, frame.output))
        assert dict(zip(frame.query_id, frame.gold)) == gold_of


def test_results_table_equals_a_recomputation_from_the_saved_predictions(demo_run):
    _check_results_against_predictions(demo_run[1], n_queries=24, n_users=4)


@pytest.mark.usefixtures("one_thread")
def test_pipeline_on_gpt2(tmp_path):
    """The other architecture end to end (without steering): the same checks of its results."""
    model = save_tiny_model(tmp_path / "model", "gpt2")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "6",
                     "--stages", "cache,analyze,fit,evaluate", "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 0
    _check_results_against_predictions(tmp_path / "run", n_queries=18, n_users=3)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["model"]["architecture"] == "GPT2LMHeadModel"


def test_metrics_json_agrees_with_the_tables(demo_run):
    _, out, _, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "eval" / "results.csv").set_index("method")
    assert set(metrics["evaluate"]) == set(table.index)
    for method, values in metrics["evaluate"].items():
        assert values == pytest.approx({"mae": table.loc[method, "mae"], "rmse": table.loc[method, "rmse"]})
    steer = pd.read_csv(out / "steer" / "steer.csv", dtype={"setting": str})
    assert len(metrics["steer"]) == len(steer)
    for row in steer.itertuples():
        got = metrics["steer"][f"{row.experiment}/{row.setting}/{row.metric}"]
        assert got == pytest.approx(row.value, nan_ok=True)
    # the analysis headline: the lowest uncentred r@0.9 over sites, from ranks.csv
    ranks = pd.read_csv(out / "analysis" / "ranks.csv")
    ref = ranks[(ranks.source == "deltas") & (ranks.statistic == "rank@0.9") & ~ranks.centered]
    analysis = metrics["analysis"]
    assert analysis["uncentred"]["deltas"]["rank@0.9"] == ref.value.min()
    assert ref.set_index("site").loc[analysis["best_site"], "value"] == ref.value.min()
    assert (analysis["n_users"], analysis["d_model"], analysis["n_sites"]) == (8, 32, len(ref))
    fit = metrics["fit"]
    assert (fit["n_train_users"], fit["n_test_users"]) == (4, 4)
    assert table.loc["perfit", "params_per_user"] == fit["params"]["per_user"]
    assert table.loc["stage1", "shared_params"] == fit["params"]["collective"]


def test_analysis_ranks_equal_numpy_svd_of_the_saved_deltas(demo_run):
    _, out, _, _ = demo_run
    deltas = Deltas.load(out / "deltas")
    ranks = pd.read_csv(out / "analysis" / "ranks.csv")
    assert list(dict.fromkeys(ranks.site)) == deltas.sites
    for index, site in enumerate(deltas.sites):
        x = deltas.enhanced[:, index].double().numpy()
        for center in (False, True):
            for tau in (0.8, 0.9, 0.95):
                sel = ranks[(ranks.site == site) & (ranks.source == "deltas") & (ranks.centered == center)
                            & (ranks.statistic == f"rank@{tau:g}")]
                assert len(sel) == 1 and sel.value.iloc[0] == oracle_rank(x, tau, center), (site, center, tau)


def test_run_json_records_the_seed_config_and_model(demo_run):
    model, out, _, _ = demo_run
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "pipeline" and info["seed"] == 0
    resolved = info["config"]["resolved"]
    assert {stage: resolved[stage]["seed"] for stage in resolved} == dict.fromkeys(
        ("cache", "analyze", "fit", "evaluate", "steer", "interpret"), 0)
    assert resolved["fit"]["n_users"] == resolved["cache"]["n_users"] == 8
    assert resolved["fit"]["task"] == resolved["cache"]["task"] == "synthetic"
    assert info["config"]["pipeline"]["task"] == {"name": "synthetic", "path": None, "outputs": None, "n_users": 8,
                                                  "max_queries": None, "seed": 0, "k": 4, "retriever": "bm25",
                                                  "chat": None}
    assert [stage["command"] for stage in info["stages"]] == ["cache", "analyze", "fit", "evaluate", "steer", "interpret"]
    # each stage recorded the config it ran with, equal to the resolved one, where the resolved one
    # leaves an option to the fit (None) the fit's value is recorded
    for stage in info["stages"][1:]:
        wanted = resolved[stage["command"]]
        assert set(stage["config"]) == set(wanted), stage["command"]
        for key, value in wanted.items():
            assert value is None or stage["config"][key] == value, (stage["command"], key)
    assert info["stages"][3]["config"]["val_per_user"] == resolved["fit"]["val_per_user"]
    from perfit_probe.models import load_model

    identity = load_model(str(model)).identity
    assert info["model"]["fingerprint"] == identity.fingerprint
    assert (info["model"]["n_layers"], info["model"]["d_model"]) == (4, 32)
    assert info["versions"]["perfit-probe"] == perfit_probe.__version__


@pytest.mark.usefixtures("one_thread")
def test_same_seed_same_results(demo_run, tmp_path):
    """A second run with the same seed and model reproduces the first (timings aside)."""
    model, first, _, _ = demo_run
    second = tmp_path / "again"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "8",
                     "--stages", "cache,analyze,fit,evaluate", "--out", str(second), "--no-progress"]) == 0
    for rel in ("eval/results.csv", "eval/predictions.csv", "analysis/ranks.csv", "analysis/collective.csv",
                "perfit/curves.csv"):
        a, b = pd.read_csv(first / rel), pd.read_csv(second / rel)
        time_cols = [c for c in a.columns if c.endswith("_s") or "_s_" in c or c.startswith("time")]
        pd.testing.assert_frame_equal(a.drop(columns=time_cols), b.drop(columns=time_cols), obj=rel)
    assert (first / "perfit" / "split.json").read_text() == (second / "perfit" / "split.json").read_text()
    for bank in ("stage1", "bank"):
        a = load_file(first / "perfit" / bank / "intervention.safetensors")
        b = load_file(second / "perfit" / bank / "intervention.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), bank
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert m1["evaluate"] == m2["evaluate"] and m1["analysis"] == m2["analysis"]


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


def test_larger_example_is_the_demos_recipe_at_40_test_users():
    large = stage_configs(load_pipeline_config(EXAMPLES / "movielens-smollm2-40users-cpu.toml"))
    demo = stage_configs(demo_config())
    assert large["fit"] == replace(demo["fit"], n_users=52, n_test_users=40)
    assert large["evaluate"] == demo["evaluate"]


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


def test_notebook_speaks_the_run_language_on_a_fitted_run(demo_run, tmp_path, monkeypatch):
    """The notebook's last section on a fitted run: PerFitRun's prompt, distributions and the KL table."""
    import nbformat
    from nbclient import NotebookClient

    _, out, _, _ = demo_run
    monkeypatch.setenv("PERFIT_RUN_DIR", str(out))
    notebook = Path(__file__).resolve().parents[2] / "analyses" / "explore_shifts.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "PERFIT_RUN_DONE user=" in text and "conditions=5" in text
