"""Bad inputs and interruptions: nothing lost, nothing silent, one line instead of a traceback.

One test (or a few) per defect of issue 16; each failed before its fix. Interruptions send a
real SIGINT to a real ``perfit-probe`` subprocess working on a tiny random-init model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest
import torch

from perfit_probe.cli import main
from perfit_probe.errors import ArtifactError, CacheError, ConfigError, DataError, ModelLoadError, PerfitError
from perfit_probe.stages.rundir import RunDir, staged_dir
from perfit_probe_tests.tiny import save_tiny_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIT = ["--task", "synthetic", "--users", "6", "--max-queries", "4", "--heldout", "1", "--layers", "1",
       "--collective-rank", "2", "--personal-rank", "2", "--epochs1", "1", "--epochs2", "1",
       "--batch-size", "4", "--max-prompt-tokens", "96", "--no-progress"]
"""A fit of a few seconds on the tiny model: 3 train users, 3 test users."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, model_dir) -> Path:
    """A fitted run directory (copy it before changing it)."""
    out = tmp_path_factory.mktemp("fitted") / "run"
    assert main(["fit", "--model", str(model_dir), *FIT, "--out", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 1. interrupted fit --force


def test_staged_dir_keeps_the_old_directory_until_the_swap(tmp_path):
    target = tmp_path / "perfit"
    target.mkdir()
    (target / "old.txt").write_text("old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with staged_dir(target) as tmp:
                assert tmp.name == f"perfit.tmp-{os.getpid()}" and not any(tmp.iterdir())
                (tmp / "new.txt").write_text("new")
                assert (target / "old.txt").read_text() == "old"  # untouched while writing
                raise exc
        assert [p.name for p in tmp_path.iterdir()] == ["perfit"]
        assert [p.name for p in target.iterdir()] == ["old.txt"]
    dead = tmp_path / "perfit.tmp-999999999"  # a killed writer's leftover
    dead.mkdir()
    with staged_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["perfit"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_interrupted_fit_force_keeps_the_previous_fit(tmp_path, model_dir):
    out = tmp_path / "run"
    assert main(["fit", "--model", str(model_dir), *FIT, "--out", str(out)]) == 0
    before = _tree(out / "perfit")
    assert {"split.json", "stage1/intervention.safetensors", "bank/intervention.safetensors"} <= set(before)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "perfit_probe.cli", "fit", "--model", str(model_dir), *FIT,
            "--epochs1", "3000", "--epochs2", "3000", "--force", "--out", str(out)]
    # A shell running the suite in the background (``make test &``) ignores SIGINT, and an
    # ignored SIGINT is inherited: the child gets the default disposition back, as a terminal's.
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            stages = [s["command"] for s in json.loads((out / "run.json").read_text())["stages"]]
            if stages.count("fit") == 2:  # the new fit has loaded its data and is training
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert _tree(out / "perfit") == before
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "perfit", "run.json"]
    from perfit_probe.interventions.artifact import load_perfit

    assert len(load_perfit(out).user_ids) == 3


# ------------------------------------------------------------------------------ 2. evaluate a subset


@lru_cache(maxsize=1)
def _tiny():
    return tiny_model("llama")


def _evaluate(run: Path, methods: tuple[str, ...], **kwargs):
    from perfit_probe.config import EvalConfig
    from perfit_probe.models import load_model
    from perfit_probe.stages import evaluate as evaluate_stage

    loaded = load_model(RunDir.open(run).info()["model"]["name"])
    return evaluate_stage.run(EvalConfig(methods=methods, batch_size=8), run, loaded, **kwargs).evaluation


def test_evaluating_a_subset_merges_into_the_earlier_results(tmp_path, fitted):
    run = _copy(fitted, tmp_path)
    _evaluate(run, ("base", "stage1", "perfit"))
    first = pd.read_csv(run / "eval" / "results.csv").set_index("method")
    stage1_predictions = (run / "eval" / "predictions" / "stage1.json").read_text()
    _evaluate(run, ("base",))
    merged = pd.read_csv(run / "eval" / "results.csv").set_index("method")
    assert list(merged.index) == ["base", "stage1", "perfit"]
    pd.testing.assert_frame_equal(merged, first)  # deterministic: base scores the same again
    assert (run / "eval" / "predictions" / "stage1.json").read_text() == stage1_predictions
    predictions = pd.read_csv(run / "eval" / "predictions.csv")
    assert list(dict.fromkeys(predictions["method"])) == ["base", "stage1", "perfit"]
    assert "| stage1 |" in (run / "eval" / "results.md").read_text()
    assert set(RunDir.open(run).metrics()["evaluate"]) == {"base", "stage1", "perfit"}
    # a corrupted result file is refused, never merged
    path = run / "eval" / "predictions.csv"
    path.write_text(path.read_text() + "base,u0,q0,1,1\n")
    with pytest.raises(ArtifactError, match="predictions.csv is corrupt"):
        _evaluate(run, ("base",))


def test_results_of_another_fit_are_set_aside_not_merged_nor_lost(tmp_path, fitted, model_dir, caplog):
    run = _copy(fitted, tmp_path)
    _evaluate(run, ("base", "stage1"))
    before = _tree(run / "eval")
    assert main(["fit", "--model", str(model_dir), *FIT, "--seed", "1", "--force", "--out", str(run)]) == 0
    with caplog.at_level("WARNING"):
        _evaluate(run, ("base",))
    assert "held results of base, stage1 evaluated with another fit: moved them to" in caplog.text
    assert list(pd.read_csv(run / "eval" / "results.csv")["method"]) == ["base"]
    assert sorted(p.name for p in (run / "eval" / "predictions").iterdir()) == ["base.json", "golds.json"]
    (aside,) = (run / "eval" / "superseded").iterdir()
    assert _tree(aside) == before
    # evaluating every earlier method again replaces them without setting anything aside
    _evaluate(run, ("base",))
    assert len(list((run / "eval" / "superseded").iterdir())) == 1


# ------------------------------------------------------------------------------ 3. GGUF cache keyed on content


def test_converted_gguf_cache_is_keyed_on_the_files_contents(tmp_path, monkeypatch):
    import perfit_probe.models as models

    cache = tmp_path / "cache"
    real = tmp_path / "a" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    real.parent.mkdir()
    real.write_bytes(os.urandom(4096))
    # pretend `real` was converted before: its converted copy is a tiny model
    shutil.copytree(save_tiny_model(tmp_path / "tiny"), models._converted_dir(real, cache))
    assert models.load_model(str(real), cache_dir=cache).identity.n_layers == 4
    fake = tmp_path / "b" / real.name  # same name and size, other bytes
    fake.parent.mkdir()
    fake.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="cannot read .* as a GGUF model"):
        models.load_model(str(fake), cache_dir=cache)
    calls = []
    monkeypatch.setattr(models, "file_sha256", lambda path: calls.append(path) or "x")
    models.load_model(str(real), cache_dir=cache)  # the hash is remembered by path, size, mtime
    assert calls == []


# ------------------------------------------------------------------------------ 4. --max-queries


def test_max_queries_has_one_meaning_and_negative_is_refused(tmp_path, model_dir, capsys):
    from perfit_probe.cache import build_task_examples
    from perfit_probe.config import CacheConfig, FitConfig
    from perfit_probe.data import load_task

    for command in (["cache", "--sites", "1"], ["fit", *FIT[:2]]):
        assert main([*command, "--model", str(model_dir), "--task", "synthetic", "--users", "3",
                     "--max-queries", "-2", "--out", str(tmp_path / command[0])]) == 2
        _one_line_error(capsys, "max_queries=-2")
        assert not (tmp_path / command[0]).exists()
    # 0 means "no cap" (the loader's own default) in both
    FitConfig(task="synthetic", max_queries=0).validate()
    fit_users = load_task("synthetic", n_users=3, max_queries=0).users
    examples, _ = build_task_examples(CacheConfig(task="synthetic", n_users=3, max_queries=0,
                                                  variants=("plain",)), _tiny().tokenizer)
    assert len(examples) == sum(len(u.queries) for u in fit_users) == 3 * 12


# ------------------------------------------------------------------------------ 5. k = 0


def test_k_zero_is_refused_and_zero_deltas_fail_clearly(tmp_path, model_dir, capsys):
    from perfit_probe.deltas import Deltas

    assert main(["cache", "--model", str(model_dir), "--task", "synthetic", "--users", "3", "--k", "0",
                 "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "k=0")
    assert main(["fit", "--model", str(model_dir), *FIT, "--k", "0", "--out", str(tmp_path / "f")]) == 2
    _one_line_error(capsys, "k=0")
    run = RunDir.create(tmp_path / "zero", "cache", {}, 0)
    Deltas(["a", "b", "c"], ["blocks.1.hook_resid_post"], torch.zeros(3, 1, 8),
           query_delta=torch.zeros(6, 1, 8), query_user_ids=list("aabbcc"), query_ids=list("121212")
           ).save(run.path / "deltas")
    assert main(["analyze", str(run.path), "--no-figures", "--n-boot", "0", "--n-perm", "0"]) == 2
    _one_line_error(capsys, "exactly 0", "k >= 1")


# ------------------------------------------------------------------------------ 6. checksums


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_deltas_and_banks_are_refused(tmp_path, fitted):
    from perfit_probe.deltas import Deltas
    from perfit_probe.interventions.artifact import load_bank

    deltas = Deltas(["a", "b"], ["blocks.0.hook_resid_post"], torch.randn(2, 1, 8))
    deltas.save(tmp_path / "deltas")
    assert torch.equal(Deltas.load(tmp_path / "deltas").enhanced, deltas.enhanced)
    _flip_last_byte(tmp_path / "deltas" / "deltas.safetensors")  # still parses, one value changed
    with pytest.raises(CacheError, match="deltas.safetensors is corrupt"):
        Deltas.load(tmp_path / "deltas")
    run = _copy(fitted, tmp_path)
    _flip_last_byte(run / "perfit" / "bank" / "intervention.safetensors")
    with pytest.raises(ArtifactError, match="intervention.safetensors is corrupt"):
        load_bank(run / "perfit" / "bank")
    split = run / "perfit" / "split.json"
    split.write_text(split.read_text().replace('"seed": 0', '"seed": 1'))
    from perfit_probe.stages.fitted import load_fitted_run

    with pytest.raises(ArtifactError, match="split.json is corrupt"):
        load_fitted_run(run, _tiny())


# ------------------------------------------------------------------------------ 7. LaMP field types


def test_lamp_fields_of_the_wrong_json_type_are_refused(tmp_path):
    from perfit_probe.data.lamp import load_lamp

    base = {"id": "q1", "input": "Which category?", "profile": [{"id": "p1", "text": "t", "title": "x",
                                                                  "category": "c"}], "output": "sports"}
    cases = [(("profile", 0, "text"), ["a", "b"], "field 'text'", "a list"),
             (("profile", 0, "title"), {"x": 1}, "field 'title'", "an object"),
             (("input",), ["x"], "field 'input'", "a list"),
             (("id",), {"a": 1}, "field 'id'", "an object"),
             (("profile", 0, "extra"), [1], "field 'extra'", "a list"),
             (("output",), True, "field 'output'", "a boolean")]
    for keys, value, field, kind in cases:
        record = json.loads(json.dumps(base))
        target = record
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        path = tmp_path / "q.json"
        path.write_text(json.dumps([record]))
        with pytest.raises(DataError, match=f"q.json: record 0.*{field} must be a string or a number, got {kind}"):
            load_lamp("LaMP-2N", path)
    record = {**base, "profile": [{**base["profile"][0], "text": 4.5, "title": None}]}
    path.write_text(json.dumps([record]))
    item = load_lamp("LaMP-2N", path).users[0].profile[0]
    assert item.fields["text"] == "4.5" and item.fields["title"] == ""


# ------------------------------------------------------------------------------ 8. one line, not a traceback


def test_broken_model_files_fail_with_one_line(tmp_path, capsys):
    cases = {"empty.gguf": b"", "fake.gguf": os.urandom(3000), "magic.gguf": b"GGUF" + os.urandom(3000)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert main(["backends", "--model", str(tmp_path / name), "--cache-dir", str(tmp_path / "c")]) == 2
        _one_line_error(capsys, name, "GGUF")
    model = save_tiny_model(tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["backends", "--model", str(model)]) == 2
    _one_line_error(capsys, "could not load model", "SafetensorError")


def test_zero_sizes_fail_with_one_line(tmp_path, fitted, capsys):
    run = str(_copy(fitted, tmp_path))
    for argv, fragment in ((["evaluate", run, "--batch-size", "0"], "batch_size (0)"),
                           (["evaluate", run, "--max-new-tokens", "0"], "max_new_tokens (0)"),
                           (["steer", run, "--max-pairs", "0"], "max_pairs=0"),
                           (["steer", run, "--batch-size", "0"], "batch_size=0")):
        assert main(argv) == 2
        _one_line_error(capsys, fragment)


@pytest.mark.parametrize("toml, fragment", [
    ('[model]\nname = 1', "[model] name: expected a string, got int 1"),
    ('[task]\nn_users = "many"', "[task] n_users: expected an integer, got str"),
    ('[task]\nseed = 1.5', "[task] seed: expected an integer, got float"),
    ('[task]\nchat = "yes"', "[task] chat: expected true or false"),
    ('[fit]\nlayers = 8', "[fit] layers: expected a list"),
    ('[fit]\nlr1 = "fast"', "[fit] lr1: expected a number, got str"),
    ('[fit]\nepochs1 = true', "[fit] epochs1: expected an integer, got bool"),
    ('[cache]\nsites = "2,5"', "[cache] sites: expected a list"),
    ('[analyze]\ntaus = 0.9', "[analyze] taus: expected a list"),
    ('[evaluate]\nlora = 3', "[evaluate] lora: expected a table"),
    ('[evaluate]\nlora = {lr = "x"}', "[evaluate] lora.lr: expected a number"),
    ('[steer]\nalphas = ["a"]', "[steer] alphas[0]: expected a number"),
    ('stages = "cache"', "stages must be a list of stage names"),
])
def test_toml_values_of_the_wrong_type_fail_with_one_line(tmp_path, capsys, toml, fragment):
    path = tmp_path / "bad.toml"
    model = "" if toml.startswith("[model]") else f'[model]\nname = "{tmp_path / "no-model"}"\n'
    first, last = (toml + "\n", model) if toml.startswith("stages") else (model, toml + "\n")
    path.write_text(first + last)  # a model that fails fast, were the bad value to pass
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, fragment)
    assert "'c', 'a'" not in err
    assert not (tmp_path / "out").exists()


def test_a_huge_synthetic_task_is_refused_up_front(tmp_path, model_dir, capsys):
    from perfit_probe.data import load_task

    start = time.perf_counter()
    with pytest.raises(ConfigError, match="exceeds the synthetic task's limit"):
        load_task("synthetic", n_users=1_000_000)
    assert time.perf_counter() - start < 1
    assert main(["cache", "--model", str(model_dir), "--task", "synthetic", "--users", "1000000",
                 "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "at most 55,555 users")


# ------------------------------------------------------------------------------ 9. validate before the first stage


def test_pipeline_checks_every_stage_before_the_first_runs(tmp_path, model_dir, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nname = "{model_dir}"\n[task]\nname = "synthetic"\nn_users = 4\n'
                      '[cache]\nmax_queries = 2\nsites = ["1"]\n[fit]\nlayers = [9]\n')
    assert main(["run", str(config), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    _one_line_error(capsys, "layer 9 is out of range")
    assert not (tmp_path / "a").exists()
    capsys.readouterr()
    assert main(["demo", "--model", str(model_dir), "--task", "synthetic", "--users", "1",
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    _one_line_error(capsys, "at least 2 users")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------ 10. fit on another model's run


def test_fit_refuses_a_run_directory_made_with_another_model(tmp_path, model_dir, capsys):
    other = tiny_model("llama", seed=7)
    run = RunDir.create(tmp_path / "run", "cache", {}, 0, other.identity)
    assert main(["fit", "--model", str(model_dir), *FIT, "--out", str(run.path)]) == 2
    _one_line_error(capsys, "run.json was made with model 'tiny-llama'")
    assert not (run.path / "perfit").exists()


# ------------------------------------------------------------------------------ 11. smaller ones


def test_cache_failing_on_bad_options_leaves_nothing_behind(tmp_path, model_dir, capsys):
    out = tmp_path / "c"
    argv = ["cache", "--model", str(model_dir), "--task", "synthetic", "--users", "3", "--max-queries", "2",
            "--sites", "1", "--no-progress", "--out", str(out)]
    for bad, fragment in ((["--batch-size", "0"], "batch_size (0)"), (["--positions", "all"], "positions 'all'"),
                          (["--storage-dtype", "int8"], "--storage-dtype"), (["--variants", "plain,odd"], "odd")):
        assert main(argv + bad) == 2
        _one_line_error(capsys, fragment)
        assert not out.exists()
    assert main(argv) == 0  # no --resume needed


def test_relative_model_paths_are_recorded_absolute(tmp_path, monkeypatch):
    from perfit_probe.models import load_model

    save_tiny_model(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert load_model("m").identity.name == str((tmp_path / "m").resolve())


def test_a_malformed_manifest_is_rebuilt_by_resume(tmp_path, model_dir, capsys):
    from perfit_probe.cache_store import ActivationCache

    out = tmp_path / "c"
    argv = ["cache", "--model", str(model_dir), "--task", "synthetic", "--users", "3", "--max-queries", "2",
            "--sites", "1", "--shard-rows", "6", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    values = ActivationCache.open(out).select().values
    (out / "cache" / "manifest.json").write_text("{")
    with pytest.raises(CacheError, match="with --resume to rebuild it") as info:
        ActivationCache.open(out)
    assert "delete" not in str(info.value)
    assert main(argv + ["--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["cache"]
    assert metrics["computed_rows"] == 0 and metrics["skipped_shards"] == 3
    assert torch.equal(ActivationCache.open(out).select().values, values)
    # shards computed with other settings are not taken for these
    (out / "cache" / "manifest.json").write_text("{")
    assert main(argv + ["--resume", "--seed", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["cache"]["computed_rows"] == 18


def test_task_path_help_says_what_a_directory_is_for(capsys):
    for command in ("cache", "fit"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
        assert "--task-path" in text and "LaMP questions file" in text and "directory holding the MovieLens" in text


# ------------------------------------------------------------------------------ 12. progress


def test_the_oppu_task_lora_shows_progress_and_the_summary_says_where_time_went(tmp_path, fitted, capsys):
    from perfit_probe.stages.report import summary_lines

    run = _copy(fitted, tmp_path)
    capsys.readouterr()
    result = _evaluate(run, ("lora_task",), progress=True)
    assert "OPPU task LoRA" in capsys.readouterr().err
    assert set(result.wall_s) == {"lora_task"}
    RunDir.open(run).add_metrics("pipeline", {"stage_wall_s": {"cache": 12.0, "fit": 30.0, "evaluate": 500.0},
                                              "total_wall_s": 542.0, "peak_rss_gib": 1.0})
    RunDir.open(run).add_metrics("evaluate_wall_s", {"lora_task+oppu": 480.0, "base": 20.0})
    line = [x for x in summary_lines(RunDir.open(run)) if x.startswith("where the time went")][0]
    assert line == "where the time went: cache 12 s; fit 30 s; evaluate 500 s (lora_task+oppu 480 s, base 20 s)"


# ------------------------------------------------------------------------------ fuzzing the LaMP loaders

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lamp"
_JUNK = [None, True, False, 0, -3, 2.5, float("nan"), "", "x", "4", [], ["a"], [1, [2]], {}, {"id": 1},
         {"a": {"b": []}}, "é\u2028\x00"]


def _mutate(value, rng, depth: int = 0):
    """``value`` with one random malformation somewhere inside it (or replaced outright)."""
    if depth > 4 or rng.random() < 0.2 or not isinstance(value, (list, dict)) or not value:
        return _JUNK[int(rng.integers(len(_JUNK)))]
    value = list(value) if isinstance(value, list) else dict(value)
    if isinstance(value, list):
        i = int(rng.integers(len(value)))
        roll = rng.random()
        if roll < 0.15:
            del value[i]
        elif roll < 0.3:
            value.append(value[i])  # duplicates
        else:
            value[i] = _mutate(value[i], rng, depth + 1)
    else:
        key = list(value)[int(rng.integers(len(value)))]
        roll = rng.random()
        if roll < 0.25:
            del value[key]
        elif roll < 0.35:
            value["extra"] = _JUNK[int(rng.integers(len(_JUNK)))]
        else:
            value[key] = _mutate(value[key], rng, depth + 1)
    return value


def test_fuzzed_lamp_files_load_cleanly_or_raise_data_error(tmp_path):
    """A seeded generator of malformed questions, OPPU and outputs files: every load either
    succeeds (with text fields only) or raises the loader's ``DataError``, nothing else."""
    import numpy as np

    from perfit_probe.data import load_task

    rng = np.random.default_rng(16)
    sources = [("LaMP-2N", FIXTURES / "LaMP-2N_questions.json", FIXTURES / "LaMP-2N_outputs.json"),
               ("LaMP-3", FIXTURES / "LaMP-3_questions.json", FIXTURES / "LaMP-3_outputs.json"),
               ("LaMP-2M", FIXTURES / "OPPU-2M_user_history.json", FIXTURES / "OPPU-2M_user_history_label.json")]
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(600):
        task, questions, outputs = sources[trial % len(sources)]
        data, golds = json.loads(questions.read_text()), json.loads(outputs.read_text())
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.8:
                data = _mutate(data, rng)
            else:
                golds = _mutate(golds, rng)
        q_path, o_path = tmp_path / "q.json", tmp_path / "o.json"
        q_path.write_text(json.dumps(data))
        o_path.write_text(json.dumps(golds) if rng.random() < 0.9 else "{truncated")
        try:
            loaded = load_task(task, path=q_path, outputs=o_path if trial % 2 else None,
                               max_queries=int(rng.integers(0, 3)))
        except DataError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        except PerfitError as exc:  # pragma: no cover - reported with the input that caused it
            pytest.fail(f"trial {trial}: {type(exc).__name__} instead of DataError: {exc}")
        outcomes["loaded"] += 1
        texts = []
        for user in loaded.users:
            texts.append(user.id)
            for item in user.profile:
                texts += [item.id, *item.fields.values()] + ([item.date] if item.date is not None else [])
            for query in user.queries:
                texts += [query.id, query.input] + ([query.output] if query.output is not None else [])
        for text in texts:  # text, never the Python repr of a list, an object or a boolean
            assert isinstance(text, str) and not text.startswith(("[", "{")) and text not in ("True", "False")
    assert outcomes["loaded"] > 50 and outcomes["refused"] > 200, outcomes
