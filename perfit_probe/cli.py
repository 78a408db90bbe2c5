"""The ``perfit-probe`` command line, generated from the typed configs by ``tyro``.

Each sub-command is a typed function in ``perfit_probe.commands``; its parameters, and the
fields of the ``perfit_probe.config`` classes it takes, are its options (a config's fields
flat: ``--k``, not ``--config.k``; nested configs with a prefix: ``--lora.lr``), their
docstrings the help, their ``Literal`` types the choices. Lists are comma-separated
(``--layers 8,12``). A bad option, like any ``PerfitError``, becomes a one-line message on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
import functools
from typing import Any, Callable, Sequence, get_args

import tyro
from tyro import _errors as tyro_errors
from tyro.conf import UseAppendAction
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from perfit_probe import __version__
from perfit_probe.commands.analyze import analyze
from perfit_probe.commands.backends import backends
from perfit_probe.commands.cache import cache
from perfit_probe.commands.demo import demo
from perfit_probe.commands.evaluate import evaluate
from perfit_probe.commands.fit import fit
from perfit_probe.commands.interpret import interpret
from perfit_probe.commands.run import run
from perfit_probe.commands.steer import steer
from perfit_probe.commands.tune import tune
from perfit_probe.errors import PerfitError

COMMANDS: dict[str, Callable[..., int]] = {
    "demo": demo, "run": run, "backends": backends, "cache": cache, "analyze": analyze, "fit": fit,
    "evaluate": evaluate, "steer": steer, "interpret": interpret, "tune": tune,
}
"""Sub-commands in the order ``--help`` lists them."""

REGISTRY = ConstructorRegistry()
"""How option values are read beyond tyro's defaults: sequences as one comma-separated value."""


class UsageError(PerfitError):
    """The command line itself is wrong (unknown option, bad choice, missing argument)."""


@REGISTRY.primitive_rule
def comma_separated(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """``tuple[X, ...]`` and ``list[X]`` as one comma-separated value (``--layers 8,12``), each
    item read as ``X`` is (a ``Literal`` item must be one of its choices); repeatable options
    (``UseAppendAction``) keep one item per use."""
    args = get_args(info.type)
    if info.type_origin not in (tuple, list) or UseAppendAction in info.markers:
        return None
    if info.type_origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return None
    inner = ConstructorRegistry.get_primitive_spec(PrimitiveTypeInfo.make(args[0], info.markers))
    if not isinstance(inner, PrimitiveConstructorSpec) or inner.nargs != 1:
        return None
    keep_text = str in get_args(args[0])  # ``list[str | int]``: sites stay as written

    def from_text(tokens: list[str]) -> Any:
        items = [item.strip() for item in tokens[0].split(",") if item.strip()]
        bad = [item for item in items if inner.choices is not None and item not in inner.choices]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} not among {','.join(inner.choices)}")
        return info.type_origin(item if keep_text else inner.instance_from_str([item]) for item in items)

    metavar = "{" + ",".join(inner.choices) + "}" if inner.choices else inner.metavar
    return PrimitiveConstructorSpec(
        nargs=1, metavar=f"{metavar},...", instance_from_str=from_text,
        is_instance=lambda value: isinstance(value, info.type_origin),
        str_from_instance=lambda value: [",".join(str(item) for item in value)],
    )


def _one_line(event: Any) -> None:
    """tyro's parse-error hook: a ``UsageError`` of one line instead of tyro's box."""
    if isinstance(event, tyro_errors.InvalidChoice):
        text = (f"invalid choice {event.value!r} for {event.argument.display_name()}: "
                f"choose from {', '.join(event.choices)}")
    elif isinstance(event, tyro_errors.InstantiationFailure):
        name = event.argument.display_name() if event.argument is not None else "an option"
        text = f"bad value for {name}: {' '.join(event.message.split())}"
    elif isinstance(event, tyro_errors.BadValue):
        name, given = event.argument.display_name(), event.offending_value
        text = f"{name} needs a value" if given is None else f"{name} cannot take {given!r}"
    elif isinstance(event, tyro_errors.UnrecognizedArgs):
        text = f"unrecognized argument(s) {' '.join(event.tokens)}"
    elif isinstance(event, tyro_errors.MissingArgs):
        names = ", ".join(a.arg.display_name() for a in event.missing_arguments)
        text = f"missing required argument(s) {names}"
    elif isinstance(event, tyro_errors.MutexConflict):
        text = f"{event.first_token} and {event.second_token} cannot be given together"
    else:
        text = f"invalid arguments ({type(event).__name__})"
    raise UsageError(text)


def parse(argv: Sequence[str]) -> functools.partial:
    """The chosen command with its parsed options bound, not yet called (``UsageError`` for a bad
    command line)."""
    with tyro_errors.on_parse_error(_one_line):
        return tyro.extras.subcommand_cli_from_dict(
            {name: _deferred(function) for name, function in COMMANDS.items()},
            prog="perfit-probe", description="Study and use personalization shifts in LLM hidden states (PerFit).",
            args=list(argv), registry=REGISTRY)


def _deferred(function: Callable[..., int]) -> Callable[..., functools.partial]:
    """``function`` with the same options, returning the call (a ``functools.partial``) instead of
    making it, so that its errors are reported as the command's, not as option-parsing failures."""

    @functools.wraps(function)
    def bind(*args: Any, **kwargs: Any) -> functools.partial:
        return functools.partial(function, *args, **kwargs)

    return bind


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"perfit-probe {__version__}")
        return 0
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    argv = argv[1:] if verbose else argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "transformer_lens", "nnsight"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    command = next((arg for arg in argv if arg in COMMANDS), "")
    try:
        return int(parse(argv)() or 0)
    except UsageError as exc:
        print(f"{' '.join(['perfit-probe', command]).strip()}: error: {exc} "
              f"(see {' '.join(['perfit-probe', command, '--help']).replace('  ', ' ')})", file=sys.stderr)
        return 2
    except PerfitError as exc:
        print(f"{' '.join(['perfit-probe', command]).strip()}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{' '.join(['perfit-probe', command]).strip()}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
