"""Issue 14, capability check on the real model: can PerFit's personal stage learn a planted
per-user bias (``perfit_probe.evaluation.capability``)? Each test is one check, about 75 s on
2 quiet cores (``figures/capability.json``)."""

from __future__ import annotations

import pytest

from perfit_probe.config import CapabilityConfig
from perfit_probe.data.planted import SCALE
from perfit_probe.evaluation.capability import CAPABLE_FIT, DEMO_FIT, capability_check


@pytest.mark.slow
def test_personal_stage_learns_a_per_user_bias_on_the_real_model(embedded):
    """With stage 2's learning rate at 5e-3 (``CAPABLE_FIT``), SmolLM2's PerFit recovers the test
    users' planted constants: MAE within 0.15 of the noise floor, at least 8 of 10 constants over
    the whole scale, far below stage 1 alone."""
    result = capability_check(embedded, CapabilityConfig(fit=CAPABLE_FIT))
    s = result.summary
    assert result.verdict == "learns", result.sentence
    assert s.mae["perfit"] <= s.noise_floor_realised + 0.15
    assert s.recovered >= 8 and s.p_vs_stage1 < 0.05
    assert s.mae["stage1"] - s.mae["perfit"] > 1.0
    recovered = result.per_user[result.per_user["recovered"]]
    assert set(recovered["constant"]) == set(SCALE)  # the whole scale, not one end of it


@pytest.mark.slow
def test_the_demo_recipe_learns_only_part_of_a_per_user_bias(embedded):
    """The demo's recipe (stage-2 lr 2e-3, 2 epochs over 9 examples: 4 steps per user) moves
    users toward their constants but stops short of the noise floor: the check says ``partial``,
    so its personal stage cannot be expected to match a per-user median."""
    result = capability_check(embedded, CapabilityConfig(fit=DEMO_FIT))
    s = result.summary
    assert result.verdict == "partial", result.sentence
    assert s.mae["perfit"] > s.noise_floor_realised + 0.15
    assert s.mae["perfit"] > s.mae["user_median"]
