"""Prompt construction: the three variants every later stage uses identically.

For a user, a query and a task spec:

- ``plain``: the task input alone (``spec.instruction`` first when it is set; the built-in
  tasks carry their instruction inside the input, as LaMP does);
- ``enhanced``: a history block (``spec.history_header`` and the ``k`` retrieved profile items,
  one ``- item`` line each, rendered with ``spec.item_template``), a blank line, then the
  plain text;
- ``control``: the same layout with the history block replaced by neutral filler words drawn
  deterministically from a built-in list, with exactly as many tokens (under the given
  tokenizer, without special tokens) as the history block it replaces (the paper's
  random-text control: same length, no personal content);
- ``other_user``, ``format_random``, ``permuted``: the history template filled with another
  user's retrieved items, random items with random outputs, or the user's own items with
  their outputs permuted (format-matched controls, see ``perfit_probe.data.controls``).

The body is then wrapped in the tokenizer's chat template as one user turn with the
generation prompt (``chat=True``; ``chat=None`` means "when the tokenizer has a chat
template"), or, without a chat template, followed by ``"\\nAnswer:"``. The ``target`` of an
example is the gold output text; ``continuation`` says how it follows the prompt (with a
leading space when there is no chat template) for training and scoring alike.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from perfit_probe.data import controls as ctl
from perfit_probe.data.records import DEFAULT_VARIANTS, VARIANTS, Example, ProfileItem, Query, TaskSpec, User
from perfit_probe.data.retrieval import ProfileIndex
from perfit_probe.data.splits import stable_rank
from perfit_probe.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_FIELD_WORDS = 60
"""Profile field values longer than this many words are cut (LaMP reviews and abstracts)."""

ANSWER_SUFFIX = "\nAnswer:"
"""Appended to the prompt body when no chat template is used."""

NEUTRAL_WORDS = (
    "the", "of", "and", "a", "to", "in", "is", "was", "it", "for", "on", "with", "as", "at",
    "by", "from", "or", "an", "be", "this", "which", "are", "but", "not", "have", "had",
    "one", "all", "their", "there", "been", "when", "would", "will", "more", "no", "out",
    "so", "up", "into", "than", "them", "can", "only", "other", "new", "some", "could",
    "time", "these", "two", "may", "then", "first", "any", "like", "now", "over", "such",
    "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before",
    "must", "through", "back", "years", "where", "much", "way", "well", "down", "should",
    "because", "each", "just", "those", "people", "how", "too", "little", "state", "good",
    "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here",
    "between", "both", "life", "being", "under", "never", "day", "same", "another", "know",
    "while", "last", "might", "great", "old", "year", "off", "come", "since", "against",
    "go", "came", "right", "used", "take", "three", "house", "table", "window", "river",
    "stone", "paper", "road", "tree", "water", "field", "door", "chair", "wall", "garden",
    "cloud", "hill", "bridge", "box", "glass", "wood", "rain", "sand", "corner", "light",
)
"""Common English words with no bearing on any task, the control variant's vocabulary."""

_FILLERS = (".", ",", " a", " the", " and", "\n", ";", " of", " to", "a", "e")


@dataclass(frozen=True)
class AddedText:
    """What the enhanced and control variants add before the task input."""

    history: str
    """The history block (header and retrieved items); empty when nothing was retrieved."""
    control: str
    """Neutral text with exactly as many tokens as ``history`` (empty when it is)."""
    item_ids: tuple[str, ...]
    """Ids of the retrieved profile items, best first."""


def cut_words(value: str, max_words: int = MAX_FIELD_WORDS) -> str:
    """``value`` cut to its first ``max_words`` words (followed by `` ...``) when longer."""
    words = str(value).split()
    return value if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def render_item(spec: TaskSpec, item: ProfileItem, *, max_words: int = MAX_FIELD_WORDS) -> str:
    """One profile item as text, with ``spec.item_template`` (long fields cut)."""
    fields = {name: cut_words(value, max_words) for name, value in item.fields.items()}
    try:
        return spec.item_template.format(**fields)
    except KeyError as exc:
        raise DataError(f"task {spec.name}: profile item {item.id!r} lacks field {exc.args[0]!r} "
                        f"needed by the item template {spec.item_template!r}") from None


