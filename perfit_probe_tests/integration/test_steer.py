"""Causal checks on planted users, their maths on synthetic tensors, and the run-directory path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from perfit_probe.config import SteerConfig
from perfit_probe.data.controls import donor_assignment
import torch

from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.steer import (
    history_behaviour,
    personal_subspace,
    random_bank,
    steer_checks,
)
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.planted import PLANTED, planted_run, planted_task
from perfit_probe_tests.tiny import tiny_model

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
    # dose: MAE falls with alpha on [0, 1] (the end points are checked against independent
    # computations in test_dose_end_points_equal_independent_predictions)
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


def _hand_label_scores(loaded, prompts, intervention):
    """Expected rating and argmax label of each prompt, one prompt at a time and without the
    library's batching or scoring: the model's next-token log-probabilities of " 1" .. " 5"
    at the last prompt token, with ``intervention`` attached (None: the bare model)."""
    from contextlib import nullcontext

    tok = loaded.tokenizer
    label_ids = [tok(" " + label, add_special_tokens=False)["input_ids"] for label in "12345"]
    assert all(len(ids) == 1 for ids in label_ids)
    expected, outputs = [], []
    with torch.no_grad(), (intervention.attached(loaded.model) if intervention else nullcontext()):
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            if intervention is not None:
                intervention.set_batch(torch.ones_like(ids))
            logits = loaded.model(input_ids=ids).logits[0, -1].double()
            logp = logits.log_softmax(-1)[[ids[0] for ids in label_ids]]
            expected.append(float(torch.softmax(logp, 0) @ torch.arange(1.0, 6.0, dtype=torch.float64)))
            outputs.append(int(logp.argmax()) + 1)
    return np.array(expected), np.array(outputs, dtype=float)


def test_dose_end_points_equal_independent_predictions(planted_steer):
    """alpha = 0 gives what a separately built stage-1-only intervention gives (scored here by
    hand, prompt by prompt); alpha = 1 gives the PerFit predictions of ``evaluate_methods``."""
    from perfit_probe.config import EvalConfig
    from perfit_probe.evaluation.evaluate import evaluate_methods, heldout_examples
    from perfit_probe.interventions import Intervention

    loaded, task, split, perfit = planted_run()
    rows = planted_steer.rows
    examples = heldout_examples(task, split, loaded.tokenizer, variants=("plain",), k=0, retriever="bm25",
                                chat=None, seed=0)
    golds = np.array([float(e.target) for e in examples])
    stage1_only = Intervention(collective=perfit.collective)  # no personal bank at all
    expected, outputs = _hand_label_scores(loaded, [e.prompt for e in examples], stage1_only)
    assert _value(rows, "dose", "0", "mean_pred") == pytest.approx(expected.mean(), rel=1e-5)
    assert _value(rows, "dose", "0", "mae") == pytest.approx(np.abs(outputs - golds).mean())
    # the personal bank moves the behaviour, so the check above can tell alpha = 0 from alpha = 1
    assert abs(_value(rows, "dose", "1", "mean_pred") - expected.mean()) > 0.05
    base_expected, _ = _hand_label_scores(loaded, [e.prompt for e in examples], None)
    assert _value(rows, "reference", "base", "mean_pred") == pytest.approx(base_expected.mean(), rel=1e-5)
    # alpha = 1: evaluate's PerFit predictions (same held-out queries)
    evaluated = evaluate_methods(loaded, task, split, perfit, EvalConfig(methods=("perfit",)))
    frame = evaluated.predictions
    assert sorted(frame.query_id) == sorted(e.query_id for e in examples)
    assert _value(rows, "dose", "1", "mean_pred") == pytest.approx(frame.expected.mean(), rel=1e-5)
    err = frame.output.astype(float) - frame.gold.astype(float)
    assert _value(rows, "dose", "1", "mae") == pytest.approx(np.abs(err).mean())


def _promoting_bank(loaded, users, donor, label, strength=1000.0):
    """A PerFit at the last block whose only non-zero edit is ``donor``'s: ``strength`` times a
    unit direction u that raises ``label``'s logit over the other ratings' (u = w_label - mean_l w_l
    of the output embeddings). Stage 1 and every other user edit nothing. The edit swamps the
    last prompt token's hidden state, so after the final norm every prompt edited by the donor's
    slot gets the same label distribution, tilted toward ``label``."""
    from perfit_probe.interventions import PerFit

    tok = loaded.tokenizer
    emb = loaded.model.get_output_embeddings().weight.detach().float()
    ids = [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in "12345"]
    target = ids["12345".index(label)]
    u = emb[target] - emb[ids].mean(0)
    u = u / u.norm()
    assert int((emb[ids] @ u).argmax()) == "12345".index(label)  # u favours the label among ratings
    spec = BankSpec("loreft", (Site(3),), parse_positions("l1"), 1, loaded.d_model)
    collective = InterventionBank.initialised(spec, ["collective"], "zero", 0)
    personal = InterventionBank.initialised(spec, list(users), "zero", 0)
    with torch.no_grad():  # W = R = u: the edit R^T (W h + b - R h) is b u
        i = personal.slot(donor)
        personal.site_params[0].A[i] = u
        personal.site_params[0].W[i] = u
        personal.site_params[0].b[i] = strength
    return PerFit(collective.requires_grad_(False), personal.requires_grad_(False), "sum", loaded.identity.to_dict())


def test_user_swap_applies_the_donors_intervention():
    """Planted: only user b's slot edits (it pushes every answer toward 5, the same way on every
    prompt). Swapping b's slot onto another user's queries gives them b's predictions; b's queries
    with another user's slot fall back to the bare model; swaps between two users with null slots
    change nothing."""
    from perfit_probe.evaluation.evaluate import heldout_examples

    loaded = tiny_model("llama")
    task, split = planted_task()
    perfit = _promoting_bank(loaded, split.test_users, "b", "5")
    result = steer_checks(loaded, task, split, perfit, SteerConfig(experiments=("swap",)))
    pairs = result.pairs.set_index(["donor", "recipient"])
    assert len(pairs) == 12
    examples = heldout_examples(task, split, loaded.tokenizer, variants=("plain",), k=0, retriever="bm25",
                                chat=None, seed=0)
    base = {u: _hand_label_scores(loaded, [e.prompt for e in examples if e.user_id == u], None)[0].mean()
            for u in split.test_users}
    planted = pairs.loc[("a", "b"), "own_pred"]  # b's slot on b's queries
    assert planted > max(base.values()) + 0.3  # tilted toward 5 (a tiny random model's logits are small)
    for (donor, recipient), row in pairs.iterrows():
        if recipient == "b":
            assert row.own_pred == pytest.approx(planted, abs=1e-5)
        else:
            assert row.own_pred == pytest.approx(base[recipient], abs=1e-4)
        if donor == "b":  # the donor's slot, not the recipient's
            assert row.swap_pred == pytest.approx(planted, abs=1e-5)
        else:  # a null slot on anyone's queries: the bare model
            assert row.swap_pred == pytest.approx(base[recipient], abs=1e-4)
    # behaviour = the mean planted (history) rating; distances to the donor's by hand
    mu = {u: float(r) for u, r in PLANTED.items()}
    for (donor, recipient), row in pairs.iterrows():
        assert (row.donor_mean, row.recipient_mean) == (mu[donor], mu[recipient])
        assert row.own_distance == pytest.approx(abs(row.own_pred - mu[donor]))
        assert row.swap_distance == pytest.approx(abs(row.swap_pred - mu[donor]))
    own_d = {k: abs(r.own_pred - mu[k[0]]) for k, r in pairs.iterrows()}
    swap_d = {k: abs(r.swap_pred - mu[k[0]]) for k, r in pairs.iterrows()}
    rows = result.rows
    assert _value(rows, "swap", "pairs", "n_pairs") == 12
    assert _value(rows, "swap", "pairs", "distance_reduction") == pytest.approx(
        np.mean([own_d[k] - swap_d[k] for k in own_d]))
    # b's slot moves every recipient toward b's 5s
    assert all(swap_d[("b", r)] < own_d[("b", r)] for r in "acd")


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


def _hand_rotation(a: np.ndarray) -> np.ndarray:
    """Gram-Schmidt on the rows of ``a`` (the orthonormal R a LoReFT parameter A stands for)."""
    rows = []
    for v in a.astype(np.float64):
        for r in rows:
            v = v - (v @ r) * r
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows)


@pytest.mark.parametrize("kind", ["loreft", "lobireft"])
def test_random_bank_has_the_stated_rank_and_edit_size(kind):
    """Per user: a random orthonormal R, W - R and b random with the Frobenius norms of that user's
    W_u - R_u and b_u (computed here from the raw parameters); the edits span r dimensions and have
    the same mean squared size on isotropic inputs, in another subspace."""
    rank, d = 3, 16
    spec = BankSpec(kind, (Site(1),), parse_positions("l1"), rank, d)
    bank = InterventionBank.initialised(spec, ["a", "b"], "random", 0).requires_grad_(False)
    with torch.no_grad():  # make the two users' edit sizes differ
        bank.site_params[0].b[1].mul_(7.0)
        if kind == "loreft":
            bank.site_params[0].W[1].mul_(5.0)
    fake = random_bank(bank, seed=1)
    real_p, fake_p = bank.site_params[0], fake.site_params[0]
    h = torch.randn(4000, 1, d, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        a_real = real_p.A[i].numpy()
        r_real = _hand_rotation(a_real)
        a_fake = fake_p.A[i].numpy()
        np.testing.assert_allclose(a_fake @ a_fake.T, np.eye(rank), atol=1e-5)  # orthonormal rows
        np.testing.assert_allclose(_hand_rotation(a_fake), a_fake, atol=1e-5)  # so R = A
        assert float(np.linalg.norm(fake_p.b[i].numpy())) == pytest.approx(float(np.linalg.norm(real_p.b[i].numpy())), rel=1e-5)
        if kind == "loreft":
            real_diff = np.linalg.norm(real_p.W[i].numpy() - r_real)
            fake_diff = np.linalg.norm(fake_p.W[i].numpy() - a_fake)
            assert fake_diff == pytest.approx(real_diff, rel=1e-4)
        # a different subspace: overlap ||R_fake R_real^T||_F^2 well below r
        assert float(np.square(a_fake @ r_real.T).sum()) < rank - 0.5
        slots = torch.full((len(h),), i, dtype=torch.long)
        e_real = bank.edit(0, h, slots)[:, 0].double()
        e_fake = fake.edit(0, h, slots)[:, 0].double()
        # the edits live in the r-dimensional row space of R_fake
        expected_rank = rank if kind == "loreft" else 1  # lobireft's edit R^T b is one constant vector
        assert torch.linalg.matrix_rank(e_fake, rtol=1e-4).item() == expected_rank
        proj = torch.from_numpy(a_fake.T @ a_fake).double()
        torch.testing.assert_close(e_fake @ proj, e_fake, atol=1e-4, rtol=0)
        # E ||e||^2 = ||W - R||_F^2 + ||b||^2 on N(0, I) inputs (||b||^2 for lobireft): the same
        # for the real and the fake bank
        size_real, size_fake = e_real.square().sum(1).mean(), e_fake.square().sum(1).mean()
        assert float(size_fake) == pytest.approx(float(size_real), rel=0.1)
    assert fake.keys == bank.keys and not any(p.requires_grad for p in fake.parameters())
    mapping = donor_assignment(["a", "b", "c", "d"], seed=0)
    assert sorted(mapping.values()) == ["a", "b", "c", "d"] and all(k != v for k, v in mapping.items())


def test_random_bank_control_uses_that_bank(planted_steer):
    """The control's random_bank row is PerFit's evaluation with ``random_bank(personal, seed)``."""
    from perfit_probe.config import EvalConfig
    from perfit_probe.evaluation.evaluate import evaluate_methods
    from perfit_probe.interventions import PerFit

    loaded, task, split, perfit = planted_run()
    fake = PerFit(perfit.collective, random_bank(perfit.personal, FAST.seed), perfit.stacking, perfit.model)
    frame = evaluate_methods(loaded, task, split, fake, EvalConfig(methods=("perfit",))).predictions
    rows = planted_steer.rows
    assert _value(rows, "control", "random_bank", "mean_pred") == pytest.approx(frame.expected.mean(), rel=1e-5)
    err = frame.output.astype(float) - frame.gold.astype(float)
    assert _value(rows, "control", "random_bank", "mae") == pytest.approx(np.abs(err).mean())


def test_history_behaviour_for_ratings_and_labels():
    task, split = planted_task()
    assert history_behaviour(task, split, "d")[0] == 4.0
    from dataclasses import replace

    from perfit_probe.data.records import TaskData

    labelled = TaskData(replace(task.spec, kind="classification"), task.users)
    hist = history_behaviour(labelled, split, "c")  # 5 history queries rated "2", add-one smoothing
    np.testing.assert_allclose(hist, np.array([1, 6, 1, 1, 1]) / 10)


def test_evaluate_and_steer_stages_write_the_run_directory(tmp_path, monkeypatch):
    import perfit_probe.stages.fitted as fitted_module
    from perfit_probe.cli import main
    from perfit_probe.config import EvalConfig
    from perfit_probe.config import LoraBaselineConfig
    from perfit_probe.stages import evaluate as evaluate_stage
    from perfit_probe.stages import steer as steer_stage
    from perfit_probe.stages.rundir import RunDir

    loaded, task, split, perfit = planted_run()
    run = RunDir.create(tmp_path / "run", "fit", {}, 0, loaded.identity)
    perfit.save(run.sub("perfit"))
    split.save(run.path / "perfit" / "split.json")
    (run.path / "perfit" / "task.json").write_text(json.dumps({"task": "planted", "n_users": 6, "k": 2}))
    run.add_metrics("fit", {"stage1_train_s": 2.0, "stage2_train_s": 4.0})
    calls = []
    monkeypatch.setattr(fitted_module, "load_task", lambda name, **kw: calls.append((name, kw)) or task)
    config = EvalConfig(methods=("base", "perfit", "lora"), lora=LoraBaselineConfig(epochs=1))
    result = evaluate_stage.run(config, run.path, loaded).evaluation
    assert calls[0] == ("planted", {"n_users": 6})
    table = pd.read_csv(run.path / "eval" / "results.csv").set_index("method")
    assert table.loc["perfit", "train_s_per_user"] == pytest.approx(1.0)  # 4 s over 4 test users
    assert table.loc["perfit", "mae"] == pytest.approx(result.table.set_index("method").loc["perfit", "mae"])
    assert (run.path / "eval" / "predictions" / "lora.json").is_file()
    assert "perfit" in run.metrics()["evaluate"]
    steer = steer_stage.run(SteerConfig(alphas=(0.0, 1.0), experiments=("swap", "dose")), run.path, loaded).checks
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
