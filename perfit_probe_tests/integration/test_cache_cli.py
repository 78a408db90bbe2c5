"""``perfit-probe cache`` end to end on a saved tiny model, in one process and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from perfit_probe.cache_store import ActivationCache
from perfit_probe.cli import main
from perfit_probe.deltas import Deltas
from perfit_probe_tests.prompts import make_examples
from perfit_probe_tests.tiny import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "model")
    examples = root / "examples.jsonl"
    examples.write_text("".join(
        json.dumps({"user_id": e.user_id, "query_id": e.query_id, "variant": e.variant, "prompt": e.prompt}) + "\n"
        for e in make_examples(4, 2)))
    return root, model, examples


def _args(model, examples, out):
    return ["cache", "--model", str(model), "--examples", str(examples), "--out", str(out), "--sites", "0,2",
            "--batch-size", "3", "--shard-rows", "5", "--no-progress"]


def test_cli_writes_cache_deltas_and_metrics(setup, capsys):
    root, model, examples = setup
    out = root / "one"
    assert main(_args(model, examples, out)) == 0
    assert "cached 24 prompts" in capsys.readouterr().out
    cache = ActivationCache.open(out)
    assert len(cache) == 24 and cache.sites == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    deltas = Deltas.load(out / "deltas")
    assert deltas.enhanced.shape == (4, 2, 32) and deltas.control is not None
    assert (out / "deltas" / "deltas.csv").read_text().startswith("user_id,site,layer")
    metrics = json.loads((out / "metrics.json").read_text())["cache"]
    assert metrics["n_rows"] == 24 and metrics["deltas_users"] == 4
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["sites"] == ["0", "2"] and info["model"]["d_model"] == 32
    # a second run into the same directory is refused, and --resume computes nothing
    assert main(_args(model, examples, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(_args(model, examples, out) + ["--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["cache"]["computed_rows"] == 0


def test_torchrun_two_processes_give_the_same_cache(setup):
    root, model, examples = setup
    single, double = root / "single", root / "double"
    assert main(_args(model, examples, single)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "perfit_probe.cli", *_args(model, examples, double)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = ActivationCache.open(single), ActivationCache.open(double)
    assert two.manifest["runs"][-1]["world_size"] == 2
    assert two.manifest["runs"][-1]["computed_shards"] == one.n_shards == 5
    assert one.index.equals(two.index)
    torch.testing.assert_close(two.select().values, one.select().values, atol=1e-6, rtol=0)
    d1, d2 = Deltas.load(single / "deltas"), Deltas.load(double / "deltas")
    assert d1.user_ids == d2.user_ids
    torch.testing.assert_close(d2.enhanced, d1.enhanced, atol=1e-6, rtol=0)


def test_cli_on_a_task_builds_prompts_and_caches_them(setup):
    root, model, _ = setup
    out = root / "task"
    assert main(["cache", "--model", str(model), "--task", "synthetic", "--users", "3", "--max-queries", "2",
                 "--sites", "1", "--positions", "mean", "--out", str(out), "--no-progress"]) == 0
    cache = ActivationCache.open(out)
    assert len(cache) == 3 * 2 * 3 and cache.positions == "mean"
    assert sorted(cache.index["variant"].unique()) == ["control", "enhanced", "plain"]
    assert cache.index.groupby("user_id")["query_id"].nunique().tolist() == [2, 2, 2]
    deltas = Deltas.load(out / "deltas")
    assert len(deltas.user_ids) == 3 and deltas.meta["task"] == "synthetic"
