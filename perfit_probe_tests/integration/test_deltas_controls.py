"""Delta vectors of the control variants: difference of means and per-query differences, saved."""

from __future__ import annotations

import pytest
import torch

from perfit_probe.cache import cache_activations
from perfit_probe.data.records import CONTROL_VARIANTS
from perfit_probe.deltas import Deltas, compute_deltas, delta_frame
from perfit_probe_tests.oracles import pooled_mean
from perfit_probe_tests.prompts import make_examples
from perfit_probe_tests.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_control_variant_deltas_equal_difference_of_means(tmp_path):
    loaded = tiny_model("llama")
    examples = make_examples(3, 3, variants=("plain", "enhanced", "control") + CONTROL_VARIANTS)
    cache = cache_activations(loaded, examples, tmp_path / "c", sites=[1, 3], shard_rows=7, progress=False)
    deltas = compute_deltas(cache)
    sel = cache.select()
    pooled = sel.pooled()
    assert set(deltas.variant_deltas) == set(CONTROL_VARIANTS) == set(deltas.variant_query_deltas)
    for v in CONTROL_VARIANTS:
        for u, user in enumerate(deltas.user_ids):
            expected = pooled_mean(sel, user, v) - pooled_mean(sel, user, "plain")
            torch.testing.assert_close(deltas.variant_deltas[v][u].double(), expected, atol=1e-6, rtol=0)
        for i, (user, query) in enumerate(zip(deltas.query_user_ids, deltas.query_ids)):
            def pick(variant):
                rows = sel.rows
                return pooled[int(rows.index[(rows.user_id == user) & (rows.query_id == query)
                                             & (rows.variant == variant)][0])]
            torch.testing.assert_close(deltas.variant_query_deltas[v][i], pick(v) - pick("plain"),
                                       atol=1e-6, rtol=0)
    deltas.save(tmp_path / "d")
    back = Deltas.load(tmp_path / "d")
    for v in CONTROL_VARIANTS:
        assert torch.equal(back.variant_deltas[v], deltas.variant_deltas[v])
        assert torch.equal(back.variant_query_deltas[v], deltas.variant_query_deltas[v])
    frame = delta_frame(deltas)
    assert {f"{v}_norm" for v in CONTROL_VARIANTS} <= set(frame.columns)
    # a variant missing for one user gives no user deltas of it
    partial = [e for e in examples if not (e.user_id == "u1" and e.variant == "permuted")]
    cache2 = cache_activations(loaded, partial, tmp_path / "p", sites=[1], progress=False)
    d2 = compute_deltas(cache2)
    assert "permuted" not in d2.variant_deltas and "permuted" not in d2.variant_query_deltas
    assert "other_user" in d2.variant_deltas


def test_cache_and_analyze_cli_with_every_variant(tmp_path):
    import pandas as pd

    from perfit_probe.cli import main
    from perfit_probe.data.records import VARIANTS
    from perfit_probe_tests.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    assert main(["cache", "--model", str(model), "--task", "synthetic", "--users", "4", "--max-queries", "3",
                 "--sites", "1,3", "--variants", ",".join(VARIANTS), "--out", str(out), "--no-progress"]) == 0
    deltas = Deltas.load(out / "deltas")
    assert set(deltas.variant_deltas) == set(CONTROL_VARIANTS)
    history = pd.read_csv(out / "deltas" / "history.csv", dtype={"user_id": str, "query_id": str})
    assert set(history.variant) == set(VARIANTS) - {"plain"} and len(history) == 4 * 3 * 5
    assert main(["analyze", str(out), "--n-boot", "5", "--n-perm", "5", "--n-null-draws", "9",
                 "--no-figures"]) == 0
    controls = pd.read_csv(out / "analysis" / "controls.csv")
    assert set(controls.control) == {"control"} | set(CONTROL_VARIANTS) and len(controls) == 2 * 4
    ident = pd.read_csv(out / "analysis" / "identification.csv")
    assert {"item_ids", "history_tfidf", "hidden_state", "hidden_state_other_user"} <= set(ident.features)
    assert "## Controls for claims 1-2" in (out / "analysis" / "report.md").read_text()