def history_text(spec: TaskSpec, items: Sequence[ProfileItem]) -> str:
    """The history block of the enhanced prompt; empty for no items."""
    if not items:
        return ""
    lines = [spec.history_header] if spec.history_header else []
    lines += [f"- {render_item(spec, item)}" for item in items]
    return "\n".join(lines)


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer.encode(text, add_special_tokens=False))


_WORD_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _word_costs(tokenizer) -> dict[str, int]:
    """Tokens each neutral word adds after a space (cached per tokenizer)."""
    try:
        return _WORD_COSTS[tokenizer]
    except (KeyError, TypeError):
        pass
    costs = {w: count_tokens(tokenizer, f"x {w}") - count_tokens(tokenizer, "x") for w in NEUTRAL_WORDS}
    try:
        _WORD_COSTS[tokenizer] = costs
    except TypeError:
        pass
    return costs


def control_text(history: str, tokenizer, *, seed: int | str = 0) -> str:
    """Neutral text with exactly ``count_tokens(history)`` tokens under ``tokenizer``.

    Words are drawn from ``NEUTRAL_WORDS`` with a generator seeded by ``seed`` and appended
    while the (estimated, then exact) count stays within the target; the last tokens are
    filled with short pieces (punctuation, one-letter words) that add one token at a time.
    """
    target = count_tokens(tokenizer, history) if history else 0
    if target == 0:
        return ""
    rng = random.Random(stable_rank("control", seed) if isinstance(seed, str) else seed)
    costs = _word_costs(tokenizer)
    words: list[str] = []
    estimate, misses = 0, 0
    for _ in range(8):  # a capitalised first word that fits
        first = rng.choice(NEUTRAL_WORDS).capitalize()
        if (n := count_tokens(tokenizer, first)) <= target:
            words, estimate = [first], n
            break
    while words and estimate < target and misses < 8:  # fast pass on per-word token costs
        word = rng.choice(NEUTRAL_WORDS)
        if estimate + costs[word] <= target:
            words.append(word)
            estimate += costs[word]
            misses = 0
        else:
            misses += 1
    count = count_tokens(tokenizer, " ".join(words)) if words else 0
    while count > target and len(words) > 1:  # estimate was off: drop words
        words.pop()
        count = count_tokens(tokenizer, " ".join(words))
    text, misses = " ".join(words), 0
    while count < target and misses < 8:  # exact pass
        word = rng.choice(NEUTRAL_WORDS)
        candidate = f"{text} {word}" if text else word.capitalize()
        n = count_tokens(tokenizer, candidate)
        if n <= target:
            text, count, misses = candidate, n, 0
        else:
            misses += 1
    while count < target:
        for filler in _FILLERS:
            n = count_tokens(tokenizer, text + filler)
            if count < n <= target:
                text, count = text + filler, n
                break
        else:
            break
    if count != target:
        raise DataError(f"could not build control text of {target} tokens with this tokenizer "
                        f"(got {count}); report this tokenizer")
    return text


def _body(spec: TaskSpec, query: Query, added: str = "") -> str:
    task = f"{spec.instruction}\n{query.input}" if spec.instruction else query.input
    return f"{added}\n\n{task}" if added else task


