"""Typed records of the user-centred data model, shared by every later stage.

A ``TaskData`` is a task description (``TaskSpec``) plus ``User`` records; a user has a
profile (history items) and queries (input, gold output). Prompt construction turns
(user, query, variant) into an ``Example``, the unit that caching, training and evaluation
consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, get_args

from perfit_probe.config import BaseVariant, ControlVariant, Variant
from perfit_probe.errors import DataError

DEFAULT_VARIANTS = get_args(BaseVariant)
"""Variants cached by default (``config.BaseVariant``)."""

CONTROL_VARIANTS = get_args(ControlVariant)
"""Opt-in controls for the shift claims (``config.ControlVariant``; ``perfit_probe.data.controls``)."""

VARIANTS = get_args(Variant)
"""Every prompt variant ``build_examples`` can make."""


@dataclass(frozen=True)
class ProfileItem:
    """One item of a user's history (a rated movie, a past review, a written title, ...)."""

    id: str
    """Item id, unique within the user's profile."""
    fields: Mapping[str, str]
    """Task-specific fields, e.g. ``{"title": ..., "score": "4"}``; all values are strings."""
    date: str | None = None
    """Date of the item when known (for the ``recent`` retriever)."""


@dataclass(frozen=True)
class Query:
    """One task instance of a user: an input and (when known) the gold output."""

    id: str
    """Query id (the LaMP question id)."""
    input: str
    """The task input text, as LaMP gives it."""
    output: str | None = None
    """Gold output (a label, a rating as text, a title, ...)."""
    item_id: str | None = None
    """Id of the profile item this query is about, never retrieved into its own prompt."""
    fields: Mapping[str, str] = field(default_factory=dict)
    """Structured fields of the query item (e.g. title, genres), used by retrievers."""


@dataclass
class User:
    """A user: history (profile) and queries."""

    id: str
    """User id."""
    profile: list[ProfileItem]
    """History items."""
    queries: list[Query]
    """Task instances of this user."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, labels, profile fields and prompt templates."""

    name: str
    """Task name, e.g. ``LaMP-3`` or ``movielens-rating``."""
    kind: str
    """``classification``, ``rating`` or ``generation``."""
    labels: tuple[str, ...] | None
    """Label set for classification and rating tasks (ratings ``("1",...,"5")``)."""
    profile_fields: tuple[str, ...]
    """Fields of a profile item that are rendered into prompts."""
    instruction: str = ""
    """Short task instruction put before the input."""
    item_template: str = ""
    """``str.format`` template rendering one profile item from its fields."""
    history_header: str = ""
    """Line introducing the retrieved history block in the enhanced prompt."""
    retrieval_fields: tuple[str, ...] = ()
    """Profile fields the BM25 retriever matches the query against (empty: all fields)."""
    example_template: str = ""
    """``str.format`` template turning a profile item into a task input (OPPU's conversion of
    history into training examples; see ``perfit_probe.data.profile_examples``)."""
    example_output: str | None = None
    """Profile field that is the output of that example (the item's score, tag, title, ...)."""
    example_is_task: bool = True
    """False where the task's items have no input -> output form of the task itself (LaMP-1,
    LaMP-7): the example is then the documented stand-in (title of an abstract, a tweet's
    text), closer to language modelling on the user's items than to the task."""


@dataclass
class TaskData:
    """A loaded task: spec, users and a report of what was skipped while loading."""

    spec: TaskSpec
    """The task description."""
    users: list[User]
    """Users with a non-empty profile and at least one query."""
    report: dict = field(default_factory=dict)
    """Loading report: counts of users, queries, skipped users and why."""
    ground_truth: dict | None = None
    """Planted structure of synthetic data (rank, collective direction, user factors)."""

    def user(self, user_id: str) -> User:
        """The user with this id; ``DataError`` when there is none."""
        for user in self.users:
            if user.id == user_id:
                return user
        raise DataError(f"unknown user {user_id!r} in task {self.spec.name}")


@dataclass(frozen=True)
class Example:
    """One prompt ready for a model: what caching, training and evaluation consume."""

    user_id: str
    """Owner of the query."""
    query_id: str
    """Query id."""
    variant: str
    """One of ``VARIANTS``."""
    prompt: str
    """Full prompt text (chat template applied when requested)."""
    target: str | None = None
    """Gold output text (without end-of-text token)."""
    history_ids: tuple[str, ...] = ()
    """Ids of the profile items retrieved into the prompt (``enhanced``; also ``control``,
    whose random text replaces exactly these items; for the ``CONTROL_VARIANTS``, the items
    their history block shows: the donor's, the random ones, the user's own)."""
    added_text: str = ""
    """The text the variant puts before the task input (history block, control text; empty
    for ``plain``): what text baselines of the analysis read."""
