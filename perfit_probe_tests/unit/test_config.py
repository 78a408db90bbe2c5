"""The typed configuration: unknown keys and wrong types refused in one line, choices defined
once and offered by the CLI, help generated from the fields, shared parts with one default."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Literal, get_args

import pytest

from perfit_probe import config as C
from perfit_probe.cli import COMMANDS, main, parse
from perfit_probe.errors import ConfigError

POSITIONAL = {"run": ["x.toml"], "analyze": ["run"], "evaluate": ["run"], "steer": ["run"], "interpret": ["run"]}
"""Positional arguments each command needs to parse."""
REQUIRED = {"run": ["--out", "o"], "cache": ["--out", "o"], "fit": ["--out", "o"], "tune": ["--out", "o"]}
"""Required options each command needs to parse."""


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _config_params(function) -> dict[str, type]:
    """A command's parameters whose type is a config class (the flattened ones)."""
    hints = typing.get_type_hints(function, include_extras=True)
    out = {}
    for name, hint in hints.items():
        base = get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if dataclasses.is_dataclass(base):
            out[name] = base
    return out


def _choices(annotation) -> tuple[tuple[str, ...], bool]:
    """The Literal choices of a field type, and whether the field holds several of them."""
    origin, args = typing.get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return args, False
    if origin is Annotated:
        return _choices(args[0])
    if origin is tuple:
        return _choices(args[0])[0], True
    for arg in args:  # X | None
        choices, many = _choices(arg)
        if choices:
            return choices, many
    return (), False


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())


# ---------------------------------------------------------------- unknown keys and wrong types


def test_unknown_key_in_a_constructor_is_refused_in_one_line():
    with pytest.raises(ConfigError) as exc:
        C.FitConfig(layerz=(8,))
    assert _one_line(exc) == "FitConfig: unknown key(s) ['layerz']"
    with pytest.raises(ConfigError, match=r"EvalConfig: unknown key\(s\) \['methdos'\]"):
        C.EvalConfig(methdos=("base",))


def test_unknown_key_in_toml_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    for text, message in [
        ("[fit]\nlayerz = [8]", "[fit]: unknown key(s) ['layerz']; see the fields of FitConfig"),
        ("[model]\nnmae = 'x'", "[model]: unknown key(s) ['nmae']; allowed: ['dtype', 'device', 'name']"),
        ("[evaluate.lora]\nrnak = 4", "[evaluate]: unknown key(s) ['lora.rnak']"),
        ("[extra]\na = 1", "unknown section(s) ['extra']; known: ["),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            C.load_pipeline_config(path)
        assert _one_line(exc).startswith(f"{path}: {message}"), str(exc.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lr1": "fast"}, "FitConfig lr1: expected a number, got str 'fast'"),
    ({"epochs1": True}, "FitConfig epochs1: expected an integer, got bool True"),
    ({"n_users": 2.5}, "FitConfig n_users: expected an integer, got float 2.5"),
    ({"share_weights": "no"}, "FitConfig share_weights: expected true or false, got str 'no'"),
    ({"layers": 8}, "FitConfig layers: expected a list, got int 8"),
    ({"layers": (8, "12")}, "FitConfig layers[1]: expected an integer, got str '12'"),
    ({"intervention": "lora"}, "FitConfig intervention: expected one of 'loreft', 'noreft' or 'lobireft'"),
])
def test_wrong_types_are_refused_in_one_line(kwargs, fragment):
    with pytest.raises(ConfigError) as exc:
        C.FitConfig(**kwargs)
    assert fragment in _one_line(exc)


def test_lists_and_strings_are_accepted_for_tuples_and_paths():
    config = C.FitConfig(layers=[3, 5], task_path="data/x.json")
    assert config.layers == (3, 5) and config.task_path == Path("data/x.json")
    assert C.FitConfig(n_users=0).n_users is None  # 0 means all, as on the command line


# ---------------------------------------------------------------- choices defined once


