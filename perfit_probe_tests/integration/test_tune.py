"""Issue 14, fair tuning on validation only: ``perfit-probe tune``.

Oracles: a tripwire on the test users' evaluation queries (and their profile items) that
records any read of their content, checked to fire on the evaluation's own reading; the rows
PerFit's fit and the evaluation's LoRAs validate on; equal trial counts; byte-identical
outputs for the same seed; the tuned TOML read back by the pipeline's own config reader.
"""

from __future__ import annotations

import json
import tomllib

import pandas as pd
import pytest

from perfit_probe.cli import main
from perfit_probe.data import load_task
from perfit_probe.data.profile_examples import personal_examples
from perfit_probe.data.records import ProfileItem, Query
from perfit_probe.data.splits import Split, make_split
from perfit_probe.config import EvalConfig, FitConfig, LoraBaselineConfig, LoraSpace, PerFitSpace, TuneConfig
from perfit_probe.config import pipeline_config
from perfit_probe.evaluation.evaluate import heldout_examples
from perfit_probe.evaluation.lora import LoraBaseline
from perfit_probe.evaluation.tune import run_search
from perfit_probe.interventions import fit as fit_module
from perfit_probe.interventions.fit import validation_indices
from perfit_probe.stages import fit as fit_stage
from perfit_probe.stages import tune as tune_stage
from perfit_probe_tests.tiny import save_tiny_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = dict(task="synthetic", n_users=6, max_queries=4, n_heldout=2, seed=3)
FIT = FitConfig(**DATA, layers=(1,), positions="l1", collective_rank=2, personal_rank=2, epochs1=1, epochs2=1,
                batch_size=4, max_prompt_tokens=96, max_profile_examples=5, val_per_user=2, model="tiny")
FAST_LORA = LoraBaselineConfig(batch_size=4, epochs=1)
SPACE = TuneConfig(n_trials=2, perfit=PerFitSpace(lrs=(1e-2, 5e-2), epochs=(1,), collective_ranks=(2, 4),
                                                  personal_ranks=(2,), positions=("l1",)),
                   lora=LoraSpace(lrs=(1e-3, 1e-2), epochs=(1,), ranks=(2,)),
                   evaluate=EvalConfig(lora=FAST_LORA, lora_task=FAST_LORA))
CLI = ["--task", "synthetic", "--users", "6", "--max-queries", "4", "--heldout", "2", "--layers", "1",
       "--collective-rank", "2", "--personal-rank", "2", "--batch-size", "4", "--max-prompt-tokens", "96",
       "--max-profile-examples", "5", "--val-per-user", "2", "--seed", "3", "--trials", "2", "--perfit.epochs", "1",
       "--perfit.collective-ranks", "2,4", "--perfit.personal-ranks", "2", "--perfit.positions", "l1",
       "--lora.epochs", "1", "--lora.ranks", "2", "--no-progress"]
"""A search of a few seconds on the tiny model: 3 train users, 3 test users, 2 trials per stage."""


def armed_task(touched: list):
    """The synthetic task of ``DATA`` whose test users' held-out queries, and the profile items
    they are about, record every read of their content (input, output, fields) in ``touched``."""

    class Query_(Query):
        def __getattribute__(self, name):
            if name in ("input", "output", "fields"):
                touched.append(("query", object.__getattribute__(self, "id"), name))
            return object.__getattribute__(self, name)

    class Item_(ProfileItem):
        def __getattribute__(self, name):
            if name in ("fields", "date"):
                touched.append(("item", object.__getattribute__(self, "id"), name))
            return object.__getattribute__(self, name)

    task = load_task("synthetic", n_users=DATA["n_users"], max_queries=DATA["max_queries"], seed=DATA["seed"])
    split = make_split(task, n_heldout=DATA["n_heldout"], seed=DATA["seed"])
    for user in task.users:
        held = set(split.heldout.get(user.id, ()))
        items = {q.item_id for q in user.queries if q.id in held}
        user.queries = [Query_(q.id, q.input, q.output, q.item_id, q.fields) if q.id in held else q
                        for q in user.queries]
        user.profile = [Item_(i.id, i.fields, i.date) if i.id in items else i for i in user.profile]
    assert sum(map(len, split.heldout.values())) == 6 and not touched
    return task, split