def use_chat(tokenizer, chat: bool | None) -> bool:
    """Whether prompts are wrapped in the chat template (``None``: when the tokenizer has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if chat is None:
        return has_template
    if chat and not has_template:
        raise ConfigError("chat=True but the tokenizer has no chat template; use chat=False")
    return chat


def finish_prompt(body: str, tokenizer, chat: bool | None = None) -> str:
    """Wrap a prompt body in the chat template (one user turn + generation prompt) or add
    ``ANSWER_SUFFIX``."""
    if use_chat(tokenizer, chat):
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + ANSWER_SUFFIX


def continuation(text: str, tokenizer, chat: bool | None) -> str:
    """A target or label as it follows its prompt: with a leading space unless chat-templated.

    The one rule every trainer (PerFit, the LoRA baselines) and scorer (constrained decoding)
    applies, so that the tokens trained on are the tokens scored. Plain prompts end with
    ``ANSWER_SUFFIX`` (``"Answer:"``), chat prompts with the assistant header.
    """
    return text if use_chat(tokenizer, chat) else " " + text.lstrip()


def added_texts(
    spec: TaskSpec,
    user: User,
    query: Query,
    tokenizer,
    *,
    k: int = 4,
    retriever: str = "bm25",
    seed: int = 0,
    index: ProfileIndex | None = None,
) -> AddedText:
    """The history block the enhanced variant adds and the control text that replaces it.

    ``tokenizer`` may be None when only the history is needed (``control`` is then empty).
    ``index`` reuses a ``ProfileIndex`` of this user across queries.
    """
    index = index if index is not None else ProfileIndex(user, spec.retrieval_fields)
    items = index.retrieve(query, k, retriever, seed)
    history = history_text(spec, items)
    control = control_text(history, tokenizer, seed=f"{seed}/{user.id}/{query.id}") \
        if tokenizer is not None else ""
    return AddedText(history, control, tuple(item.id for item in items))


def plain_prompt(spec: TaskSpec, query: Query, tokenizer=None, *, chat: bool | None = None) -> str:
    """The plain variant: the task input alone."""
    return finish_prompt(_body(spec, query), tokenizer, chat)


def enhanced_prompt(spec: TaskSpec, user: User, query: Query, tokenizer=None, *, k: int = 4,
                    retriever: str = "bm25", chat: bool | None = None, seed: int = 0) -> str:
    """The personalization-enhanced variant: ``k`` retrieved history items, then the input."""
    added = added_texts(spec, user, query, None, k=k, retriever=retriever, seed=seed)
    return finish_prompt(_body(spec, query, added.history), tokenizer, chat)


def control_prompt(spec: TaskSpec, user: User, query: Query, tokenizer, *, k: int = 4,
                   retriever: str = "bm25", chat: bool | None = None, seed: int = 0) -> str:
    """The random-text control: neutral text as long (in tokens) as the enhanced history."""
    added = added_texts(spec, user, query, tokenizer, k=k, retriever=retriever, seed=seed)
    return finish_prompt(_body(spec, query, added.control), tokenizer, chat)


def build_examples(
    users: Sequence[User],
    spec: TaskSpec,
    tokenizer,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    k: int = 4,
    retriever: str = "bm25",
    chat: bool | None = None,
    seed: int = 0,
) -> list[Example]:
    """One ``Example`` per user x query x variant, in that order (variants in the given order).

    Retrieval runs once per (user, query) and is shared by ``enhanced``, ``control`` and
    ``permuted``; every non-plain variant records the ids of the items its history block
    shows in ``Example.history_ids`` and the text it adds in ``Example.added_text``. The
    ``CONTROL_VARIANTS`` draw on all of ``users`` (donors for ``other_user``, the item pool of
    ``format_random``), so the same users give the same prompts.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown prompt variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    if "control" in variants and tokenizer is None:
        raise ConfigError("the control variant needs a tokenizer to match token lengths")
    builder = _ExampleBuilder(users, spec, tokenizer, variants, k=k, retriever=retriever, chat=chat, seed=seed)
    examples = [example for user in users for example in builder.user_examples(user)]
    builder.log_summary()
    return examples


