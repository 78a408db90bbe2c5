"""CLI behaviour shared by every command: one-line errors, exit codes, run directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from perfit_probe._io import read_json, write_json
from perfit_probe.cli import main
from perfit_probe.stages.rundir import RunDir
from perfit_probe_tests.tiny import save_tiny_model


def test_backends_command_writes_run_dir(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m", "gpt2")
    out = tmp_path / "run"
    assert main(["backends", "--model", str(model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformer_lens" in printed and "nnsight" in printed
    info = json.loads((out / "run.json").read_text())
    assert info["seed"] == 0 and info["model"]["n_layers"] == 4
    assert info["versions"]["torch"].startswith("2.13")
    frame = pd.read_csv(out / "backend_agreement.csv")
    assert frame["max_abs_diff"].max() < 1e-5


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m", "llama")
    capsys.readouterr()
    cases = [
        (["backends", "--model", str(tmp_path / "missing")], "does not exist"),
        (["backends", "--model", "org/not-cached", "--offline"], "local Hugging Face cache"),
        (["backends", "--model", str(model), "--sites", "4"], "out of range"),
        (["backends", "--model", str(model), "--sites", "blocks.1.hook_nope"], "unknown site"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "perfit_probe.cli", "backends", "--model", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_run_dir_refuses_to_clobber_and_writes_atomically(tmp_path):
    run = RunDir.create(tmp_path / "r", "test", {"a": 1}, seed=3)
    run.add_metrics("stage", {"x": 1.5})
    (run.path / "artifact.txt").write_text("keep me")
    import pytest

    from perfit_probe.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        RunDir.create(tmp_path / "r", "test", {"a": 2}, seed=3)
    assert (run.path / "artifact.txt").read_text() == "keep me"
    again = RunDir.create(tmp_path / "r", "test2", {"a": 2}, seed=3, exist_ok=True)
    assert again.metrics()["stage"]["x"] == 1.5
    assert [s["command"] for s in again.info()["stages"]] == ["test", "test2"]
    (run.path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        read_json(run.path / "bad.json")
    write_json(run.path / "ok.json", {"b": 1})
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_commands_on_a_run_default_to_its_model_dtype_and_device(tmp_path):
    import torch

    from perfit_probe.commands.common import load_cli_model, recorded_model
    from perfit_probe.config import ModelFields, RecordedModel
    from perfit_probe.models import load_model

    model = save_tiny_model(tmp_path / "m", "llama")
    identity = load_model(str(model)).identity
    fit_run = tmp_path / "fit"
    RunDir.create(fit_run, "fit", {"dtype": "bfloat16", "device": "cpu", "lr": 1e-3}, 0, identity)
    pipe_run = tmp_path / "pipe"
    RunDir.create(pipe_run, "pipeline", {"pipeline": {"model": {"name": "x", "dtype": "float16", "device": "cpu"}}},
                  0, identity)
    assert recorded_model(fit_run) == {"name": str(model), "dtype": "bfloat16", "device": "cpu"}
    assert recorded_model(pipe_run) == {"name": str(model), "dtype": "float16", "device": "cpu"}

    loaded = load_cli_model(RecordedModel(), RecordedModel(), fit_run)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    # the fingerprint samples the weights in the loaded dtype: a float32 default would not match
    assert loaded.identity.fingerprint == load_model(str(model), dtype="bfloat16").identity.fingerprint
    assert loaded.identity.fingerprint != identity.fingerprint
    # an explicit option wins over the record
    loaded = load_cli_model(RecordedModel(dtype="float32"), RecordedModel(), fit_run)
    assert next(loaded.model.parameters()).dtype == torch.float32
    # commands that do not work on a run keep the plain defaults
    assert ModelFields().dtype == "float32"