def test_search_reads_no_evaluation_query_and_validates_where_fit_and_evaluate_do(monkeypatch, tmp_path):
    loaded = tiny_model("llama")
    touched = []
    task, split = armed_task(touched)
    seen = {"collective": [], "personal": [], "lora": {}}
    real_collective, real_personal, real_fit_user = (fit_module.train_collective, fit_module.train_personal,
                                                     LoraBaseline.fit_user)

    def spy_collective(loaded, bank, examples, *args, **kwargs):
        seen["collective"].append(len(examples))
        return real_collective(loaded, bank, examples, *args, **kwargs)

    def spy_personal(loaded, collective, personal, examples, *args, **kwargs):
        seen["personal"].append(({u: list(r) for u, r in examples.items()},
                                 {u: list(r) for u, r in kwargs["validation"].items() if r}))
        return real_personal(loaded, collective, personal, examples, *args, **kwargs)

    def spy_fit_user(self, user_id, prompts, targets, *, val_prompts=(), **kwargs):
        seen["lora"].setdefault(user_id, []).append((list(prompts), list(val_prompts)))
        return real_fit_user(self, user_id, prompts, targets, val_prompts=val_prompts, **kwargs)

    monkeypatch.setattr(fit_module, "train_collective", spy_collective)
    monkeypatch.setattr(fit_module, "train_personal", spy_personal)
    monkeypatch.setattr(LoraBaseline, "fit_user", spy_fit_user)
    result = run_search(loaded, task, split, FIT, SPACE)
    assert touched == []  # no evaluation query, nor its item, was read

    # equal budgets: every method and stage ran n_trials trials, each kept one
    frame = result.frame()
    assert frame.groupby(["method", "stage"]).size().to_dict() == {
        ("lora", "stage1"): 2, ("lora", "stage2"): 2, ("perfit", "stage1"): 2, ("perfit", "stage2"): 2}
    assert frame.groupby(["method", "stage"]).chosen.sum().eq(1).all()
    # stage 1: trained on the train users' queries minus the held-out ones, scored on those
    n_train_queries = sum(len(task.user(u).queries) for u in split.train_users)
    assert set(result.stage1_validation) <= set(split.train_users)
    n_held = sum(map(len, result.stage1_validation.values()))
    assert n_held == 6 and seen["collective"] == [n_train_queries - n_held] * 2
    assert (frame[frame.stage == "stage1"].n_val == n_held).all()
    assert len(seen["lora"]["task"]) == 2 and all(len(p) == n_train_queries - n_held and not v
                                                  for p, v in seen["lora"]["task"])

    # stage 2: PerFit's trials validate on the very rows the fit validates on, the per-user LoRAs on the
    # same examples
    fit_seen = {}
    monkeypatch.setattr(fit_module, "train_personal", lambda l, c, p, examples, *a, **k: fit_seen.update(
        train={u: list(r) for u, r in examples.items()}, val={u: list(r) for u, r in k["validation"].items() if r})
        or real_personal(l, c, p, examples, *a, **k))
    fit_stage.run(result.fit, tmp_path / "run", loaded)
    assert len(seen["personal"]) == 2
    for train, val in seen["personal"]:
        assert train == fit_seen["train"] and val == fit_seen["val"]
    expected = personal_examples(loaded.tokenizer, task, split, split.test_users, FIT.personal(), k=4,
                                 retriever="bm25", chat=None, seed=3)  # what evaluate's per-user LoRAs use
    for uid, examples in expected.items():
        held = set(validation_indices(uid, len(examples), FIT.val_per_user, FIT.seed))
        want = ([e.prompt for i, e in enumerate(examples) if i not in held],
                [e.prompt for i, e in enumerate(examples) if i in held])
        assert seen["lora"][uid] == [want, want] and len(want[1]) == len(fit_seen["val"][uid]) == 2
    assert all(len(ids) == 2 for ids in result.stage2_validation.values())
    assert not set(result.stage2_validation) - set(split.test_users)

    # the tripwire fires on what the evaluation reads, and on a profile not cut at the held-out items
    heldout_examples(task, split, loaded.tokenizer, variants=("plain",), k=4, retriever="bm25", chat=None, seed=3)
    assert {kind for kind, _, _ in touched} == {"query"}
    personal_examples(loaded.tokenizer, task, Split(split.train_users, split.test_users, {}, 3), split.test_users,
                      FIT.personal(), seed=3)
    assert {kind for kind, _, _ in touched} == {"query", "item"}


