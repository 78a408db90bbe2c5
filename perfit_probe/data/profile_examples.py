"""A user's history (profile) turned into task examples: what personal stages train on.

OPPU (the paper's baseline and code base) trains each user's adapter on that user's *profile
items, each turned into an example of the task*, and only evaluates on the queries; PerFit's
stage 2 ("each user's own history") follows the same protocol. For profile item ``i``:

- input: ``spec.example_template.format(**item.fields)`` (long field values cut to
  ``MAX_FIELD_WORDS`` words, as in history blocks), a query ``profile/{item id}`` whose
  ``item_id`` is the item's own id;
- output: ``item.fields[spec.example_output]`` (LaMP-3: the review's score; LaMP-2M: the
  movie's tag; LaMP-2N: the article's category; LaMP-4: the headline; LaMP-5: the title;
  MovieLens: the star rating);
- prompt: the same builder as the queries' (``plain``, ``enhanced``, ``control``), where
  retrieval sees only the user's items *earlier* than ``i`` (by ``date`` when every item has
  one, else by profile position), never ``i`` itself nor a later item.

LaMP-1 and LaMP-7 items have no input -> output form of their task (``spec.example_is_task``
is False): LaMP-1 items become "title of this abstract" examples (the user's title style),
LaMP-7 items a fixed "Write a tweet:" prompt followed by the tweet (language modelling on the
user's tweets). ``mode="task_only"`` skips such tasks instead (no personal examples).

``PersonalData`` holds these choices (and ``source="queries"``, the earlier protocol of training
on the user's non-held-out queries); ``training_examples`` builds a user's examples.
``max_examples`` keeps each user's most recent items (the latest dates, else the last in the
profile), which bounds the cost of stage 2 and of the per-user LoRA on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

from perfit_probe.config import PersonalData, PersonalSource, ProfileExampleMode
from perfit_probe.data.prompts import build_examples, cut_words
from perfit_probe.data.records import Example, ProfileItem, Query, TaskSpec, User
from perfit_probe.data.records import TaskData
from perfit_probe.data.retrieval import date_key
from perfit_probe.data.splits import Split, history_user
from perfit_probe.errors import ConfigError, DataError

PROFILE_EXAMPLE_MODES = get_args(ProfileExampleMode)
"""``all``: every task has profile examples (the stand-ins of LaMP-1/7 included);
``task_only``: tasks whose items have no task form get none."""

PERSONAL_SOURCES = get_args(PersonalSource)
"""Where a personal stage's training examples come from (see ``PersonalData.source``)."""

QUERY_PREFIX = "profile/"
"""Query ids of profile examples are ``profile/{item id}``."""


def chronological(profile: Sequence[ProfileItem]) -> list[ProfileItem]:
    """The items oldest first: by ``date`` when every item has one, else in profile order."""
    items = list(profile)
    if items and all(item.date for item in items):
        return [item for _, item in sorted(enumerate(items), key=lambda p: (date_key(p[1].date), p[0]))]
    return items


def has_profile_examples(spec: TaskSpec, mode: str = "all") -> bool:
    """Whether ``spec``'s profile items become training examples under ``mode``."""
    if mode not in PROFILE_EXAMPLE_MODES:
        raise ConfigError(f"unknown profile example mode {mode!r}: choose from {PROFILE_EXAMPLE_MODES}")
    if not spec.example_template or spec.example_output is None:
        return False
    return spec.example_is_task or mode == "all"


def item_query(spec: TaskSpec, item: ProfileItem) -> Query:
    """Profile item -> a query of the task with the item's output as gold (see the module doc)."""
    fields = {name: cut_words(value) for name, value in item.fields.items()}
    try:
        text = spec.example_template.format(**fields)
        output = item.fields[spec.example_output]
    except KeyError as exc:
        raise DataError(f"task {spec.name}: profile item {item.id!r} lacks field {exc.args[0]!r} "
                        "needed to turn it into a training example") from None
    if not str(output).strip():
        raise DataError(f"task {spec.name}: profile item {item.id!r} has an empty {spec.example_output!r}")
    query_fields = {k: v for k, v in item.fields.items() if k != spec.example_output}
    return Query(id=f"{QUERY_PREFIX}{item.id}", input=text, output=str(output), item_id=item.id,
                 fields=query_fields)


def training_queries(user: User, spec: TaskSpec, data: PersonalData = PersonalData()) -> list[tuple[User, Query]]:
    """A user's personal training queries, each with the history its prompt may retrieve from.

    ``user`` must already exclude held-out queries and their items (``splits.history_user``).
    ``profile``: one query per profile item (the ``max_examples`` latest, oldest first), with the
    items earlier than it as history; ``queries``: the user's queries with the whole profile.
    """
    if data.source == "queries":
        return [(user, query) for query in user.queries]
    if not has_profile_examples(spec, data.mode):
        return []
    items = chronological(user.profile)
    start = 0 if data.max_examples is None else max(0, len(items) - data.max_examples)
    return [(User(id=user.id, profile=items[:i], queries=[]), item_query(spec, items[i]))
            for i in range(start, len(items))]


def training_examples(
    user: User,
    spec: TaskSpec,
    tokenizer,
    data: PersonalData = PersonalData(),
    *,
    variant: str = "plain",
    k: int = 4,
    retriever: str = "bm25",
    chat: bool | None = None,
    seed: int = 0,
) -> list[Example]:
    """``training_queries`` as prompts of ``variant`` built like the queries' prompts."""
    if data.source == "queries":
        return build_examples([user], spec, tokenizer, variants=(variant,), k=k, retriever=retriever,
                              chat=chat, seed=seed)
    out: list[Example] = []
    for history, query in training_queries(user, spec, data):
        shown = User(id=user.id, profile=history.profile, queries=[query])
        out += build_examples([shown], spec, tokenizer, variants=(variant,), k=k, retriever=retriever,
                              chat=chat, seed=seed)
    return out


def personal_examples(tokenizer, task: TaskData, split: Split, user_ids: Sequence[str], data: PersonalData, *,
                      variant: str = "plain", k: int = 4, retriever: str = "bm25", chat: bool | None = None,
                      seed: int = 0) -> dict[str, list[Example]]:
    """Each listed test user's personal training examples (held-out queries and items excluded).

    The one definition of the personal stages' data: PerFit's stage 2 and the per-user LoRAs.
    """
    return {uid: training_examples(history_user(task.user(uid), split), task.spec, tokenizer, data,
                                   variant=variant, k=k, retriever=retriever, chat=chat, seed=seed)
            for uid in user_ids}
