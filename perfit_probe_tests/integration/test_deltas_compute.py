"""``compute_deltas`` against a direct computation from the cached rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from perfit_probe.cache import cache_activations
from perfit_probe.deltas import Deltas, compute_deltas, delta_frame
from perfit_probe.errors import CacheError
from perfit_probe_tests.oracles import pooled_mean
from perfit_probe_tests.prompts import make_examples
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("positions", ["last", "f2+l2"])
def test_deltas_equal_difference_of_means(tmp_path, positions):
    loaded = tiny_model("llama")
    examples = make_examples(3, 4)
    # shards of 5 rows: a user's plain and enhanced rows land in different shards
    cache = cache_activations(loaded, examples, tmp_path / "c", sites=[1, 3], positions=positions,
                              shard_rows=5, progress=False)
    deltas = compute_deltas(cache, meta={"task": "hand-built"})
    sel = cache.select()
    assert deltas.user_ids == ["u0", "u1", "u2"] and deltas.sites == cache.sites
    assert deltas.enhanced.shape == (3, 2, 32)
    for u, user in enumerate(deltas.user_ids):
        plain = pooled_mean(sel, user, "plain")
        torch.testing.assert_close(deltas.enhanced[u].double(), pooled_mean(sel, user, "enhanced") - plain, atol=1e-6, rtol=0)
        torch.testing.assert_close(deltas.control[u].double(), pooled_mean(sel, user, "control") - plain, atol=1e-6, rtol=0)
        torch.testing.assert_close(deltas.mean_plain[u].double(), plain, atol=1e-6, rtol=0)
    assert len(deltas.query_ids) == 12 and deltas.query_user_ids[:4] == ["u0"] * 4
    pooled = sel.pooled()
    for i, (user, query) in enumerate(zip(deltas.query_user_ids, deltas.query_ids)):
        pick = lambda v: pooled[int(sel.rows.index[(sel.rows.user_id == user) & (sel.rows.query_id == query)
                                                   & (sel.rows.variant == v)][0])]
        torch.testing.assert_close(deltas.query_delta[i], pick("enhanced") - pick("plain"), atol=1e-6, rtol=0)
    # the user delta is the mean of that user's per-query deltas (same queries in both variants)
    torch.testing.assert_close(deltas.query_delta[:4].mean(0), deltas.enhanced[0], atol=1e-6, rtol=0)
    assert deltas.meta["task"] == "hand-built" and deltas.meta["positions"] == cache.positions
    deltas.save(tmp_path / "d")
    back = Deltas.load(tmp_path / "d")
    assert torch.equal(back.enhanced, deltas.enhanced) and back.query_ids == deltas.query_ids


def test_users_without_both_variants_are_dropped_and_partial_control_is_none(tmp_path):
    loaded = tiny_model("llama")
    examples = [e for e in make_examples(3, 2)
                if not (e.user_id == "u1" and e.variant == "enhanced")
                and not (e.user_id == "u2" and e.variant == "control")]
    cache = cache_activations(loaded, examples, tmp_path / "c", sites=[1], progress=False)
    deltas = compute_deltas(cache)
    assert deltas.user_ids == ["u0", "u2"] and deltas.control is None
    assert set(deltas.query_user_ids) == {"u0", "u2"}
    only_plain = [e for e in examples if e.variant == "plain"]
    cache2 = cache_activations(loaded, only_plain, tmp_path / "p", sites=[1], progress=False)
    with pytest.raises(CacheError, match="plain and enhanced"):
        compute_deltas(cache2)


def test_delta_frame_is_tidy_with_norms():
    enhanced = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])
    deltas = Deltas(user_ids=["a", "b"], sites=["blocks.5.hook_resid_post"], enhanced=enhanced,
                    control=enhanced * 2, mean_plain=torch.ones(2, 1, 2),
                    query_delta=torch.zeros(3, 1, 2), query_user_ids=["a", "a", "b"], query_ids=["1", "2", "3"])
    frame = delta_frame(deltas)
    assert list(frame.columns) == ["user_id", "site", "layer", "n_queries", "delta_norm", "control_norm", "plain_norm"]
    assert frame["layer"].tolist() == [5, 5] and frame["n_queries"].tolist() == [2, 1]
    assert frame["delta_norm"].tolist() == [5.0, 1.0] and frame["control_norm"].tolist() == [10.0, 2.0]
    assert frame["plain_norm"].tolist() == pytest.approx([math.sqrt(2)] * 2)
    no_control = delta_frame(Deltas(user_ids=["a"], sites=["blocks.0.hook_resid_post"], enhanced=enhanced[:1]))
    assert pd.isna(no_control["control_norm"]).all() and no_control["n_queries"].tolist() == [0]
