"""``perfit-probe tune`` without a model: the seeded draw of the trials, the choice of a stage's
trial, and the search options refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from perfit_probe.config import LoraSpace, PerFitSpace, TuneConfig
from perfit_probe.errors import ConfigError
from perfit_probe.evaluation.search_space import draw, layer_choices
from perfit_probe.evaluation.tune import Trial, selection_key


def test_draw_is_seeded_distinct_and_refuses_a_small_space():
    choices = {"lr": (1e-3, 2e-3, 5e-3), "epochs": (1, 2), "rank": (4, 8)}
    first = draw(choices, 12, seed=0, label="perfit/stage1")
    assert first == draw(choices, 12, seed=0, label="perfit/stage1")
    assert len({tuple(d.values()) for d in first}) == 12  # all of them, each once
    assert draw(choices, 5, seed=1, label="perfit/stage1") != first[:5]
    assert draw(choices, 5, seed=0, label="lora/stage1") != first[:5]
    assert draw({**choices, "rank": (4, 4, 8)}, 12, seed=0, label="perfit/stage1") == first  # repeats count once
    with pytest.raises(ConfigError, match="12 distinct settings, fewer than n_trials=13"):
        draw(choices, 13, seed=0, label="perfit/stage1")


def test_selection_prefers_the_better_metric_then_the_lower_loss():
    def trial(index, metric, value, loss):
        return Trial("perfit", "stage1", index, {}, metric, value, loss, 4, 2, 0)

    mae = [trial(0, "mae", 0.9, 1.0), trial(1, "mae", 0.7, 3.0), trial(2, "mae", 0.7, 2.0),
           trial(3, "mae", np.nan, 0.1)]
    assert min(mae, key=lambda t: selection_key(t, "metric")).trial == 2
    assert min(mae, key=lambda t: selection_key(t, "loss")).trial == 3
    acc = [trial(0, "accuracy", 0.5, 1.0), trial(1, "accuracy", 0.75, 2.0), trial(2, "accuracy", 0.75, 2.0)]
    assert min(acc, key=lambda t: selection_key(t, "metric")).trial == 1


def test_layer_choices_default_to_the_fit_and_fractions_of_the_depth():
    assert layer_choices(PerFitSpace(), (8, -16), 30) == ((8, 14), (5, 11), (14, 20))
    assert layer_choices(PerFitSpace(layer_sets=("8+14", "3", "8+14")), (1,), 30) == ((8, 14), (3,))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n_trials": 0}, "n_trials=0 must be >= 1"),
    ({"searches": ()}, "give at least one search"),
    ({"stage1_val_queries": 0}, "stage1_val_queries=0"),
    ({"perfit": PerFitSpace(lrs=())}, "perfit.lrs is empty"),
    ({"perfit": PerFitSpace(positions=())}, "perfit.positions is empty"),
    ({"lora": LoraSpace(epochs=())}, "lora.epochs is empty"),
    ({"perfit": PerFitSpace(layer_sets=())}, "perfit.layer_sets is empty"),
    ({"perfit": PerFitSpace(layer_sets=("8+x",))}, "joined by '+'"),
    ({"lora": LoraSpace(lrs=(0.0,))}, "learning rates of the search space must be positive"),
    ({"perfit": PerFitSpace(epochs=(0, 1))}, "epochs and ranks of the search space must be >= 1"),
])
def test_bad_search_spaces_are_refused_in_one_line(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        TuneConfig(**kwargs).validate()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_ranks_and_layers_are_checked_against_the_model():
    TuneConfig().check_model(d_model=16, n_layers=30)
    with pytest.raises(ConfigError, match="rank 16 of the search space is larger than the model's d_model=8"):
        TuneConfig().check_model(d_model=8, n_layers=30)
    with pytest.raises(ConfigError, match="layer -31 of the search space is outside the model's 30 layers"):
        TuneConfig(perfit=PerFitSpace(layer_sets=("8+-31",))).check_model(d_model=64, n_layers=30)
