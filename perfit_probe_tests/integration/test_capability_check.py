"""Issue 14, capability check on a tiny model: the check's in-memory fit is the ``fit`` stage's,
and the check runs end to end with consistent numbers."""

from __future__ import annotations

import pytest
import torch

from perfit_probe.config import CapabilityConfig, FitConfig
from perfit_probe.data import load_task
from perfit_probe.data.splits import make_split
from perfit_probe.evaluation.capability import capability_check, fit_perfit, with_fit
from perfit_probe.interventions.artifact import load_perfit
from perfit_probe.stages import fit as fit_stage
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_perfit_equals_the_fit_stage(tmp_path):
    """The in-memory fit of the check trains exactly the banks the fit stage writes."""
    config = FitConfig(task="synthetic", n_users=6, max_queries=4, n_heldout=2, layers=(1, -1), positions="f1+l1",
                       collective_rank=4, personal_rank=4, epochs1=1, epochs2=2, batch_size=2, lr1=1e-2, lr2=1e-2,
                       max_prompt_tokens=96, max_profile_examples=4, val_per_user=1, model="tiny")
    loaded = tiny_model("llama")
    fit_stage.run(config, tmp_path / "run", loaded)
    written = load_perfit(tmp_path / "run", loaded)
    task = load_task("synthetic", n_users=6, max_queries=4, seed=0)
    fitted, curves = fit_perfit(loaded, task, make_split(task, n_heldout=2, seed=0), config)
    for mine, theirs in ((fitted.collective, written.collective), (fitted.personal, written.personal)):
        assert mine.keys == theirs.keys
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b)
    assert set(curves["stage"]) == {"collective", "personal"}


def test_capability_check_runs_end_to_end_on_a_tiny_model():
    config = with_fit(CapabilityConfig(n_train_users=5, n_test_users=3, n_history=4, n_queries=2),
                      layers=(1, 3), epochs1=1, epochs2=1, val_per_user=1, max_profile_examples=4)
    result = capability_check(tiny_model("llama"), config)
    assert result.verdict in ("learns", "partial", "no gain")
    assert set(result.predictions["method"]) == {"stage1", "perfit", "user_median", "planted"}
    assert len(result.predictions) == 4 * 3 * 2 and len(result.per_user) == 3
    planted = result.predictions[result.predictions["method"] == "planted"]
    assert result.summary.noise_floor_realised == pytest.approx(
        (planted["gold"].astype(int) - planted["output"].astype(int)).abs().mean())
    assert result.summary.mae["perfit"] == pytest.approx(result.per_user["mae_perfit"].mean())
    assert result.summary.stage2["selection"]["users"] == 3 and result.summary.total_s >= result.summary.fit_s > 0
