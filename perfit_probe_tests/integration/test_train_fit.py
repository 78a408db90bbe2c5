"""The fit stage and ``perfit-probe fit`` end to end on a tiny model and the synthetic task."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from perfit_probe._io import read_json
from perfit_probe.cli import main
from perfit_probe.config import FitConfig
from perfit_probe.data.splits import Split
from perfit_probe.interventions.artifact import load_perfit
from perfit_probe.interventions.fit import lora_parameter_count
from perfit_probe.sites import Site
from perfit_probe.stages import fit as fit_stage
from perfit_probe_tests.tiny import save_tiny_model, tiny_model

SMALL = dict(task="synthetic", n_users=6, max_queries=4, n_heldout=1, layers=(1, -1), positions="f1+l1",
             collective_rank=4, personal_rank=2, epochs1=1, epochs2=2, batch_size=4, lr1=1e-2, lr2=1e-2,
             max_prompt_tokens=96, model="tiny")


def test_run_fit_writes_complete_run(tmp_path):
    loaded = tiny_model("llama")
    run = fit_stage.run(FitConfig(**SMALL), tmp_path / "run", loaded).run
    pdir = run.path / "perfit"
    for name in ("stage1/intervention.safetensors", "bank/intervention.json", "split.json", "task.json",
                 "curves.csv", "params.json"):
        assert (pdir / name).is_file(), name
    split = Split.load(pdir / "split.json")
    fit = load_perfit(run.path, loaded)
    assert fit.user_ids == list(split.test_users) and len(split.train_users) == 3
    assert fit.collective.spec.sites == (Site(1), Site(3))
    curves = pd.read_csv(pdir / "curves.csv", dtype={"user_id": str})
    assert set(curves["stage"]) == {"collective", "personal"}
    assert set(curves[curves["stage"] == "personal"]["user_id"]) == set(split.test_users)
    metrics = run.metrics()["fit"]
    assert metrics["stage1_train_s"] > 0 and metrics["n_test_users"] == 3
    # defaults follow pyreft: its clamp, separate first/last interventions (f1+l1: 2 per site)
    for bank in (fit.collective, fit.personal):
        assert (bank.spec.position_clamp, bank.spec.share_weights, bank.spec.groups) == ("pyreft", False,
                                                                                         ("first", "last"))
        assert len(bank.site_params) == 4
    params = read_json(pdir / "params.json")
    assert params["per_user"] == 2 * 2 * (2 * 32 * 2 + 2) and params["collective"] == 2 * 2 * (2 * 32 * 4 + 4)
    assert params["spec_personal"]["share_weights"] is False and params["spec_personal"]["position_clamp"] == "pyreft"
    task = read_json(pdir / "task.json")
    assert task["load"]["name"] == "synthetic" and task["load"]["n_users"] == 6
    with pytest.raises(Exception, match="already holds a fit"):
        fit_stage.run(FitConfig(**SMALL), tmp_path / "run", loaded)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_count_matches_peft(arch):
    from peft import LoraConfig, get_peft_model

    loaded = tiny_model(arch)
    expected = lora_parameter_count(loaded.model, 8)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    peft_model = get_peft_model(loaded.model, LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert expected == trainable


def test_cli_fit_and_one_line_errors(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny")
    capsys.readouterr()
    base = ["fit", "--model", str(model_dir), "--task", "synthetic", "--users", "6", "--max-queries", "4",
            "--heldout", "1", "--epochs1", "1", "--epochs2", "1", "--no-progress", "--max-prompt-tokens", "96"]
    assert main(base + ["--layers", "1", "--collective-rank", "33", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "rank 33" in err and len(err.splitlines()) == 1
    assert main(base + ["--layers", "7", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 7 is out of range" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(base + ["--layers", "1", "--val-per-user", "-1", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "val_per_user" in err and len(err.splitlines()) == 1
    assert main(base + ["--layers", "1,2", "--personal-rank", "2", "--collective-rank", "2", "--personal-data", "queries",
                        "--personal-init", "stage1", "--stacking", "compose", "--val-per-user", "1",
                        "--position-clamp", "cover", "--share-weights", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "per user" in out and "stage-2 selection: kept" in out
    fit = load_perfit(tmp_path / "c")
    assert fit.stacking == "compose" and len(fit.user_ids) == 3
    assert (fit.personal.spec.position_clamp, fit.personal.spec.share_weights) == ("cover", True)
    assert len(fit.personal.site_params) == 2  # one intervention per site (layers 1, 2)
    assert torch.isfinite(fit.personal.site_params[0].W).all()
    curves = pd.read_csv(tmp_path / "c" / "perfit" / "curves.csv", dtype={"user_id": str})
    val = curves[curves["split"] == "val"]
    assert set(val["user_id"]) == set(fit.user_ids) and set(val["epoch"]) == {0, 1}
    assert (val.groupby("user_id")["selected"].sum() == 1).all() and (val["n_rows"] == 1).all()
    # each test user has 3 history queries: 1 held out for selection, 2 trained on (1 step each)
    assert (curves[(curves["split"] == "train") & (curves["stage"] == "personal")]["n_rows"] == 2).all()
    selection = read_json(tmp_path / "c" / "metrics.json")["fit"]["stage2"]["selection"]
    assert selection["users"] == 3 and sum(selection["kept_epoch_counts"].values()) == 3
    assert selection["val_loss_kept"] <= min(selection["val_loss_start"], selection["val_loss_last"]) + 1e-9


def test_fit_config_checks_position_options():
    from perfit_probe.errors import ConfigError

    FitConfig(position_clamp="cover", share_weights=True).validate()
    with pytest.raises(ConfigError, match="position_clamp: expected one of 'pyreft' or 'cover', got str 'half'"):
        FitConfig(position_clamp="half").validate()
    with pytest.raises(ConfigError, match="share_weights"):
        FitConfig(share_weights="no").validate()


def test_validation_split_is_seeded_disjoint_and_keeps_a_training_example():
    from perfit_probe.interventions.batching import Encoded
    from perfit_probe.interventions.fit import validation_split

    rows = {"a": [Encoded((i, 1), 1) for i in range(6)], "b": [Encoded((9, 2), 1)], "c": [Encoded((i, 3), 1) for i in range(2)]}
    train, val = validation_split(rows, 2, seed=0)
    assert [len(val[u]) for u in "abc"] == [2, 0, 1] and [len(train[u]) for u in "abc"] == [4, 1, 1]
    for user in rows:
        assert sorted(r.ids for r in train[user] + val[user]) == sorted(r.ids for r in rows[user])
        assert [r for r in rows[user] if r in train[user]] == train[user]  # training order kept
    assert validation_split(rows, 2, seed=0) == (train, val)
    assert validation_split(rows, 2, seed=1)[1]["a"] != val["a"] or validation_split(rows, 2, seed=2)[1]["a"] != val["a"]


def test_torchrun_two_processes_give_the_same_fit(tmp_path):
    """Stage 2 sharded over 2 ranks (users i mod 2), merged by rank 0: the same banks, curves
    and selection as one process, since every user trains independently."""
    import os
    import subprocess
    import sys

    model = save_tiny_model(tmp_path / "tiny")
    args = ["fit", "--model", str(model), "--task", "synthetic", "--users", "8", "--max-queries", "5",
            "--heldout", "1", "--layers", "1,2", "--epochs1", "1", "--epochs2", "2", "--batch-size", "2",
            "--val-per-user", "1", "--no-progress", "--max-prompt-tokens", "96"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "perfit_probe.cli", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = load_perfit(tmp_path / "one"), load_perfit(tmp_path / "two")
    assert one.user_ids == two.user_ids and len(one.user_ids) == 4
    for a, b in zip(one.collective.parameters(), two.collective.parameters()):  # thread counts differ
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(one.personal.parameters(), two.personal.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert not (tmp_path / "two" / "perfit" / "shards").exists()
    c1 = pd.read_csv(tmp_path / "one" / "perfit" / "curves.csv", dtype={"user_id": str})
    c2 = pd.read_csv(tmp_path / "two" / "perfit" / "curves.csv", dtype={"user_id": str})
    key = ["stage", "split", "user_id", "epoch", "step"]
    merged = c1.merge(c2, on=key, suffixes=("", "_2"))
    assert len(merged) == len(c1) == len(c2) and (merged["selected"] == merged["selected_2"]).all()
    assert (merged["loss"] - merged["loss_2"]).abs().max() < 1e-5
    assert read_json(tmp_path / "two" / "metrics.json")["fit"]["world_size"] == 2
