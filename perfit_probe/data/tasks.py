"""The task registry: one ``TaskSpec`` per supported task, and task-name resolution.

LaMP label sets are those of the official LaMP evaluation code (``get_all_labels``) and of the
OPPU code, which splits LaMP-2 into movie tagging (2M, the current LaMP-2) and news
categorization (2N, the LaMP-2 of the first LaMP release). LaMP inputs already contain their
instruction ("Which tag does this movie relate to among the following tags? ..."), so the
LaMP specs have no separate ``instruction``. The item templates follow the history phrases of
the OPPU prompts (e.g. ``{score} is the score for "{text}"``); they are ours, not official.
"""

from __future__ import annotations

import re

from perfit_probe.data.records import TaskSpec
from perfit_probe.errors import DataError

LAMP_2M_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
"""The 15 movie tags of LaMP-2 (movie tagging), as in the official evaluation code."""

LAMP_2N_CATEGORIES = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts",
    "sports", "science & technology", "travel", "business", "crime", "education",
    "healthy living", "parents", "food & drink",
)
"""The 15 news categories of LaMP-2N (news categorization), as in the OPPU evaluation code."""

RATINGS = ("1", "2", "3", "4", "5")

MOVIELENS_INSTRUCTION = "Predict the rating (1-5) this user gives to the movie. Answer with a single digit."
"""Instruction that starts every MovieLens query input."""
MOVIELENS_INPUT = MOVIELENS_INSTRUCTION + "\nMovie: {title} [{genres}]"
"""A MovieLens query input (and a profile item as a training example) from the movie's fields."""
SYNTHETIC_INPUT = "Predict the score (1-5) this user gives to the object. Answer with a single digit.\nObject: {features}"
"""A synthetic query input (and a profile item as a training example) from the object's features."""

TASKS: dict[str, TaskSpec] = {
    "LaMP-1": TaskSpec(
        name="LaMP-1", kind="classification", labels=("[1]", "[2]"),
        profile_fields=("title", "abstract"), item_template='"{title}"',
        history_header="Titles of papers this user wrote:", retrieval_fields=("title", "abstract"),
        example_template="Generate a title for the following abstract of a paper: {abstract}",
        example_output="title", example_is_task=False,
    ),
    "LaMP-2M": TaskSpec(
        name="LaMP-2M", kind="classification", labels=LAMP_2M_TAGS,
        profile_fields=("description", "tag"),
        item_template='the tag for the movie: "{description}" is "{tag}"',
        history_header="This user's tags of related movies:", retrieval_fields=("description",),
        example_template=("Which tag does this movie relate to among the following tags? Just answer with the tag "
                          "name without further explanation. tags: [" + ", ".join(LAMP_2M_TAGS) + "] description: {description}"),
        example_output="tag",
    ),
    "LaMP-2N": TaskSpec(
        name="LaMP-2N", kind="classification", labels=LAMP_2N_CATEGORIES,
        profile_fields=("title", "text", "category"),
        item_template='the category for the article: "{text}" is "{category}"',
        history_header="This user's categories of related articles:",
        retrieval_fields=("title", "text"),
        example_template=("Which category does this article relate to among the following categories? Just answer "
                          "with the category name without further explanation. categories: ["
                          + ", ".join(LAMP_2N_CATEGORIES) + "] article: {text}"),
        example_output="category",
    ),
    "LaMP-3": TaskSpec(
        name="LaMP-3", kind="rating", labels=RATINGS, profile_fields=("text", "score"),
        item_template='{score} is the score for "{text}"',
        history_header="This user's ratings of related reviews:", retrieval_fields=("text",),
        example_template=("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, "
                          "4, or 5 without further explanation. review: {text}"),
        example_output="score",
    ),
    "LaMP-4": TaskSpec(
        name="LaMP-4", kind="generation", labels=None, profile_fields=("title", "text"),
        item_template='"{title}" is the title for "{text}"',
        history_header="Headlines this user wrote for related articles:",
        retrieval_fields=("title", "text"),
        example_template="Generate a headline for the following article: {text}", example_output="title",
    ),
    "LaMP-5": TaskSpec(
        name="LaMP-5", kind="generation", labels=None, profile_fields=("title", "abstract"),
        item_template='"{title}" is the title for "{abstract}"',
        history_header="Titles this user wrote for related abstracts:",
        retrieval_fields=("title", "abstract"),
        example_template="Generate a title for the following abstract of a paper: {abstract}",
        example_output="title",
    ),
    "LaMP-7": TaskSpec(
        name="LaMP-7", kind="generation", labels=None, profile_fields=("text",),
        item_template='"{text}"', history_header="Tweets this user wrote:",
        retrieval_fields=("text",),
        example_template="Write a tweet:", example_output="text", example_is_task=False,
    ),
    "movielens-rating": TaskSpec(
        name="movielens-rating", kind="rating", labels=RATINGS,
        profile_fields=("title", "year", "genres", "score"),
        item_template="{title} [{genres}]: {score}",
        history_header="This user's ratings of related movies:",
        retrieval_fields=("title", "genres"),
        example_template=MOVIELENS_INPUT, example_output="score",
    ),
    "synthetic": TaskSpec(
        name="synthetic", kind="rating", labels=RATINGS, profile_fields=("features", "score"),
        item_template="{features}: {score}", history_header="This user's scores of related objects:",
        retrieval_fields=("features",),
        example_template=SYNTHETIC_INPUT, example_output="score",
    ),
}
"""Every known task spec, by canonical name."""

TASK_NAMES = ("movielens", "synthetic", "LaMP-1", "LaMP-2M", "LaMP-2N", "LaMP-3", "LaMP-4",
              "LaMP-5", "LaMP-7")
"""Names ``load_task`` accepts (case-insensitive; ``LaMP_3`` and ``lamp3`` work too)."""

LAMP_TASKS = ("LaMP-1", "LaMP-2M", "LaMP-2N", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")


def canonical_task_name(name: str) -> str:
    """The canonical name of a task: ``lamp_3`` -> ``LaMP-3``, ``MovieLens`` -> ``movielens``.

    ``DataError`` for an unknown name (including the ambiguous ``LaMP-2``).
    """
    key = re.sub(r"[\s_\-]", "", name).lower()
    if key in ("movielens", "movielensrating", "movielens100k"):
        return "movielens"
    if key == "synthetic":
        return "synthetic"
    for task in LAMP_TASKS:
        if key == task.replace("-", "").lower():
            return task
    if key == "lamp2":
        raise DataError("task 'LaMP-2' is ambiguous: use 'LaMP-2M' (movie tagging) or "
                        "'LaMP-2N' (news categorization)")
    raise DataError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}")


def task_spec(name: str) -> TaskSpec:
    """The ``TaskSpec`` of a task given by any accepted name."""
    canonical = canonical_task_name(name)
    return TASKS["movielens-rating" if canonical == "movielens" else canonical]
