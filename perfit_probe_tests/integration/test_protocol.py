"""Issue 12: what is trained is what is scored; stage 2 starts at stage 1; explicit options win;
personal stages learn from the user's profile (OPPU's protocol). Oracles are hand-computed
token ids, hand-built users with known chronology, and a planted task whose answer is known."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from perfit_probe.cli import main
from perfit_probe.config import EvalConfig, FitConfig, PersonalData
from perfit_probe.data.profile_examples import item_query, training_examples, training_queries
from perfit_probe.data.records import ProfileItem, Query, TaskData, User
from perfit_probe.data.splits import make_split
from perfit_probe.data.tasks import task_spec
from perfit_probe.errors import ConfigError
from perfit_probe.interventions.apply import Intervention
from perfit_probe.interventions.fit import personal_start
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.sites import Site, parse_positions
from perfit_probe.stages import evaluate as evaluate_stage
from perfit_probe.stages import fit as fit_stage
from perfit_probe.stages.rundir import RunDir
from perfit_probe_tests.tiny import save_tiny_model, tiny_model

SMALL = dict(task="synthetic", n_users=6, max_queries=4, n_heldout=1, layers=(1, -1), positions="f1+l1",
             collective_rank=4, personal_rank=4, epochs1=1, epochs2=1, batch_size=4, lr1=1e-2, lr2=1e-2,
             max_prompt_tokens=96, max_profile_examples=4, model="tiny")


# ------------------------------------------------------------------ bug 1: one continuation rule
def test_run_fit_trains_on_exactly_the_tokens_evaluation_scores(monkeypatch, tmp_path):
    """The tiny tokenizer has no chat template: a label follows "Answer:" as " 4", whose ids
    differ from those of "4". Every target trained through the fit stage (both stages) must be the
    hand-tokenised " <gold>" + end-of-text."""
    import perfit_probe.interventions.fit as fit_module

    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    assert not getattr(tok, "chat_template", None)
    spaced = {label: tok(" " + label, add_special_tokens=False)["input_ids"] for label in "12345"}
    assert any(spaced[label] != tok(label, add_special_tokens=False)["input_ids"] for label in "12345")
    seen = []
    real1, real2 = fit_module.train_collective, fit_module.train_personal
    monkeypatch.setattr(fit_module, "train_collective",
                        lambda loaded, bank, examples, *a, **k: (seen.extend(examples), real1(loaded, bank, examples, *a, **k))[1])
    monkeypatch.setattr(fit_module, "train_personal",
                        lambda loaded, c, p, examples, *a, **k: (seen.extend(e for rows in examples.values() for e in rows),
                                                                 real2(loaded, c, p, examples, *a, **k))[1])
    fit_stage.run(FitConfig(**SMALL), tmp_path / "run", loaded)
    assert len(seen) > 10
    eos = tok.eos_token_id
    for enc in seen:
        target = list(enc.ids[enc.n_prompt:])
        assert target[-1] == eos
        assert target[:-1] in spaced.values(), (target, spaced)


def _lamp3_files(tmp_path, n_users=8, n_items=6):
    """LaMP-3 in the official questions format, one query per user, every score planted at 4."""
    words = ["good", "plot", "great", "fine", "film", "story", "nice", "bad", "slow", "fun"]
    questions, golds = [], []
    for u in range(n_users):
        profile = [{"id": f"{u}{i}", "text": f"{words[(u + i) % 10]} {words[(u * i) % 10]} review",
                    "score": "4", "date": f"2020-01-{i + 1:02d}"} for i in range(n_items)]
        questions.append({"id": f"q{u}", "profile": profile,
                          "input": "What is the score of the following review on a scale of 1 to 5? just "
                                   f"answer with 1, 2, 3, 4, or 5 without further explanation. review: {words[u]} one"})
        golds.append({"id": f"q{u}", "output": "4"})
    q, o = tmp_path / "questions.json", tmp_path / "outputs.json"
    q.write_text(json.dumps(questions))
    o.write_text(json.dumps({"task": "LaMP_3", "golds": golds}))
    return q, o


def test_planted_lamp_task_in_official_format_is_fitted_and_then_scored_right(tmp_path, capsys):
    """One query per user (the official LaMP format): every query of a test user is evaluation
    data and stage 2 trains on the profile. Every answer is planted at "4": after the fit,
    stage 1 and PerFit must predict 4 everywhere under constrained scoring (MAE 0)."""
    model = save_tiny_model(tmp_path / "tiny")
    q, o = _lamp3_files(tmp_path)
    out = tmp_path / "run"
    assert main(["fit", "--model", str(model), "--task", "LaMP-3", "--task-path", str(q), "--task-outputs", str(o),
                 "--users", "0", "--test-users", "4", "--layers", "2,3", "--positions", "l1", "--collective-rank", "4",
                 "--personal-rank", "2", "--epochs1", "40", "--epochs2", "2", "--lr1", "0.05", "--lr2", "0.05",
                 "--batch-size", "4", "--max-prompt-tokens", "64", "--no-progress", "--out", str(out)]) == 0
    split = json.loads((out / "perfit" / "split.json").read_text())
    assert all(len(v) == 1 for v in split["heldout"].values()) and len(split["test_users"]) == 4
    assert main(["evaluate", str(out), "--methods", "stage1,perfit", "--no-progress"]) == 0
    preds = pd.read_csv(out / "eval" / "predictions.csv", dtype=str)
    assert len(preds) == 8 and set(preds["output"]) == {"4"}, preds


# ------------------------------------------------------------------ bug 2: epoch 0 = stage 1
@pytest.mark.parametrize("stacking", ["sum", "compose"])
@pytest.mark.parametrize("init", ["zero", "random", "stage1"])
def test_stage2_before_training_is_exactly_stage1(init, stacking):
    loaded = tiny_model("llama")
    spec = BankSpec("loreft", (Site(1), Site(3)), parse_positions("f1+l2"), 4, 32)
    collective = InterventionBank.initialised(spec, ["collective"], "random", seed=3)  # a non-zero edit
    keys = ["a", "b", "c"]
    personal = personal_start(collective, spec, keys, init, seed=5)
    if init != "zero":  # the start is not a zero edit in itself: the anchor makes it one
        raw = personal._raw_edit(0, torch.randn(2, 3, 32), torch.tensor([0, 1]), initial=False)
        assert raw.abs().max() > 1e-3
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14], [0, 15, 16, 17, 18, 19]])
    mask = (ids != 0).long()
    outputs = []
    for iv in (Intervention(collective=collective), Intervention(collective=collective, personal=personal,
                                                                 stacking=stacking)):
        with torch.no_grad(), iv.attached(loaded.model):
            iv.set_batch(mask, torch.tensor([0, 1, 2]))
            outputs.append(loaded.model(input_ids=ids, attention_mask=mask).logits)
    with torch.no_grad():
        plain = loaded.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(outputs[0], plain)  # stage 1 does something
    assert torch.equal(outputs[0], outputs[1])


def test_anchored_bank_saves_and_loads_its_anchor(tmp_path):
    from perfit_probe.interventions.artifact import load_bank, save_bank

    spec = BankSpec("loreft", (Site(1),), parse_positions("l1"), 2, 32)
    bank = InterventionBank.initialised(spec, ["a", "b"], "random", seed=1).anchored()
    with torch.no_grad():
        bank.site_params[0].b.add_(1.0)
    save_bank(bank, tmp_path / "bank", {"name": "x"})
    back, _ = load_bank(tmp_path / "bank")
    h = torch.randn(2, 1, 32)
    slots = torch.tensor([0, 1])
    assert back.spec.anchored and torch.equal(back.edit(0, h, slots), bank.edit(0, h, slots))
    assert back.edit(0, h, slots).abs().max() > 0.1


# ------------------------------------------------------------------ bug 3: explicit options win
def test_explicit_evaluate_option_wins_over_the_fit_even_at_its_default():
    assert EvalConfig(k=4).with_fit({"k": 2}).k == 4
    assert EvalConfig().with_fit({"k": 2}).k == 2
    assert EvalConfig().with_fit({}).k == 4 and EvalConfig().with_fit({}).retriever == "bm25"
    with pytest.raises(ConfigError, match="k=0"):
        EvalConfig(k=0)


def test_cli_evaluate_k_equal_to_default_is_kept(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["fit", "--model", str(model), "--task", "synthetic", "--users", "6", "--max-queries", "3",
                 "--heldout", "1", "--layers", "1", "--epochs1", "1", "--epochs2", "1", "--k", "2",
                 "--max-profile-examples", "3", "--max-prompt-tokens", "96", "--no-progress", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--methods", "base", "--k", "4", "--no-progress"]) == 0
    stages = RunDir.open(out).info()["stages"]
    assert [s["config"]["k"] for s in stages if s["command"] == "evaluate"] == [4]
    assert main(["evaluate", str(out), "--methods", "base", "--no-progress"]) == 0
    stages = RunDir.open(out).info()["stages"]
    assert [s["config"]["k"] for s in stages if s["command"] == "evaluate"] == [4, 2]


def test_cache_records_the_dtype_under_the_name_commands_read(tmp_path):
    from perfit_probe.commands.common import recorded_model

    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["cache", "--model", str(model), "--dtype", "bfloat16", "--task", "synthetic", "--users", "3",
                 "--max-queries", "2", "--sites", "1", "--no-progress", "--out", str(out)]) == 0
    assert recorded_model(out)["dtype"] == "bfloat16"


# ------------------------------------------------------------------ protocol: profile examples
def _user() -> User:
    # profile order differs from time order: chronology is b (Jan 1), c (Jan 2), a (Jan 3), d (Jan 4)
    items = [ProfileItem("a", {"title": "Alien", "year": "1979", "genres": "Horror", "score": "5"}, "2020-01-03"),
             ProfileItem("b", {"title": "Brazil", "year": "1985", "genres": "Comedy", "score": "2"}, "2020-01-01"),
             ProfileItem("c", {"title": "Casablanca", "year": "1942", "genres": "Drama", "score": "4"}, "2020-01-02"),
             ProfileItem("d", {"title": "Alien Resurrection", "year": "1997", "genres": "Horror", "score": "1"},
                         "2020-01-04")]
    return User("u", items, [Query("q", "x", "3", item_id=None)])


def test_profile_examples_see_only_earlier_items_and_keep_the_latest():
    spec = task_spec("movielens")
    pairs = training_queries(_user(), spec, PersonalData(max_examples=3))
    assert [q.item_id for _, q in pairs] == ["c", "a", "d"]  # the 3 latest, oldest first
    assert [[i.id for i in h.profile] for h, _ in pairs] == [["b"], ["b", "c"], ["b", "c", "a"]]
    assert [q.output for _, q in pairs] == ["4", "5", "1"]
    assert pairs[2][1].input == ("Predict the rating (1-5) this user gives to the movie. Answer with a single "
                                 "digit.\nMovie: Alien Resurrection [Horror]")
    assert "score" not in pairs[2][1].fields
    examples = training_examples(_user(), spec, None, PersonalData(max_examples=None), variant="enhanced", k=2)
    last = examples[-1]  # "Alien Resurrection": BM25 finds "Alien" (earlier), never itself
    assert last.history_ids[0] == "a" and "d" not in last.history_ids
    assert "Alien [Horror]: 5" in last.prompt and "Resurrection [Horror]: 1" not in last.prompt
    first = examples[0]
    assert first.history_ids == () and "ratings of related movies" not in first.prompt


def test_queries_source_and_task_only_mode():
    spec = task_spec("movielens")
    assert [q.id for _, q in training_queries(_user(), spec, PersonalData(source="queries"))] == ["q"]
    assert training_queries(_user(), task_spec("LaMP-7"), PersonalData(mode="task_only")) == []
    tweet = ProfileItem("t", {"text": "sunny day at the beach"})
    query = item_query(task_spec("LaMP-7"), tweet)
    assert query.input == "Write a tweet:" and query.output == "sunny day at the beach"
    with pytest.raises(ConfigError):
        PersonalData(max_examples=0)


def test_test_users_are_the_users_with_most_history():
    spec = task_spec("movielens")
    items = lambda n: [ProfileItem(str(i), {"title": "t", "year": "1", "genres": "g", "score": "3"}) for i in range(n)]
    queries = lambda n: [Query(f"q{i}", "x", "3", item_id=None) for i in range(n)]
    users = [User("few_items_many_queries", items(2), queries(9)), User("many_items", items(9), queries(1)),
             User("mid", items(5), queries(3)), User("none", items(1), queries(2))]
    task = TaskData(spec, users)
    by_history = make_split(task, n_test_users=2)
    assert set(by_history.test_users) == {"many_items", "mid"}
    assert by_history.heldout["mid"] == ("q0", "q1", "q2")  # every query is evaluation data
    by_queries = make_split(task, n_test_users=1, n_heldout=2, test_users_by="queries")
    assert by_queries.test_users == ("few_items_many_queries",) and len(by_queries.heldout["few_items_many_queries"]) == 2
    with pytest.raises(ConfigError, match="n_heldout"):
        FitConfig(personal_data="queries").validate()


def test_lora_baselines_train_on_the_same_profile_examples_as_stage2(monkeypatch, tmp_path):
    """The per-user LoRA is trained on the test user's profile items (not its queries)."""
    from perfit_probe.evaluation import lora as lora_module

    loaded = tiny_model("llama")
    config = FitConfig(**{**SMALL, "n_heldout": None, "max_queries": 2})
    fit_stage.run(config, tmp_path / "run", loaded)
    trained = {}
    real = lora_module.LoraBaseline.fit_user

    def spy(self, user_id, prompts, targets, **kwargs):
        trained[user_id] = list(prompts)
        return real(self, user_id, prompts, targets, **kwargs)

    monkeypatch.setattr(lora_module.LoraBaseline, "fit_user", spy)
    evaluate_stage.run(EvalConfig(methods=("lora",), lora=lora_module.LoraBaselineConfig(epochs=1)), tmp_path / "run",
                       loaded)
    split = json.loads((tmp_path / "run" / "perfit" / "split.json").read_text())
    assert set(trained) == set(split["test_users"])
    from perfit_probe.data import load_task

    task = load_task("synthetic", n_users=6, max_queries=2)
    for uid, prompts in trained.items():
        user = task.user(uid)
        held = set(split["heldout"][uid])
        assert len(prompts) == 4  # max_profile_examples
        query_inputs = {q.input for q in user.queries if q.id in held}
        assert not any(any(text in p for text in query_inputs) for p in prompts)
