"""The analyze stage, ``perfit-probe analyze``, the report, figures and the figure script."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

from perfit_probe.analysis.synthetic import planted_deltas
from perfit_probe.analysis.tables import TABLES
from perfit_probe.cli import main
from perfit_probe.config import AnalysisConfig
from perfit_probe.plotting import shift_figures as sf
from perfit_probe.stages import analyze as analyze_stage
from perfit_probe.stages.analysis_report import render_report
from perfit_probe.stages.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
FAST = AnalysisConfig(n_boot=20, n_perm=20, max_figure_sites=1)


def _make_run(path: Path, **kwargs) -> Path:
    deltas, _ = planted_deltas(**{"n_users": 20, "n_sites": 2, "d_model": 24, "rank": 2,
                                  "n_queries": 4, "seed": 0, **kwargs})
    RunDir.create(path, "cache", {"task": "planted"}, seed=0)
    deltas.save(path / "deltas")
    return path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    run = _make_run(tmp_path_factory.mktemp("run") / "run")
    result = analyze_stage.run(FAST, run).analysis
    return run, result


def test_analyze_stage_writes_tables_report_figures_metrics(analysed):
    run, result = analysed
    for filename in TABLES.values():
        assert (run / "analysis" / filename).is_file()
    pngs = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert "shift_cumvar_uncentred.png" in pngs and "shift_rank_vs_layer_centred.png" in pngs
    assert any(p.startswith("shift_pc12_") for p in pngs) and any(p.startswith("shift_user_cosine_") for p in pngs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["analysis"]["n_users"] == 20
    assert "analyze" in metrics["timings"]
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages[-1]["command"] == "analyze" and stages[-1]["config"]["n_boot"] == 20


def test_report_states_the_saved_numbers(analysed):
    run, result = analysed
    report = (run / "analysis" / "report.md").read_text()
    assert report == render_report(result)
    ranks = pd.read_csv(run / "analysis" / "ranks.csv")
    ref = ranks[(ranks.source == "deltas") & (ranks.statistic == "rank@0.9") & (~ranks.centered)]
    best = ref.loc[ref["value"].idxmin()]
    gauss = ranks[(ranks.source == "gaussian_null") & (ranks.statistic == "rank@0.9")
                  & (~ranks.centered) & (ranks.site == best.site)].iloc[0]
    assert (f"at `{best.site}`: {best.value:.0f} of {best.max_rank} possible" in report)
    assert f"{gauss.value:.0f} for Gaussian vectors with matched norms" in report
    # the paper-style table: one row per site x source, r and per-mille at each tau
    assert "| layer | site | source | r@0.8 | ‰ | r@0.9 | ‰ | r@0.95 | ‰ |" in report
    assert report.count("| `blocks.0.hook_resid_post` | deltas |") == 2  # uncentred + centred
    assert "## Collective versus personal shift" in report


def test_figure_functions_are_pure_functions_of_the_csvs(analysed, tmp_path):
    run, _ = analysed
    tables = sf.read_tables(run / "analysis")
    fig = sf.plot_rank_vs_layer(tables["ranks"], tau=0.9)
    assert isinstance(fig, Figure)
    assert len(fig.axes[0].lines) == tables["ranks"]["source"].nunique()
    fig = sf.plot_cumulative_variance(tables["curves"], centered=True)
    assert len(fig.axes[0].lines) == 4 + 3  # one curve per source + the three tau lines
    site = tables["projection"]["site"].iloc[0]
    assert isinstance(sf.plot_pc_projection(tables["projection"], site), Figure)
    assert isinstance(sf.plot_user_cosine(tables["user_cosine"], site), Figure)
    assert isinstance(sf.plot_cosine_to_mean(tables["user_stats"]), Figure)
    script = runpy.run_path(str(REPO / "analyses" / "shift_figures.py"), run_name="shift_figures")
    assert script["main"]([str(run), "--out", str(tmp_path / "figs"), "--dpi", "40"]) == 0
    assert len(list((tmp_path / "figs").glob("*.png"))) == len(list((run / "figures").glob("*.png")))


def test_cli_analyze(tmp_path, capsys):
    run = _make_run(tmp_path / "run", n_sites=1)
    code = main(["analyze", str(run), "--n-boot", "5", "--n-perm", "5", "--no-figures",
                 "--center", "centred", "--sources", "deltas,gaussian_null"])
    assert code == 0
    out = capsys.readouterr().out
    assert "rank@0.9" in out and "report.md" in out
    ranks = pd.read_csv(run / "analysis" / "ranks.csv")
    assert set(ranks.centered) == {True} and set(ranks.source) == {"deltas", "gaussian_null"}
    assert not (run / "figures").exists()


def test_cli_analyze_errors_are_one_line(tmp_path, capsys):
    RunDir.create(tmp_path / "empty", "cache", {}, seed=0)
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "perfit-probe cache" in err and len(err.splitlines()) == 1
    run = _make_run(tmp_path / "run", n_sites=1)
    assert main(["analyze", str(run), "--sources", "deltas,bogus"]) == 2
    assert "--sources: 'bogus' not among deltas," in capsys.readouterr().err
