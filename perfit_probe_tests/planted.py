"""The planted-rating task (users who give every object one rating) and PerFits on a tiny model,
shared by the evaluation and steering tests."""

from __future__ import annotations

from functools import lru_cache

import torch

from perfit_probe.config import TrainConfig
from perfit_probe.data.prompts import build_examples
from perfit_probe.data.records import ProfileItem, Query, TaskData, TaskSpec, User
from perfit_probe.data.splits import Split, history_user
from perfit_probe.evaluation.evaluate import continuation
from perfit_probe.interventions import PerFit
from perfit_probe.interventions.batching import encode
from perfit_probe.interventions.modules import BankSpec, InterventionBank
from perfit_probe.interventions.train import train_collective, train_personal
from perfit_probe.sites import Site, parse_positions
from perfit_probe_tests.tiny import tiny_model

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
SPEC = TaskSpec(name="planted", kind="rating", labels=("1", "2", "3", "4", "5"),
                profile_fields=("features", "score"), item_template="{features}: {score}",
                history_header="History:", retrieval_fields=("features",),
                example_template="Predict the rating of {features}", example_output="score")
PLANTED = {"t1": "1", "t2": "5", "a": "1", "b": "5", "c": "2", "d": "4"}
"""Each planted user gives every object the same rating; t1, t2 train stage 1."""


def planted_task(n_queries: int = 8) -> tuple[TaskData, Split]:
    """Users whose rating never changes, and a split holding out 3 queries of each test user."""
    users = []
    for uid, rating in PLANTED.items():
        feats = [f"{WORDS[i]} {WORDS[(i * 5 + 3) % 12]}" for i in range(n_queries)]
        queries = [Query(id=f"{uid}q{i}", input=f"Predict the rating of {f}", output=rating, item_id=f"{uid}i{i}")
                   for i, f in enumerate(feats)]
        profile = [ProfileItem(id=f"{uid}i{i}", fields={"features": f, "score": rating}) for i, f in enumerate(feats)]
        users.append(User(uid, profile, queries))
    split = Split(("t1", "t2"), ("a", "b", "c", "d"),
                  {u: tuple(f"{u}q{i}" for i in range(n_queries - 3, n_queries)) for u in "abcd"}, 0)
    return TaskData(SPEC, users), split


@lru_cache(maxsize=1)
def planted_run():
    """A tiny llama with PerFit trained on the planted users (stage 1 on t1/t2, stage 2 on a-d)."""
    torch.manual_seed(0)
    loaded = tiny_model("llama")
    task, split = planted_task()
    tok = loaded.tokenizer

    def enc(examples):
        return [encode(tok, e.prompt, continuation(e.target, tok, None), eos=True) for e in examples]

    spec = BankSpec("loreft", (Site(2),), parse_positions("l1"), 4, loaded.d_model)
    collective = InterventionBank.initialised(spec, ["collective"], "zero", 0)
    config = TrainConfig(epochs=6, lr=0.2, batch_size=4, max_grad_norm=1.0)
    train_ex = build_examples([task.user(u) for u in split.train_users], SPEC, tok, variants=("plain",))
    train_collective(loaded, collective, enc(train_ex), config)
    personal = InterventionBank.copied_from(collective, list(split.test_users))
    history = {u: enc(build_examples([history_user(task.user(u), split)], SPEC, tok, variants=("plain",)))
               for u in split.test_users}
    train_personal(loaded, collective, personal, history, config)
    return loaded, task, split, PerFit(collective, personal, "sum", loaded.identity.to_dict())


def random_perfit(loaded, users, kind="loreft"):
    """Untrained PerFit with random non-zero edits at two sites (no training needed)."""
    spec = BankSpec(kind, (Site(1), Site(2, "resid_pre")), parse_positions("f1+l2"), 3, loaded.d_model)
    collective = InterventionBank.initialised(spec, ["collective"], "random", 1)
    personal = InterventionBank.initialised(spec, list(users), "random", 2)
    with torch.no_grad():
        for holder in personal.site_params:
            holder.b.mul_(40.0)  # big enough to change greedy outputs of a random model
    return PerFit(collective, personal, "sum", loaded.identity.to_dict())