def test_tune_command_is_deterministic_and_its_toml_is_a_pipeline_config(monkeypatch, tmp_path, capsys):
    """Two runs with the same seed write the same trials and choices (one also applies them);
    no evaluation query is read by the command either."""
    model = save_tiny_model(tmp_path / "tiny")
    touched = []
    monkeypatch.setattr(tune_stage, "load_task", lambda *a, **k: armed_task(touched)[0])
    assert main(["tune", "--model", str(model), *CLI, "--out", str(tmp_path / "a")]) == 0
    assert touched == []
    assert main(["tune", "--model", str(model), *CLI, "--apply", "--out", str(tmp_path / "b")]) == 0
    assert touched == []  # (--apply's fit and evaluation load the task anew, unarmed)
    tune_a, tune_b = tmp_path / "a" / "tune", tmp_path / "b" / "tune"
    for name in ("trials.csv", "chosen.json", "tuned.toml", "validation.json"):
        assert (tune_a / name).read_bytes() == (tune_b / name).read_bytes(), name
    trials = pd.read_csv(tune_a / "trials.csv")
    assert len(trials) == 8 and trials.groupby(["method", "stage"]).size().eq(2).all()
    chosen = json.loads((tune_a / "chosen.json").read_text())
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())["tune"]
    assert set(metrics["stage_wall_s"]) == {"perfit/stage1", "perfit/stage2", "lora/stage1", "lora/stage2"}
    assert set(chosen["trials_per_method_stage"].values()) == {2}
    kept = trials[trials.chosen]
    stage1 = kept[(kept.method == "perfit") & (kept.stage == "stage1")].iloc[0]
    assert chosen["chosen"]["perfit"]["stage1"]["settings"]["lr1"] == stage1.lr

    tuned = tomllib.loads((tune_a / "tuned.toml").read_text())
    resolved = pipeline_config({"task": {"name": "synthetic", "n_users": 6, "seed": 3}, **tuned})
    assert resolved.fit.lr1 == stage1.lr and resolved.fit.collective_rank == stage1["rank"]
    assert resolved.fit.layers == tuple(int(x) for x in str(stage1.layers).split(","))
    assert resolved.evaluate.lora.lr == chosen["chosen"]["lora"]["stage2"]["settings"]["lr"]
    assert resolved.evaluate.lora_task.rank == chosen["chosen"]["lora"]["stage1"]["settings"]["rank"]

    # --apply fitted and evaluated run b with the tuned settings
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert [s["command"] for s in info["stages"]][-2:] == ["fit", "evaluate"]
    fitted = info["stages"][-2]["config"]
    assert fitted["lr1"] == stage1.lr and fitted["positions"] == stage1.positions
    assert info["stages"][-1]["config"]["lora"]["lr"] == resolved.evaluate.lora.lr
    assert (tmp_path / "b" / "eval" / "results.csv").is_file()
    assert not (tmp_path / "a" / "perfit").exists()
    # a second search into the same run needs --force
    assert main(["tune", "--model", str(model), *CLI, "--out", str(tmp_path / "a")]) == 2
    assert "--force" in capsys.readouterr().err


def _with(args: list[str], **values: str) -> list[str]:
    out = list(args)
    for flag, value in values.items():
        flag = "--" + flag.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


@pytest.mark.parametrize("change, fragment", [
    ({"trials": "0"}, "n_trials=0 must be >= 1"),
    ({"perfit.lrs": ""}, "perfit.lrs is empty"),
    ({"lora.ranks": ","}, "lora.ranks is empty"),
    ({"perfit.layer_sets": ""}, "layer_sets is empty"),
    ({"perfit.layer_sets": "1+x"}, "write each as layers joined by '+'"),
    ({"perfit.collective_ranks": "2,64"}, "rank 64 of the search space is larger than the model's d_model=32"),
    ({"lora.ranks": "33"}, "larger than the model's d_model=32"),
    ({"perfit.layer_sets": "1,7"}, "layer 7 of the search space is outside the model's 4 layers"),
    ({"trials": "3", "perfit.lrs": "1e-3"}, "fewer than n_trials=3"),
    ({"searches": "perfit,bogus"}, "'bogus' not among perfit,lora"),
    ({"val_per_user": "0"}, "set val_per_user >= 1"),
    ({"perfit.positions": "x3"}, "bad position spec 'x3'"),
])
def test_bad_search_options_are_one_line_errors(change, fragment, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    assert main(["tune", "--model", str(model), *_with(CLI, **change), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and fragment in err, err
    assert not (tmp_path / "out" / "tune").exists()
