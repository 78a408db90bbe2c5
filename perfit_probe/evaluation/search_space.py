"""The seeded sampler of ``perfit-probe tune``: which trials a search runs.

The paper chose PerFit's ranks and layers by random search. Here a search draws, for each
stage of each searched method, ``n_trials`` *distinct* settings from the product of the
declared choices (``perfit_probe.config.PerFitSpace``, ``LoraSpace``): every combination is
listed, shuffled by a generator seeded with ``(seed, method/stage)``, and the first
``n_trials`` are the trials. The same seed draws the same trials; a space with fewer
combinations than ``n_trials`` is refused (``ConfigError``), so every searched method gets
exactly the same budget.

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
from typing import Mapping, Sequence

import numpy as np

from perfit_probe.config import PerFitSpace
from perfit_probe.data.splits import stable_rank
from perfit_probe.errors import ConfigError

DEPTH_FRACTIONS = ((0.27, 0.47), (0.17, 0.37), (0.47, 0.67))
"""Layer sets searched by default, as fractions of the model's depth (besides the fit's layers);
the first is the demo's (layers 8 and 14 of SmolLM2's 30)."""


def layer_choices(space: PerFitSpace, base: Sequence[int], n_layers: int) -> tuple[tuple[int, ...], ...]:
    """The layer sets searched: ``space.layer_sets``, else ``base`` and the ``DEPTH_FRACTIONS``
    of ``n_layers`` (as sorted non-negative layers); duplicates dropped."""
    given = space.layer_tuples()
    if given is not None:
        return tuple(dict.fromkeys(given))
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
