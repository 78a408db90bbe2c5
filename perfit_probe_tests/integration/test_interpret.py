"""Interpretation stage (issue 15): delta steering, subspace alignment, logit lens, run API.

Oracles: the next-token distribution of another prompt (steering at the last layer with the
exact hidden-state difference), ``scipy.linalg.subspace_angles``, a hand-applied
``lm_head(norm(h))``, planted synthetic structure, and the prompts and predictions that
``evaluate`` produced for the same run.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.linalg import subspace_angles

from perfit_probe.analysis.lens import final_readout, label_first_tokens, label_shift, lens_shift, logit_lens, top_tokens
from perfit_probe.analysis.subspaces import angle_test, centred_pcs, energy_share, principal_angles
from perfit_probe.analysis.synthetic import planted_deltas
from perfit_probe.backends.hooks import HookBackend
from perfit_probe.cli import main
from perfit_probe.config import InterpretConfig
from perfit_probe.evaluation.interpret import interpret, kl_divergence, steering_vectors, user_bootstrap
from perfit_probe.interventions.steering import (AdditiveSteering, label_ids_of, steer_last_token,
                                                 steered_label_logprobs)
from perfit_probe.sites import parse_site
from perfit_probe.stages.fitted import load_fitted_run, prompt_settings
from perfit_probe_tests.tiny import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [" 1", " 2", " 3", " 4", " 5"]


def _last_state(loaded, ids: list[int], site: str) -> torch.Tensor:
    found = HookBackend(loaded, early_stop=False).run(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                                      [site])
    return found[parse_site(site)][0, -1]


def _equal_length_prompts(tok) -> tuple[list[int], list[int]]:
    a = tok("The user rated the movie Star Wars five stars")["input_ids"]
    b = tok("History of the user: Toy Story rated 4; Fargo rated")["input_ids"]
    n = min(len(a), len(b))
    return a[:n], b[:n]


# ---------------------------------------------------------------------- steering
def test_steering_with_the_exact_difference_at_the_last_layer_gives_the_other_prompts_distribution(tiny):
    tok, model = tiny.tokenizer, tiny.model
    a, b = _equal_length_prompts(tok)
    site = f"blocks.{tiny.n_layers - 1}.hook_resid_post"
    diff = _last_state(tiny, b, site) - _last_state(tiny, a, site)
    steering = AdditiveSteering(diff.view(1, 1, -1), [parse_site(site)])
    ids = torch.tensor([a])
    with torch.no_grad(), steering.attached(model):
        steering.set_batch(torch.ones_like(ids), torch.tensor([0]), 1.0)
        steered = model(input_ids=ids).logits[0, -1]
    with torch.no_grad():
        target = model(input_ids=torch.tensor([b])).logits[0, -1]
        plain = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(steered, target, atol=1e-5, rtol=0)
    assert (plain - target).abs().max() > 1e-3  # the two prompts do differ
    # hooks are gone after the context: the model is untouched
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[0, -1], plain, atol=0, rtol=0)
    # the batched scorer and the cached last-token path agree with the oracle
    text_a, text_b = tok.decode(a), tok.decode(b)
    assert tok(text_a)["input_ids"] == a and tok(text_b)["input_ids"] == b
    want = target.log_softmax(-1)[[i[0] for i in label_ids_of(tok, LABELS)]]
    full = steered_label_logprobs(tiny, [text_a, text_a], LABELS, steering=steering, slots=[0, 0], scales=[1.0, 0.0])
    torch.testing.assert_close(full[0], want, atol=1e-5, rtol=0)
    plain_lp, cached, found = steer_last_token(tiny, text_a, label_ids_of(tok, LABELS), steering, [0, 0], [1.0, 0.5],
                                               capture=[site])
    torch.testing.assert_close(cached[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_lp, full[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(found[site][-1], _last_state(tiny, a, site), atol=1e-6, rtol=0)


def test_cached_last_token_path_matches_full_passes_at_a_middle_site(tiny):
    tok = tiny.tokenizer
    prompts = ["The user rated the movie Fargo", "Predict the rating from 1 to 5 of this user"]
    site = "blocks.1.hook_resid_post"
    gen = torch.Generator().manual_seed(0)
    steering = AdditiveSteering(torch.randn(3, 1, 32, generator=gen), [parse_site(site)])
    for prompt in prompts:
        _, cached, _ = steer_last_token(tiny, prompt, label_ids_of(tok, LABELS), steering, [0, 1, 2], [0.5, 1.0, 2.0])
        full = steered_label_logprobs(tiny, [prompt] * 3, LABELS, steering=steering, slots=[0, 1, 2],
                                      scales=[0.5, 1.0, 2.0])
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_kl_and_bootstrap_by_hand():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    want = float((p * (p / q).log()).sum())
    assert float(kl_divergence(p.log() + 3.0, q.log() - 1.0)) == pytest.approx(want, abs=1e-6)
    assert float(kl_divergence(p.log(), p.log())) == pytest.approx(0.0, abs=1e-7)
    mean, lo, hi = user_bootstrap(np.array([1.0, 2.0, 3.0, 4.0]), 2000, np.random.default_rng(0))
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert user_bootstrap(np.array([2.0, 2.0]), 10, np.random.default_rng(0)) == (2.0, 2.0, 2.0)


def test_steering_vectors_follow_their_definitions():
    deltas, _ = planted_deltas(n_users=10, n_sites=1, d_model=16, rank=2, seed=1)
    at_site = deltas.enhanced[:, 0].double().numpy()
    users = deltas.user_ids[:6]
    vec = steering_vectors(at_site, users, deltas.user_ids, 2, ("full", "personal", "pca", "other_user", "random"), 0)
    np.testing.assert_allclose(vec["full"], at_site[:6])
    np.testing.assert_allclose(vec["personal"], at_site[:6] - at_site.mean(0), atol=1e-12)
    pcs = centred_pcs(at_site, 2)
    proj = pcs.components.T @ pcs.components
    np.testing.assert_allclose(vec["pca"] @ proj, vec["pca"], atol=1e-10)  # inside the subspace
    np.testing.assert_allclose(vec["pca"], at_site[:6] @ proj, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vec["random"], axis=1), np.linalg.norm(at_site[:6], axis=1))
    donors = [int(np.argmin(np.abs(at_site[:6] - row).sum(1))) for row in vec["other_user"]]
    assert sorted(donors) == list(range(6)) and all(d != i for i, d in enumerate(donors))


# ---------------------------------------------------------------------- subspaces
def test_principal_angles_against_scipy_and_extremes():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 12))
    np.testing.assert_allclose(principal_angles(a, a), 0.0, atol=1e-5)
    np.testing.assert_allclose(principal_angles(a, 2 * a[[2, 0, 1]] + a[[1, 2, 0]]), 0.0, atol=1e-5)
    eye = np.eye(12)
    np.testing.assert_allclose(principal_angles(eye[:3], eye[3:7]), 90.0, atol=1e-10)
    b = rng.standard_normal((5, 12))
    want = np.sort(np.degrees(subspace_angles(a.T, b.T)))
    np.testing.assert_allclose(principal_angles(a, b), want, atol=1e-8)
    # the null: random subspaces overlap max(k, r) / d on average; an identical one is at the top
    test = angle_test(a, a, n_draws=300, rng=rng)
    assert test.overlap == pytest.approx(1.0) and test.percentile == 100.0
    assert test.null_overlap.mean() == pytest.approx(3 / 12, abs=0.03)
    far = angle_test(eye[:3], eye[3:7], n_draws=100, rng=rng)
    assert far.overlap == pytest.approx(0.0, abs=1e-12) and far.percentile == 0.0
    assert energy_share(eye[:2] + 0 * eye[5], eye[:3]) == pytest.approx(1.0)
    assert energy_share(eye[[0, 5]], eye[:3]) == pytest.approx(0.5)


def test_planted_deltas_directions_are_recovered():
    deltas, truth = planted_deltas(n_users=40, n_sites=2, d_model=48, rank=3, noise=0.05, seed=3)
    for site in range(2):
        pcs = centred_pcs(deltas.enhanced[:, site].double().numpy(), 3)
        cos = pcs.mean @ truth.collective_direction[site] / np.linalg.norm(pcs.mean)
        assert cos > 0.99
        assert principal_angles(pcs.components, truth.personal_basis[site]).max() < 5.0
        assert pcs.explained.sum() > 0.95


# ---------------------------------------------------------------------- logit lens
def test_logit_lens_is_lm_head_of_the_final_norm(tiny):
    norm, head = final_readout(tiny.model)
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        manual = head(norm(h))
    torch.testing.assert_close(logit_lens(tiny.model, h), manual, atol=0, rtol=0)
    # at the last layer it is the model's own next-token logits
    ids = tiny.tokenizer("The user rated the movie")["input_ids"]
    last = _last_state(tiny, ids, f"blocks.{tiny.n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1]
    # GPT-2's last block output is pre-ln_f, Llama's pre-norm too: the lens reproduces the logits
    torch.testing.assert_close(logit_lens(tiny.model, last), logits, atol=1e-4, rtol=1e-4)


def test_lens_reads_a_planted_token_direction(tiny):
    tok = tiny.tokenizer
    _, head = final_readout(tiny.model)
    five = label_first_tokens(tok, LABELS)[-1]
    direction = head.weight[five].detach().float()
    direction = 40 * direction / direction.norm()
    base = torch.randn(32) * 0.1
    shift = lens_shift(tiny.model, base, direction.view(1, -1))[0]
    up, down = top_tokens(shift, tok, 3)
    assert up[0][0] == tok.decode([five])
    labels, p0, p1 = label_shift(tiny.model, base, torch.stack([direction, -direction]), label_first_tokens(tok, LABELS))
    assert labels[0].argmax() == 4 and labels[1].argmin() == 4
    assert p1[0, 4] > p0[4] > p1[1, 4]
    np.testing.assert_allclose(p0.sum(), 1.0, atol=1e-6)


# ---------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """A tiny demo run (8 users, synthetic ratings) and ``perfit-probe interpret`` on it."""
    root = tmp_path_factory.mktemp("interpret")
    model = save_tiny_model(root / "model", "llama")
    out = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["demo", "--model", str(model), "--task", "synthetic", "--users", "8", "--out", str(out),
                         "--no-progress"]) == 0
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(["interpret", str(out), "--n-null", "50", "--n-boot", "200"])
    finally:
        torch.set_num_threads(threads)
    return model, out, status, printed.getvalue()


def test_interpret_command_writes_tables_figures_and_report(interpreted):
    _, out, status, printed = interpreted
    assert status == 0 and "report.md" in printed
    directory = out / "interpret"
    kl = pd.read_csv(directory / "kl.csv")
    assert list(kl.columns) == ["site", "method", "alpha", "mean", "lo", "hi", "n_users"]
    assert set(kl.alpha) == {0.0, 0.5, 1.0, 2.0}
    assert set(kl.method) == {"full", "personal", "pca", "other_user", "random"}
    assert ((kl.lo <= kl["mean"] + 1e-12) & (kl["mean"] <= kl.hi + 1e-12)).all()
    # alpha 0 is the unsteered plain prompt, the same for every method
    assert kl[kl.alpha == 0].groupby("site")["mean"].nunique().eq(1).all()
    fit_sites = json.loads((out / "perfit" / "stage1" / "intervention.json").read_text())["sites"]
    assert set(kl.site) == set(fit_sites)
    alignment = pd.read_csv(directory / "alignment.csv", dtype={"user_id": str})
    assert set(alignment.bank) == {"stage1", "stage2"}
    assert alignment.percentile.between(0, 100).all() and alignment.min_angle_deg.between(0, 90).all()
    energy = pd.read_csv(directory / "energy.csv")
    edited = energy[energy.edit_energy > 0]
    assert len(edited) and edited.share.between(0, 1).all()
    assert energy[energy.edit_energy == 0].share.isna().all()  # no personal edit (stage 1 kept)
    for name in ("lens_tokens", "lens_labels", "monitoring", "stats", "angles", "kl_users"):
        assert (directory / f"{name}.csv").stat().st_size > 10, name
    stats = pd.read_csv(directory / "stats.csv")
    assert {"pearson_r", "pearson_p", "spearman_rho", "spearman_p"} <= set(stats.columns)
    report = (directory / "report.md").read_text()
    assert "## Training-free steering" in report and "## Do the learned interventions" in report
    for fig in ("interpret_kl", "interpret_angles", "interpret_monitor"):
        assert (out / "figures" / f"{fig}.png").is_file()
    assert "interpret" in json.loads((out / "metrics.json").read_text())


def test_uncached_sites_are_named_and_skipped(interpreted):
    from perfit_probe.deltas import Deltas
    from perfit_probe.models import load_model

    model, out, _, _ = interpreted
    loaded = load_model(str(model))
    fitted = load_fitted_run(out, loaded)
    result = interpret(loaded, fitted.task, fitted.split, fitted.perfit, Deltas.load(out / "deltas"),
                       InterpretConfig(sites=("blocks.2.hook_mlp_out",)), prompt_settings(out))
    assert any("not among the cached sites" in note for note in result.notes)
    assert result.kl.empty and result.alignment.empty and result.settings["sites"] == []


def test_run_api_builds_the_evaluated_prompts_and_predictions(interpreted):
    from perfit_probe.evaluation.evaluate import heldout_examples
    from perfit_probe.interpret import PerFitRun

    _, out, _, _ = interpreted
    run = PerFitRun.open(out)  # the model recorded in run.json
    s = run.settings
    assert s.max_prompt_tokens == 256 and s.k == 4  # what evaluate recorded
    examples = heldout_examples(run.task, run.fitted.split, run.loaded.tokenizer, variants=("plain", "enhanced"),
                                k=s.k, retriever=s.retriever, chat=s.chat, seed=s.seed)
    by_key = {(e.user_id, e.query_id, e.variant): e.prompt for e in examples}
    preds = pd.read_csv(out / "eval" / "predictions.csv", dtype=str)
    user = run.users[0]
    for query in run.queries(user)[:3]:
        assert run.prompt(user, query) == by_key[(user, query, "plain")]
        assert run.prompt(user, query, "enhanced") == by_key[(user, query, "enhanced")]
        got = run.predict(user, query)
        for method in ("base", "stage1", "perfit", "rag"):
            want = preds[(preds.method == method) & (preds.user_id == user) & (preds.query_id == query)].output
            assert got.predictions[method] == want.item(), method
        assert list(got.distributions.index) == ["base", "stage1", "perfit", "rag", "steer_delta"]
        np.testing.assert_allclose(got.distributions.sum(axis=1), 1.0, atol=1e-5)
    # alpha 0 steering is the base model; raw text works too
    zero = run.predict(user, run.queries(user)[0], alpha=0.0, conditions=("base", "steer_delta"))
    np.testing.assert_allclose(zero.distributions.loc["steer_delta"], zero.distributions.loc["base"], atol=1e-5)
    raw = run.predict(user, "Predict the rating from 1 to 5 of Fargo (1996).", conditions=("base", "perfit"))
    assert raw.predictions["perfit"] in run.task.spec.labels and "Fargo" in raw.prompt