class _ExampleBuilder:
    """What ``build_examples`` shares across users: the options, the donors of ``other_user``
    (and their profile indexes), the item pool of ``format_random``, and counts for its log."""

    def __init__(self, users: Sequence[User], spec: TaskSpec, tokenizer, variants: Sequence[str], *, k: int,
                 retriever: str, chat: bool | None, seed: int) -> None:
        self.spec, self.tokenizer, self.variants = spec, tokenizer, variants
        self.k, self.retriever, self.seed = k, retriever, seed
        self.needs_history = any(v != "plain" for v in variants)
        self.chat = use_chat(tokenizer, chat)
        self.donors = ctl.donor_assignment([u.id for u in users], seed) if "other_user" in variants else {}
        self.by_id = {u.id: u for u in users}
        self.donor_index: dict[str, ProfileIndex] = {}
        self.pool, self.outputs = ctl.output_pool(users, spec) if "format_random" in variants else ([], [])
        if "permuted" in variants:
            ctl.output_field(spec)
        self.n_unpermuted = self.n_queries = 0

    def user_examples(self, user: User) -> list[Example]:
        """The examples of one user: each query (retrieval once) in every variant."""
        index = ProfileIndex(user, self.spec.retrieval_fields) if self.needs_history else None
        if self.needs_history and not user.profile:
            log.warning("user %s has an empty profile: enhanced/control prompts equal plain ones", user.id)
        donor = self.donors.get(user.id)
        if donor is not None and donor not in self.donor_index:
            self.donor_index[donor] = ProfileIndex(self.by_id[donor], self.spec.retrieval_fields)
        examples = []
        for query in user.queries:
            self.n_queries += 1
            items = index.retrieve(query, self.k, self.retriever, self.seed) if self.needs_history else []
            history = history_text(self.spec, items)
            for variant in self.variants:
                added, shown = self._added(variant, user, query, items, history)
                examples.append(Example(user_id=user.id, query_id=query.id, variant=variant,
                                        prompt=finish_prompt(_body(self.spec, query, added), self.tokenizer, self.chat),
                                        target=query.output, history_ids=shown, added_text=added))
        return examples

    def _added(self, variant: str, user: User, query: Query, items: list[ProfileItem],
               history: str) -> tuple[str, tuple[str, ...]]:
        """The text ``variant`` adds before the query and the ids of the items it shows;
        ``items`` (rendered as ``history``) are the ones retrieved for the query."""
        if variant == "plain":
            return "", ()
        ids = tuple(item.id for item in items)
        if variant == "enhanced":
            return history, ids
        if variant == "control":
            return control_text(history, self.tokenizer, seed=f"{self.seed}/{user.id}/{query.id}"), ids
        picked = self._control_items(variant, user, query, items)
        return history_text(self.spec, picked), tuple(item.id for item in picked)

    def _control_items(self, variant: str, user: User, query: Query, items: list[ProfileItem]) -> list[ProfileItem]:
        """The items a format-matched control variant shows (see ``perfit_probe.data.controls``)."""
        if variant == "other_user":
            return self.donor_index[self.donors[user.id]].retrieve(query, self.k, self.retriever, self.seed)
        if variant == "format_random":
            return ctl.format_random_items(self.pool, self.outputs, items, self.spec, user, query, self.seed,
                                           length=lambda item: len(render_item(self.spec, item)))
        picked, changed = ctl.permute_outputs(items, self.spec, f"{user.id}/{query.id}", self.seed)
        self.n_unpermuted += not changed
        return picked

    def log_summary(self) -> None:
        """Log the donors of ``other_user`` and the queries ``permuted`` could not permute."""
        if "other_user" in self.variants:
            log.info("other_user variant: each user's history is retrieved from a donor's profile "
                     "(seed %d): %s", self.seed, ", ".join(f"{u}<-{d}" for u, d in list(self.donors.items())[:8])
                     + (" ..." if len(self.donors) > 8 else ""))
        if "permuted" in self.variants and self.n_unpermuted:
            log.warning("permuted variant: for %d of %d queries all retrieved items have the same %r "
                        "(or only one item was retrieved): nothing to permute, so their permuted "
                        "prompt equals the enhanced one", self.n_unpermuted, self.n_queries, self.spec.example_output)

