"""Execute analyses/explore_shifts.ipynb on a small synthetic run so the notebook cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from perfit_probe.analysis.synthetic import planted_deltas
from perfit_probe.stages.rundir import RunDir

NOTEBOOK = Path(__file__).resolve().parents[2] / "analyses" / "explore_shifts.ipynb"


def _outputs(nb, kind: str) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if kind in out.get("data", {}) or out.get("output_type") == kind]


def test_explore_notebook_runs_on_a_small_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    deltas, _ = planted_deltas(n_users=12, n_sites=2, d_model=16, rank=2, n_queries=4, seed=0)
    RunDir.create(run, "cache", {}, seed=0)
    deltas.save(run / "deltas")
    monkeypatch.setenv("PERFIT_RUN_DIR", str(run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    text = "".join(out.get("text", "") for out in _outputs(nb, "stream"))
    assert f"run directory: {run}" in text
    assert "EXPLORE_DONE site=blocks." in text and "users=12" in text
    assert len(_outputs(nb, "image/png")) >= 4  # cumulative energy, PC1-PC2, heatmap, cosines
    # the notebook computed the analysis into the run directory when it was missing
    assert (run / "analysis" / "ranks.csv").is_file()
