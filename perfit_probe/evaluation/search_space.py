"""What ``perfit-probe tune`` may choose, and the seeded sampler that draws its trials.

The paper chose PerFit's ranks and layers by random search. Here a search draws, for each
stage of each searched method, ``n_trials`` *distinct* settings from the product of the
declared choices: every combination is listed, shuffled by a generator seeded with
``(seed, method/stage)``, and the first ``n_trials`` are the trials. The same seed draws the
same trials; a space with fewer combinations than ``n_trials`` is refused (``ConfigError``),
so every searched method gets exactly the same budget.

What is searched (``perfit_probe.evaluation.tune`` runs the trials):

- PerFit stage 1 (collective): learning rate, epochs, collective rank, layer set, positions;
- PerFit stage 2 (personal, on the chosen stage 1): learning rate, epochs, personal rank
  (with ``personal_init = "stage1"`` the personal rank is the chosen collective rank);
- the LoRA baselines, OPPU's task LoRA (the analogue of stage 1) and its per-user LoRA on the
  chosen task LoRA (of stage 2): learning rate, epochs, rank (``alpha`` keeps the base
  config's ``alpha / rank``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from perfit_probe.data.splits import stable_rank
from perfit_probe.errors import ConfigError
from perfit_probe.sites import parse_positions

SEARCHES = ("perfit", "lora")
"""Methods a search can tune: ``perfit`` (stages 1 and 2) and ``lora`` (OPPU's task LoRA, then
its per-user LoRA, whose settings the ``lora`` and ``oppu`` methods of the evaluation share)."""

SELECT_BY = ("metric", "loss")
"""What picks a stage's trial: the task's headline metric (ties: the lower validation loss) or
the validation loss (ties: the better metric)."""

DEPTH_FRACTIONS = ((0.27, 0.47), (0.17, 0.37), (0.47, 0.67))
"""Layer sets searched by default, as fractions of the model's depth (besides the base layers);
the first is the demo's (layers 8 and 14 of SmolLM2's 30)."""


@dataclass(frozen=True)
class PerFitSpace:
    """Choices of PerFit's search."""

    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
    """Learning rates (``lr1`` in stage 1, ``lr2`` in stage 2)."""
    epochs: tuple[int, ...] = (1, 2, 3)
    """Epochs (``epochs1``, ``epochs2``)."""
    collective_ranks: tuple[int, ...] = (4, 8, 16)
    """Ranks of the stage-1 intervention."""
    personal_ranks: tuple[int, ...] = (2, 4, 8)
    """Ranks of each user's stage-2 intervention."""
    layer_sets: tuple[tuple[int, ...], ...] | None = None
    """Sets of edited layers (negative counts from the end); None: the base config's layers
    and the ``DEPTH_FRACTIONS`` of the model's depth."""
    positions: tuple[str, ...] = ("l1", "l2", "f1+l2")
    """Position specs (LoReFT grammar)."""


@dataclass(frozen=True)
class LoraSpace:
    """Choices of the LoRA baselines' search (task LoRA and per-user LoRA alike)."""

    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    """Learning rates."""
    epochs: tuple[int, ...] = (1, 2, 3)
    """Epochs."""
    ranks: tuple[int, ...] = (4, 8, 16)
    """LoRA ranks (``alpha`` scales with the rank)."""


