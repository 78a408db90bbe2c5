"""Format-matched control prompts: same template and length as the real prompt, right content."""

from __future__ import annotations

import json
import logging

import pytest

from perfit_probe.data import load_task
from perfit_probe.data.controls import (
    HISTORY_COLUMNS, donor_assignment, history_frame, permute_outputs, read_history_ids,
)
from perfit_probe.data.prompts import ANSWER_SUFFIX, build_examples, count_tokens
from perfit_probe.data.records import CONTROL_VARIANTS, VARIANTS, ProfileItem, Query, TaskSpec, User
from perfit_probe.errors import ConfigError
from perfit_probe_tests.tiny import tiny_tokenizer

ALL = ("plain", "enhanced", "control") + CONTROL_VARIANTS


@pytest.fixture(scope="module")
def movielens():
    return load_task("movielens", n_users=8, seed=0, max_queries=5)


def _layout(prompt: str) -> tuple[str, int, str]:
    """(header line, number of "- " item lines, text after the history block)."""
    block, _, task = prompt.partition("\n\n")
    lines = block.split("\n")
    return lines[0], sum(line.startswith("- ") for line in lines), task


def _hand_users() -> tuple[TaskSpec, list[User]]:
    spec = TaskSpec("hand", "rating", ("1", "2", "3", "4", "5"), ("title", "score"),
                    item_template="{title}: {score}", history_header="Ratings of this user:",
                    retrieval_fields=("title",), example_output="score")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    users = []
    for u in range(4):
        profile = [ProfileItem(f"u{u}i{j}", {"title": f"{words[(u + j) % 12]} {words[(u * 3 + j) % 12]}",
                                             "score": str(1 + (u + j) % 5)}) for j in range(8)]
        queries = [Query(f"u{u}q{j}", f"Rate the movie {words[(u + 2 * j) % 12]} from 1 to 5.", "3")
                   for j in range(3)]
        users.append(User(f"u{u}", profile, queries))
    return spec, users


@pytest.mark.parametrize("source", ["movielens", "hand"])
def test_every_control_has_the_real_template_and_length(movielens, source):
    tok = tiny_tokenizer()
    spec, users = (movielens.spec, movielens.users) if source == "movielens" else _hand_users()
    examples = build_examples(users, spec, tok, variants=ALL, k=4)
    by_key = {(e.user_id, e.query_id, e.variant): e for e in examples}
    assert len(by_key) == len(examples) == len(ALL) * sum(len(u.queries) for u in users)
    for user in users:
        for query in user.queries:
            real = by_key[(user.id, query.id, "enhanced")]
            header, n_items, task = _layout(real.prompt)
            assert header == spec.history_header and n_items == 4
            assert task == query.input + ANSWER_SUFFIX
            for variant in CONTROL_VARIANTS:
                control = by_key[(user.id, query.id, variant)]
                assert _layout(control.prompt) == (header, n_items, task), variant
                assert len(control.history_ids) == n_items
                ratio = count_tokens(tok, control.prompt) / count_tokens(tok, real.prompt)
                assert 0.7 <= ratio <= 1.3, (variant, ratio)
                assert control.added_text and control.prompt.startswith(control.added_text)


def test_control_contents(movielens):
    tok = tiny_tokenizer()
    users = movielens.users
    examples = build_examples(users, movielens.spec, tok, variants=ALL, k=4, seed=3)
    by_key = {(e.user_id, e.query_id, e.variant): e for e in examples}
    donors = donor_assignment([u.id for u in users], 3)
    assert sorted(donors.values()) == sorted(donors) and all(u != d for u, d in donors.items())
    assert donor_assignment([u.id for u in users], 3) == donors
    profiles = {u.id: {i.id: i for i in u.profile} for u in users}
    all_ids = set().union(*profiles.values())
    for user in users:
        for query in user.queries:
            real = by_key[(user.id, query.id, "enhanced")]
            other = by_key[(user.id, query.id, "other_user")]
            assert set(other.history_ids) <= set(profiles[donors[user.id]])
            assert query.item_id not in other.history_ids
            rand = by_key[(user.id, query.id, "format_random")]
            assert set(rand.history_ids) <= all_ids and query.item_id not in rand.history_ids
            assert len(set(rand.history_ids)) == len(rand.history_ids)
            perm = by_key[(user.id, query.id, "permuted")]
            assert perm.history_ids == real.history_ids
            scores = [profiles[user.id][i].fields["score"] for i in real.history_ids]
            shown = [line.rsplit(": ", 1)[1] for line in perm.added_text.split("\n")[1:]]
            assert sorted(shown) == sorted(scores)
            if len(set(scores)) > 1:
                assert shown != scores and perm.prompt != real.prompt
            else:
                assert perm.prompt == real.prompt
    assert build_examples(users, movielens.spec, tok, variants=ALL, k=4, seed=3) == examples


def test_permuted_logs_when_all_outputs_are_equal(caplog):
    spec, users = _hand_users()
    same = [User("a", [ProfileItem(f"i{j}", {"title": f"t{j}", "score": "4"}) for j in range(3)],
                 [Query("q", "rate t1", "4")]), users[1]]
    with caplog.at_level(logging.WARNING, logger="perfit_probe.data.prompts"):
        examples = build_examples(same, spec, None, variants=("enhanced", "permuted"), chat=False)
    assert "all retrieved items have the same 'score'" in caplog.text
    assert examples[0].prompt == examples[1].prompt
    items = [ProfileItem("x", {"score": "1"}), ProfileItem("y", {"score": "1"}), ProfileItem("z", {"score": "5"})]
    permuted, changed = permute_outputs(items, spec, "k")
    assert changed and [i.fields["score"] for i in permuted] != ["1", "1", "5"]
    assert sorted(i.fields["score"] for i in permuted) == ["1", "1", "5"]


def test_errors_and_history_frame():
    spec, users = _hand_users()
    with pytest.raises(ConfigError, match="at least two users"):
        build_examples(users[:1], spec, None, variants=("other_user",), chat=False)
    no_output = TaskSpec("t", "generation", None, ("title",), item_template="{title}", history_header="H:")
    with pytest.raises(ConfigError, match="output field"):
        build_examples(users, no_output, None, variants=("permuted",), chat=False)
    assert set(CONTROL_VARIANTS) <= set(VARIANTS)
    examples = build_examples(users, spec, None, variants=("plain", "enhanced", "other_user"), chat=False)
    frame = history_frame(examples)
    assert list(frame.columns) == list(HISTORY_COLUMNS)
    assert len(frame) == 2 * sum(len(u.queries) for u in users)  # plain rows are left out
    first = next(e for e in examples if e.variant == "enhanced")
    assert read_history_ids(frame)[0] == list(first.history_ids)
    assert json.loads(frame["history_ids"].iloc[0]) == list(first.history_ids)
    assert frame["added_text"].iloc[0] == first.added_text


def test_derangement_is_uniform_over_derangements():
    """Oracle: the 9 derangements of 4 elements (hand-counted: !4 = 9) are equally likely."""
    from collections import Counter

    import numpy as np

    from perfit_probe.data.controls import derangement

    rng = np.random.default_rng(0)
    counts = Counter(tuple(int(i) for i in derangement(4, rng)) for _ in range(9000))
    assert len(counts) == 9 and all(not any(p[i] == i for i in range(4)) for p in counts)
    assert max(counts.values()) < 1150 and min(counts.values()) > 850  # 1000 +- 4.7 sd