def test_runtime_tuples_are_the_literal_types():
    from perfit_probe.analysis.collective import CLASSIFIERS
    from perfit_probe.analysis.nulls import BOOTSTRAPS, SOURCES
    from perfit_probe.backends import BACKEND_NAMES
    from perfit_probe.data.records import VARIANTS
    from perfit_probe.data.retrieval import RETRIEVERS
    from perfit_probe.evaluation.baselines import BASELINES
    from perfit_probe.evaluation.evaluate import METHODS
    from perfit_probe.interventions.modules import INITS, INTERVENTION_KINDS

    assert BACKEND_NAMES == get_args(C.Backend) and RETRIEVERS == get_args(C.Retriever)
    assert INTERVENTION_KINDS == get_args(C.InterventionKind) and INITS == get_args(C.Init)
    assert VARIANTS == get_args(C.Variant) and SOURCES == get_args(C.AnalysisSource)
    assert CLASSIFIERS == get_args(C.Classifier) and BOOTSTRAPS == get_args(C.Bootstrap)
    assert METHODS == get_args(C.Method) and tuple(BASELINES) == get_args(C.Baseline)


def test_every_literal_choice_is_accepted_by_the_cli():
    tried = 0
    for command, function in COMMANDS.items():
        base = [command, *POSITIONAL.get(command, []), *REQUIRED.get(command, [])]
        for param, cls in _config_params(function).items():
            for field in dataclasses.fields(cls):
                choices, many = _choices(typing.get_type_hints(cls, include_extras=True)[field.name])
                option = "--" + field.name.replace("_", "-")
                values = [",".join(choices)] if many else list(choices)
                for value in values if choices else []:
                    if command == "fit" and field.name == "personal_init" and value == "stage1":
                        continue  # needs equal ranks: checked by validate, not by the parser
                    bound = parse([*base, option, value])
                    got = getattr(bound.keywords[param], field.name)
                    assert got == (tuple(choices) if many else value), (command, option, value, got)
                    tried += 1
    assert tried > 60


def test_cli_refuses_a_choice_outside_the_literal_in_one_line(capsys):
    assert main(["fit", "--out", "o", "--retriever", "tfidf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("perfit-probe fit: error: invalid choice 'tfidf' for --retriever: choose from bm25, recent, "
                   "random (see perfit-probe fit --help)")
    assert main(["evaluate", "run", "--methods", "base,magic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'magic' not among base,rag," in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- help from the fields


def test_cli_help_lists_every_config_field(capsys):
    for command, function in COMMANDS.items():
        text = _help(command, capsys)
        for cls in _config_params(function).values():
            for field in dataclasses.fields(cls):
                hint = typing.get_type_hints(cls)[field.name]
                if dataclasses.is_dataclass(hint):  # a nested config: its fields under a prefix
                    prefix = field.name.replace("_", "-")
                    names = [f"--{prefix}.{f.name.replace('_', '-')}" for f in dataclasses.fields(hint)]
                else:
                    names = ["--" + field.name.replace("_", "-")]
                for name in names:
                    assert re.search(re.escape(name) + r"(?![\w-])", text), (command, name)
    text = _help("fit", capsys)
    assert "Rank of each user's intervention (paper: 4-32)" in text and "--users" in text


# ---------------------------------------------------------------- shared parts, one default


def test_shared_parts_have_one_default():
    task, fields = C.TaskConfig(), C.TaskFields()
    assert (fields.task, fields.task_path, fields.task_outputs) == (task.name, task.path, task.outputs)
    for name in ("n_users", "max_queries", "seed", "k", "retriever", "chat"):
        assert getattr(fields, name) == getattr(task, name) == getattr(C.CacheConfig(), name) == \
            getattr(C.FitConfig(), name), name
    assert C.ModelFields().model == C.ModelConfig().name
    fit = C.FitConfig()
    for stage in (1, 2):  # what FitConfig passes on to each stage's TrainConfig
        train = fit.train_config(stage)
        assert (train.rows_per_forward, train.batch_size, train.weight_decay, train.max_grad_norm) == \
            (fit.rows_per_forward, fit.batch_size, fit.weight_decay, fit.max_grad_norm)
    assert C.TrainConfig().rows_per_forward == fit.rows_per_forward


def test_pipeline_passes_task_and_model_to_the_stages_and_sections_override():
    config = C.pipeline_config({"model": {"name": "m", "dtype": "bfloat16"},
                                "task": {"name": "synthetic", "n_users": 6, "seed": 3, "k": 2},
                                "fit": {"n_users": 4, "k": 3}})
    assert (config.cache.task, config.cache.n_users, config.cache.k, config.cache.model) == ("synthetic", 6, 2, "m")
    assert (config.fit.n_users, config.fit.k, config.fit.dtype) == (4, 3, "bfloat16")
    assert config.evaluate.k == 2 and config.evaluate.retriever is None  # only what [task] sets
    assert {stage.seed for stage in C.stage_configs(config).values()} == {3}
    assert C.pipeline_config({}) == C.PipelineConfig()