@dataclass(frozen=True)
class TuneConfig:
    """Settings of ``perfit-probe tune`` besides the base fit and evaluation configs."""

    n_trials: int = 8
    """Trials per stage of each searched method (the same budget for all)."""
    searches: tuple[str, ...] = SEARCHES
    """Methods searched, a subset of ``SEARCHES``."""
    perfit: PerFitSpace = field(default_factory=PerFitSpace)
    """PerFit's choices."""
    lora: LoraSpace = field(default_factory=LoraSpace)
    """The LoRA baselines' choices."""
    stage1_val_queries: int = 2
    """Queries held out of each train user (a seeded choice, at most all but one) to score the
    stage-1 trials (PerFit's stage 1, OPPU's task LoRA); stage 2 is scored on each test user's
    ``val_per_user`` validation rows of the fit config."""
    select_by: str = "metric"
    """``metric`` or ``loss`` (see ``SELECT_BY``)."""
    seed: int = 0
    """Seed of the sampler (training and the carve-out use the fit's seed)."""

    def validate(self) -> None:
        """Checks that need no model: budget, methods, and every choice list non-empty and valid."""
        if isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ConfigError(f"n_trials={self.n_trials!r} must be an integer >= 1")
        bad = [s for s in self.searches if s not in SEARCHES]
        if bad or not self.searches:
            raise ConfigError(f"unknown search(es) {bad}: choose from {', '.join(SEARCHES)}")
        if self.select_by not in SELECT_BY:
            raise ConfigError(f"unknown select_by {self.select_by!r}: choose from {SELECT_BY}")
        if self.stage1_val_queries < 1:
            raise ConfigError(f"stage1_val_queries={self.stage1_val_queries} must be >= 1")
        p, q = self.perfit, self.lora
        for name, values in (("perfit.lrs", p.lrs), ("perfit.epochs", p.epochs),
                             ("perfit.collective_ranks", p.collective_ranks),
                             ("perfit.personal_ranks", p.personal_ranks), ("perfit.positions", p.positions),
                             ("lora.lrs", q.lrs), ("lora.epochs", q.epochs), ("lora.ranks", q.ranks)):
            if not values:
                raise ConfigError(f"the search space's {name} is empty: give at least one value")
        if p.layer_sets is not None and (not p.layer_sets or not all(p.layer_sets)):
            raise ConfigError("the search space's perfit.layer_sets is empty or holds an empty set: "
                              "give sets of layers such as 8,14;6,12")
        if not all(lr > 0 for lr in (*p.lrs, *q.lrs)):
            raise ConfigError("learning rates of the search space must be positive")
        if min(*p.epochs, *q.epochs) < 1 or min(*p.collective_ranks, *p.personal_ranks, *q.ranks) < 1:
            raise ConfigError("epochs and ranks of the search space must be >= 1")
        for spec in p.positions:
            parse_positions(spec)

    def check_model(self, d_model: int, n_layers: int) -> None:
        """Ranks at most ``d_model`` and layers inside the model (``ConfigError``)."""
        ranks = (*self.perfit.collective_ranks, *self.perfit.personal_ranks, *self.lora.ranks)
        if max(ranks) > d_model:
            raise ConfigError(f"rank {max(ranks)} of the search space is larger than the model's d_model={d_model}")
        layers = [layer for s in self.perfit.layer_sets or () for layer in s]
        out = [layer for layer in layers if not -n_layers <= layer < n_layers]
        if out:
            raise ConfigError(f"layer {out[0]} of the search space is outside the model's {n_layers} layers")


def layer_sets(space: PerFitSpace, base: Sequence[int], n_layers: int) -> tuple[tuple[int, ...], ...]:
    """The layer sets searched: ``space.layer_sets``, else ``base`` and the ``DEPTH_FRACTIONS``
    of ``n_layers`` (as sorted non-negative layers, duplicates dropped)."""
    if space.layer_sets is not None:
        return tuple(tuple(s) for s in dict.fromkeys(tuple(s) for s in space.layer_sets))
    sets = [tuple(sorted({layer % n_layers for layer in base}))]
    for fractions in DEPTH_FRACTIONS:
        sets.append(tuple(sorted({min(n_layers - 1, int(n_layers * f)) for f in fractions})))
    return tuple(dict.fromkeys(sets))


def draw(choices: Mapping[str, Sequence], n: int, seed: int, label: str) -> list[dict]:
    """``n`` distinct settings (dicts over ``choices``' keys) drawn without replacement from the
    product of the choices, by a shuffle seeded with ``(seed, label)``; ``ConfigError`` when the
    product has fewer than ``n`` settings."""
    names = list(choices)
    combos = list(itertools.product(*(list(dict.fromkeys(choices[k])) for k in names)))
    if len(combos) < n:
        raise ConfigError(f"the {label} search space has {len(combos)} distinct settings, fewer than "
                          f"n_trials={n}: add choices or lower the trials")
    order = np.random.default_rng(stable_rank(label, seed)).permutation(len(combos))[:n]
    return [dict(zip(names, combos[i])) for i in order.tolist()]
