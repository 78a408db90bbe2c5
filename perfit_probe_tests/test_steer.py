"""Causal checks on planted users, their maths on synthetic tensors, and the run-directory path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.steer import (
    SteerConfig,
    derangement,
    history_behaviour,
    personal_subspace,
    random_bank,
    steer_checks,
)
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe_tests.test_evaluate import planted_run, planted_task

FAST = SteerConfig(alphas=(0.0, 0.5, 1.0, 2.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _value(rows: pd.DataFrame, experiment: str, setting: str, metric: str) -> float:
    sel = rows[(rows.experiment == experiment) & (rows.setting == setting) & (rows.metric == metric)]
    assert len(sel) == 1, (experiment, setting, metric)
    return float(sel.value.iloc[0])


@pytest.fixture(scope="module")
def planted_steer():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped one above
    try:
        loaded, task, split, perfit = planted_run()
        return steer_checks(loaded, task, split, perfit, FAST)
    finally:
        torch.set_num_threads(before)


def test_user_swap_moves_outputs_toward_the_donor(planted_steer):
    rows, pairs = planted_steer.rows, planted_steer.pairs
    assert len(pairs) == 12  # all ordered pairs of 4 test users
    # the shift of B's mean predicted rating follows the donor-recipient gap in planted ratings
    assert _value(rows, "swap", "pairs", "shift_gap_correlation") > 0.8
    assert _value(rows, "swap", "pairs", "toward_donor_pred_share") >= 0.75
    assert _value(rows, "swap", "pairs", "distance_reduction") > 0
    # oracle for one pair: donor b (rating 5) on recipient a (rating 1) raises a's mean prediction
    ab = pairs[(pairs.donor == "b") & (pairs.recipient == "a")].iloc[0]
    assert ab.swap_pred > ab.own_pred and ab.donor_mean == 5.0 and ab.recipient_mean == 1.0
    # tests over the 4 recipients: exact sign-flip p (16 patterns; at best 2/16 two-sided), intervals
    n_toward = _value(rows, "swap", "pairs", "n_toward_donor")
    assert n_toward == round(12 * _value(rows, "swap", "pairs", "toward_donor_share"))
    assert _value(rows, "swap", "pairs", "toward_donor_pred_share_p") == pytest.approx(2 / 16)
    assert _value(rows, "swap", "pairs", "n_perm") == 16
    low, high = (_value(rows, "swap", "pairs", f"toward_donor_share_ci_{s}") for s in ("low", "high"))
    assert low <= _value(rows, "swap", "pairs", "toward_donor_share") <= high
    assert _value(rows, "swap", "pairs", "shift_gap_correlation_p") < 0.01
    assert _value(rows, "swap", "pairs", "shift_gap_correlation_ci_low") > 0.5
    assert planted_steer.verdicts[0].startswith(f"user swap: {int(n_toward)} of 12 pairs move toward")


def test_ablation_dose_and_control(planted_steer):
    rows = planted_steer.rows
    perfit_mae = _value(rows, "reference", "perfit", "mae")
    stage1_mae = _value(rows, "reference", "stage1", "mae")
    assert perfit_mae < stage1_mae
    # ablating the personal subspace hurts more than ablating a random one of the same size
    assert _value(rows, "ablation", "perfit_ablate_personal", "gain_removed") > \
        _value(rows, "ablation", "perfit_ablate_random", "gain_removed") + 0.25
    # ... and than every one of 50 random ones: top percentile, empirical p = 1 / 51
    table = planted_steer.random_subspaces
    assert len(table) == 50 == _value(rows, "ablation", "random_subspaces", "n")
    assert table.seed.tolist() == list(range(50))
    assert _value(rows, "ablation", "perfit_ablate_personal", "random_percentile") == 100.0
    assert _value(rows, "ablation", "perfit_ablate_personal", "random_p") == pytest.approx(1 / 51)
    assert _value(rows, "ablation", "perfit_ablate_random", "gain_removed") == table.gain_removed.iloc[0]
    assert _value(rows, "ablation", "random_subspaces", "metric_lost_mean") == pytest.approx(table.metric_lost.mean())
    assert _value(rows, "ablation", "perfit_ablate_personal", "metric_lost") == pytest.approx(
        _value(rows, "ablation", "perfit_ablate_personal", "mae") - perfit_mae)
    k = int(_value(rows, "ablation", "subspace", "k"))
    assert planted_steer.basis.shape == (k, 32)
    torch.testing.assert_close(planted_steer.basis @ planted_steer.basis.T, torch.eye(k), atol=1e-5, rtol=0)
    # dose: alpha = 0 is stage 1 exactly, alpha = 1 is PerFit exactly; MAE falls with alpha on [0, 1]
    assert _value(rows, "dose", "0", "mae") == stage1_mae
    assert _value(rows, "dose", "1", "mae") == perfit_mae
    assert _value(rows, "dose", "0", "mean_pred") == pytest.approx(_value(rows, "reference", "stage1", "mean_pred"))
    assert _value(rows, "dose", "spearman_0_1", "mae") < 0
    for alpha in ("0", "0.5", "1", "2"):  # intervals over the 4 test users hold the estimate
        for metric in ("mae", "mean_pred"):
            assert _value(rows, "dose", alpha, f"{metric}_ci_low") <= _value(rows, "dose", alpha, metric) + 1e-9
            assert _value(rows, "dose", alpha, metric) <= _value(rows, "dose", alpha, f"{metric}_ci_high") + 1e-9
    assert _value(rows, "dose", "best", "alpha") in (0.5, 1.0, 2.0)
    assert _value(rows, "dose", "best", "mae") == min(_value(rows, "dose", a, "mae") for a in ("0", "0.5", "1", "2"))
    # control: neither a norm-matched random bank nor shuffled users give PerFit's gain
    assert _value(rows, "control", "random_bank", "mae") > perfit_mae
    assert _value(rows, "control", "shuffled_users", "mae") > perfit_mae
    assert set(rows.columns) == {"experiment", "setting", "metric", "value"}


def test_personal_subspace_recovers_a_planted_subspace():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 2, generator=gen))  # planted 2-d subspace of R^20
    edits = (torch.randn(12, 3, 2, generator=gen) @ q.T)  # [users, sites, d] inside it
    basis, cum = personal_subspace(edits, energy=0.999, max_k=8)
    assert basis.shape == (2, 20) and cum[1] == pytest.approx(1.0)
    proj = basis.T @ basis
    torch.testing.assert_close(proj @ q, q, atol=1e-5, rtol=0)  # spans the planted subspace
    assert personal_subspace(edits, energy=0.999, max_k=1)[0].shape == (1, 20)
    with pytest.raises(ConfigError, match="all zero"):
        personal_subspace(torch.zeros(3, 1, 20))


def test_random_bank_matches_rank_and_edit_norms():
    spec = BankSpec("loreft", ("blocks.1.hook_resid_post",), "l1", 3, 16)
    bank = InterventionBank.initialised(spec, ["a", "b"], "random", 0).requires_grad_(False)
    fake = random_bank(bank, seed=1)
    for i in range(2):
        r_fake = fake.rotation(0)[i]
        torch.testing.assert_close(r_fake @ r_fake.T, torch.eye(3), atol=1e-5, rtol=0)
        real_diff = bank.site_params[0].W[i] - bank.rotation(0)[i]
        fake_diff = fake.site_params[0].W[i] - r_fake
        assert float(fake_diff.norm()) == pytest.approx(float(real_diff.norm()), rel=1e-4)
        assert float(fake.site_params[0].b[i].norm()) == pytest.approx(float(bank.site_params[0].b[i].norm()), rel=1e-5)
        assert abs(float((r_fake * bank.rotation(0)[i]).sum())) < 3  # not the same subspace
    mapping = derangement(["a", "b", "c", "d"], seed=0)
    assert sorted(mapping.values()) == ["a", "b", "c", "d"] and all(k != v for k, v in mapping.items())


def test_history_behaviour_for_ratings_and_labels():
    task, split = planted_task()
    assert history_behaviour(task, split, "d")[0] == 4.0
    from dataclasses import replace

    from perfit_probe.data.records import TaskData

    labelled = TaskData(replace(task.spec, kind="classification"), task.users)
    hist = history_behaviour(labelled, split, "c")  # 5 history queries rated "2", add-one smoothing
    np.testing.assert_allclose(hist, np.array([1, 6, 1, 1, 1]) / 10)


def test_run_evaluate_and_run_steer_write_the_run_directory(tmp_path, monkeypatch):
    import perfit_probe.data as data
    from perfit_probe.cli import main
    from perfit_probe.evaluation.evaluate import EvalConfig, run_evaluate
    from perfit_probe.evaluation.lora import LoraBaselineConfig
    from perfit_probe.evaluation.steer import run_steer
    from perfit_probe.rundir import RunDir

    loaded, task, split, perfit = planted_run()
    run = RunDir.create(tmp_path / "run", "fit", {}, 0, loaded.identity)
    perfit.save(run.sub("perfit"))
    split.save(run.path / "perfit" / "split.json")
    (run.path / "perfit" / "task.json").write_text(json.dumps({"task": "planted", "n_users": 6, "k": 2}))
    run.add_metrics("fit", {"stage1_train_s": 2.0, "stage2_train_s": 4.0})
    calls = []
    monkeypatch.setattr(data, "load_task", lambda name, **kw: calls.append((name, kw)) or task)
    config = EvalConfig(methods=("base", "perfit", "lora"), lora=LoraBaselineConfig(epochs=1))
    result = run_evaluate(run.path, loaded, config)
    assert calls[0] == ("planted", {"n_users": 6})
    table = pd.read_csv(run.path / "eval" / "results.csv").set_index("method")
    assert table.loc["perfit", "train_s_per_user"] == pytest.approx(1.0)  # 4 s over 4 test users
    assert table.loc["perfit", "mae"] == pytest.approx(result.table.set_index("method").loc["perfit", "mae"])
    assert (run.path / "eval" / "predictions" / "lora.json").is_file()
    assert "perfit" in run.metrics()["evaluate"]
    steer = run_steer(run.path, loaded, SteerConfig(alphas=(0.0, 1.0), experiments=("swap", "dose")))
    saved = pd.read_csv(run.path / "steer" / "steer.csv", dtype={"setting": str})
    assert len(saved) == len(steer.rows)
    verdict_lines = (run.path / "steer" / "verdicts.md").read_text().splitlines()
    assert verdict_lines == [f"- {line}" for line in steer.verdicts] and len(verdict_lines) == 4  # swap x 3, dose
    figures = sorted(p.name for p in (run.path / "figures").iterdir())
    assert figures == ["eval_differences.png", "eval_intervals.png", "steer_dose.png", "steer_swap.png"]
    # figures regenerate from the CSVs alone
    from analyses.eval_figures import main as eval_figures_main
    from analyses.steer_figures import main as figures_main

    assert figures_main([str(run.path), "--out", str(tmp_path / "again")]) == 0
    assert eval_figures_main([str(run.path), "--out", str(tmp_path / "again")]) == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == figures
    # the CLI turns a directory without a fit into a one-line error (exit status 2)
    from perfit_probe_tests.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    assert main(["steer", str(tmp_path / "again"), "--model", str(model_dir)]) == 2
    assert main(["evaluate", str(tmp_path / "again"), "--model", str(model_dir)]) == 2
