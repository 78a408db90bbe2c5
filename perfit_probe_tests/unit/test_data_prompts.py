"""Prompt variants: layout, control length equality, chat templates, build_examples."""

from __future__ import annotations

import re

import pytest

from perfit_probe.data import load_task
from perfit_probe.data.prompts import (
    ANSWER_SUFFIX,
    NEUTRAL_WORDS,
    added_texts,
    build_examples,
    control_prompt,
    control_text,
    count_tokens,
    enhanced_prompt,
    plain_prompt,
    render_item,
)
from perfit_probe.data.records import ProfileItem, Query, TaskSpec, User
from perfit_probe.data.retrieval import retrieve
from perfit_probe.data.tasks import TASKS
from perfit_probe.errors import ConfigError, DataError
from perfit_probe_tests.tiny import tiny_tokenizer

SPEC = TASKS["movielens-rating"]


@pytest.fixture(scope="module")
def movielens():
    return load_task("movielens", n_users=3, seed=0, max_queries=6)


def test_plain_and_enhanced_layout(movielens):
    tok = tiny_tokenizer()
    user = movielens.users[0]
    query = user.queries[0]
    assert plain_prompt(SPEC, query, tok) == query.input + ANSWER_SUFFIX
    items = retrieve(user, query, k=3, fields=SPEC.retrieval_fields)
    lines = [SPEC.history_header] + [f"- {render_item(SPEC, i)}" for i in items]
    expected = "\n".join(lines) + "\n\n" + query.input + ANSWER_SUFFIX
    assert enhanced_prompt(SPEC, user, query, tok, k=3) == expected
    assert all(i.id != query.item_id for i in items)
    item = items[0]
    assert render_item(SPEC, item) == f"{item.fields['title']} [{item.fields['genres']}]: {item.fields['score']}"


def test_control_has_history_token_length(movielens):
    tok = tiny_tokenizer()
    for user in movielens.users:
        for query in user.queries:
            for k in (1, 4, 8):
                added = added_texts(SPEC, user, query, tok, k=k, seed=3)
                assert count_tokens(tok, added.control) == count_tokens(tok, added.history) > 0
                words = set(re.findall(r"[a-z]+", added.control.lower()))
                assert words <= set(NEUTRAL_WORDS) | {"a", "e"}
                enhanced = enhanced_prompt(SPEC, user, query, tok, k=k, seed=3)
                control = control_prompt(SPEC, user, query, tok, k=k, seed=3)
                assert control == f"{added.control}\n\n{query.input}{ANSWER_SUFFIX}"
                assert count_tokens(tok, control) == count_tokens(tok, enhanced)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_control_text_exact_lengths(n):
    tok = tiny_tokenizer()
    # A history of exactly n tokens: n copies of a single-token piece.
    piece = tok.decode(tok.encode("a", add_special_tokens=False))
    history = piece * n
    target = count_tokens(tok, history)
    for seed in range(5):
        text = control_text(history, tok, seed=seed)
        assert count_tokens(tok, text) == target
    assert control_text("", tok) == ""
    assert control_text(history, tok, seed=1) == control_text(history, tok, seed=1)


def test_chat_option(movielens):
    tok = tiny_tokenizer()
    query = movielens.users[0].queries[0]
    assert plain_prompt(SPEC, query, tok, chat=None) == query.input + ANSWER_SUFFIX  # no template
    with pytest.raises(ConfigError, match="no chat template"):
        plain_prompt(SPEC, query, tok, chat=True)


class _TemplateTokenizer:
    """A tokenizer stand-in with a chat template, wrapping the tiny tokenizer."""

    chat_template = "fake"

    def __init__(self):
        self.inner = tiny_tokenizer()

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt and len(messages) == 1
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_template_wraps_body(movielens):
    tok = _TemplateTokenizer()
    query = movielens.users[0].queries[0]
    assert plain_prompt(SPEC, query, tok) == f"<user>{query.input}</user><assistant>"
    assert plain_prompt(SPEC, query, tok, chat=False) == query.input + ANSWER_SUFFIX
    examples = build_examples(movielens.users[:1], SPEC, tok, k=2)
    assert all(e.prompt.startswith("<user>") and e.prompt.endswith("<assistant>") for e in examples)


def test_build_examples(movielens):
    tok = tiny_tokenizer()
    users = movielens.users
    examples = build_examples(users, SPEC, tok, k=2)
    expected_keys = [(u.id, q.id, v) for u in users for q in u.queries for v in ("plain", "enhanced", "control")]
    assert [(e.user_id, e.query_id, e.variant) for e in examples] == expected_keys
    golds = {(u.id, q.id): q.output for u in users for q in u.queries}
    for e in examples:
        assert e.target == golds[(e.user_id, e.query_id)]
        assert (e.history_ids == ()) == (e.variant == "plain")
        query = movielens.user(e.user_id)
        query = next(q for q in query.queries if q.id == e.query_id)
        assert query.item_id not in e.history_ids
        if e.variant == "plain":
            assert e.prompt == plain_prompt(SPEC, query, tok)
        elif e.variant == "enhanced":
            assert e.prompt == enhanced_prompt(SPEC, movielens.user(e.user_id), query, tok, k=2)
        else:
            assert e.prompt == control_prompt(SPEC, movielens.user(e.user_id), query, tok, k=2)
    again = build_examples(users, SPEC, tok, k=2)
    assert again == examples
    only = build_examples(users, SPEC, None, variants=("enhanced", "plain"), chat=False)
    assert [e.variant for e in only[:2]] == ["enhanced", "plain"]
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_examples(users, SPEC, None, variants=("control",))
    with pytest.raises(ConfigError, match="unknown prompt variant"):
        build_examples(users, SPEC, tok, variants=("shuffled",))


def test_retriever_option_changes_history(movielens):
    tok = tiny_tokenizer()
    user = movielens.users[0]
    ids = {m: tuple(e.history_ids for e in build_examples([user], SPEC, tok, variants=("enhanced",),
                                                          k=3, retriever=m))
           for m in ("bm25", "recent", "random")}
    assert len(set(ids.values())) == 3


def test_empty_profile_user_and_missing_field():
    spec = TaskSpec("t", "rating", ("1", "2"), ("text",), item_template="{text}: {score}",
                    history_header="History:")
    tok = tiny_tokenizer()
    lonely = User("u", [], [Query("q", "rate it", "1")])
    examples = build_examples([lonely], spec, tok)
    assert examples[0].prompt == examples[1].prompt == examples[2].prompt
    broken = User("v", [ProfileItem("a", {"text": "x"}), ProfileItem("b", {"text": "y"})],
                  [Query("q", "x", "1")])
    with pytest.raises(DataError, match="profile item 'a' lacks field 'score'"):
        build_examples([broken], spec, tok)


def test_lamp_and_synthetic_prompts():
    from pathlib import Path

    tok = tiny_tokenizer()
    fixtures = Path(__file__).parents[1] / "fixtures" / "lamp"
    for task in ("LaMP-1", "LaMP-2M", "LaMP-2N", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"):
        data = load_task(task, path=fixtures / f"{task}_questions.json")
        for e in build_examples(data.users, data.spec, tok, k=2):
            assert e.prompt.endswith(ANSWER_SUFFIX)
    synth = load_task("synthetic", n_users=3)
    examples = build_examples(synth.users, synth.spec, tok, k=3)
    assert len(examples) == 3 * sum(len(u.queries) for u in synth.users)
