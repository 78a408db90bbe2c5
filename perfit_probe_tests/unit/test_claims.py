"""Verdicts on the claims come from the run's statistics: hand-made tables with known answers."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from perfit_probe.config import FitConfig, pipeline_config
from perfit_probe.errors import ArtifactError, ConfigError

from perfit_probe.stages.claims import claim_table, claims_markdown


def _write(run, name: str, rows: list[dict]) -> None:
    path = run / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def _nulls(p_values):
    return [{"site": f"s{i}", "layer": i, "null": "gaussian_null", "centered": c, "statistic": "rank@0.9",
             "observed": 1.0, "null_median": 7.0, "null_low": 6.0, "null_high": 8.0, "p_value": p,
             "p_value_randomized": p, "n_draws": 200} for i, p in enumerate(p_values) for c in (False, True)]


def _diff(method, against, reference, estimate, lo, hi, p):
    return {"method": method, "against": against, "reference": reference, "metric": "mae", "estimate": estimate,
            "ci_low": lo, "ci_high": hi, "p_value": p, "n_perm": 1000, "exact": False, "level": 0.95,
            "n_boot": 2000, "n_users": 12, "n_queries": 96}


def test_claim1_counts_the_sites_below_the_gaussian_null(tmp_path):
    _write(tmp_path, "analysis/null_tests.csv", _nulls([0.005, 0.3]))
    table = claim_table(tmp_path).set_index("scope")
    assert table.loc["uncentred", "verdict"] == "partly" and table.loc["uncentred", "value"] == 1
    _write(tmp_path, "analysis/null_tests.csv", _nulls([0.005, 0.01]))
    assert set(claim_table(tmp_path)["verdict"]) == {"holds"}


def test_claim2_personal_shift_must_beat_the_prompt_text(tmp_path):
    def ident(hidden, text):
        return [{"site": "s0", "layer": 0, "features": "hidden_state", "accuracy": hidden, "chance": 0.05,
                 "uniform_chance": 0.05, "p_value": 1e-4, "n_users": 20, "n_train": 60, "n_test": 20},
                {"site": "prompt_text", "layer": -1, "features": "item_ids", "accuracy": text, "chance": 0.05,
                 "uniform_chance": 0.05, "p_value": 1e-9, "n_users": 20, "n_train": 60, "n_test": 20}]

    _write(tmp_path, "analysis/identification.csv", ident(0.4, 0.85))
    row = claim_table(tmp_path).set_index("scope").loc["personal"]
    assert row.verdict == "confounded by prompt text" and row.reference == 0.85
    _write(tmp_path, "analysis/identification.csv", ident(0.9, 0.85))
    assert claim_table(tmp_path).set_index("scope").loc["personal", "verdict"] == "holds"


def test_claim3_needs_both_the_interval_and_the_permutation_test(tmp_path):
    _write(tmp_path, "eval/results.csv", [{"method": m, "params_per_user": p, "mae": 0.8}
                                          for m, p in (("perfit", 9224), ("oppu", 460800), ("user_median", 0))])
    rows = [_diff("oppu", "reference", "perfit", 0.04, -0.1, 0.2, 0.6),
            _diff("perfit", "best_baseline", "user_median", 0.2, 0.05, 0.35, 0.01)]
    _write(tmp_path, "eval/differences.csv", rows)
    table = claim_table(tmp_path, kind="rating").set_index("scope")
    assert table.loc["vs oppu", "verdict"] == "no detectable difference"
    assert "beyond 0.200 are excluded" in table.loc["vs oppu", "sentence"]
    assert table.loc["vs best trivial baseline", "verdict"] == "the trivial baseline user_median beats PerFit"
    # an interval that excludes 0 with a permutation p above alpha decides nothing
    rows[1] = _diff("perfit", "best_baseline", "user_median", 0.2, 0.05, 0.35, 0.12)
    _write(tmp_path, "eval/differences.csv", rows)
    assert claim_table(tmp_path, kind="rating").set_index("scope").loc[
        "vs best trivial baseline", "verdict"] == "no detectable difference"
    # PerFit lower MAE than OPPU, decided
    rows[0] = _diff("oppu", "reference", "perfit", 0.3, 0.1, 0.5, 0.002)
    _write(tmp_path, "eval/differences.csv", rows)
    assert claim_table(tmp_path, kind="rating").set_index("scope").loc["vs oppu", "verdict"] == "PerFit better"
    # the power clause: 2.8 standard errors, the standard error read off the interval (0.4 / 3.92)
    assert f"{0.4 / 3.919928 * 2.801585:.3f} would be detected with 80% power" in \
        claim_table(tmp_path, kind="rating").set_index("scope").loc["vs oppu", "sentence"]
    text = claims_markdown(claim_table(tmp_path, kind="rating"), "- dose: best alpha 1")
    assert text.count("\n- ") >= 3 and "best alpha 1" in text


def test_no_files_no_verdicts(tmp_path):
    assert claim_table(tmp_path).empty
    assert "no stage output" in claims_markdown(claim_table(tmp_path))


def _capability(tmp_path, fits):
    recipes = [{"recipe": name, "fit": fit, "verdict": verdict, "sentence": f"{name} sentence.",
                "summary": {"mae": {"perfit": mae}, "noise_floor_realised": 0.02, "p_vs_stage1": 0.01}}
               for name, fit, verdict, mae in fits]
    path = tmp_path / "capability.json"
    path.write_text(json.dumps({"model": "smollm2", "recipes": recipes}))
    return path


def test_capability_verdict_of_the_runs_own_recipe(tmp_path):
    """The claims quote the check whose recipe is the run's, matched on the recipe only (not data, seed)."""
    run_fit = {"layers": [8, 14], "lr2": 0.002, "seed": 3, "n_users": 24, "model": "smollm2"}
    path = _capability(tmp_path, [("fast", {"layers": [8, 14], "lr2": 0.005, "seed": 0, "n_users": 15}, "learns", 0.1),
                                  ("demo", {"layers": [8, 14], "lr2": 0.002, "seed": 0, "n_users": 15}, "partial", 0.7)])
    (tmp_path / "run.json").write_text(json.dumps({"config": {"resolved": {"fit": run_fit}}}))
    row = claim_table(tmp_path, capability=path).set_index("scope").loc["capability"]
    assert row["verdict"] == "partial" and row["value"] == 0.7 and row["reference"] == 0.02
    assert "recipe `demo`" in row["sentence"] and "may be this recipe's limit" in row["sentence"]
    for change in ({"lr2": 0.01}, {"model": "other-model"}, {"personal_rank": 16}):  # not the checked recipe
        (tmp_path / "run.json").write_text(json.dumps({"config": {"resolved": {"fit": {**run_fit, **change}}}}))
        row = claim_table(tmp_path, capability=path).set_index("scope").loc["capability"]
        assert row["verdict"] == "not checked" and "`fast`, `demo`" in row["sentence"], change
    # an option a file lacks counts as FitConfig's default
    default_rank = FitConfig().personal_rank
    (tmp_path / "run.json").write_text(json.dumps({"config": {"resolved": {"fit": {**run_fit, "personal_rank": default_rank}}}}))
    assert claim_table(tmp_path, capability=path).set_index("scope").loc["capability", "verdict"] == "partial"
    path.write_text("{}")  # not a capability.json: one line
    with pytest.raises(ArtifactError, match="not a capability check's capability.json"):
        claim_table(tmp_path, capability=path)


def test_capability_in_a_pipeline_file_is_a_path():
    assert str(pipeline_config({"capability": "figures/capability.json"}).capability) == "figures/capability.json"
    with pytest.raises(ConfigError, match="capability must be a path"):
        pipeline_config({"capability": 3})


def test_a_missing_capability_file_fails_before_any_stage(tmp_path):
    from dataclasses import replace

    from perfit_probe.pipeline import demo_config
    from perfit_probe.stages.pipeline import run_pipeline

    config = replace(demo_config(n_layers=4), capability=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="capability file .* not found"):
        run_pipeline(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
