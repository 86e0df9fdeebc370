"""`rapidin <step>`: one subcommand per function of rapidin.steps, its flags made from the function's signature.

A plain parameter `x` becomes `--x` (underscores as dashes; required without a default), a settings dataclass
parameter one flag per field (`CacheSettings.k` → `--k`), with the field's help and default. Values are
typed from the annotations: `true`/`false` for booleans, several values for lists, `None` for a missing
optional value (what Snakemake writes for a null config value).

A user error (bad record, bad setting, mismatched store) ends the command with one line
`rapidin: error: …` on stderr and exit status 2, leaving no output behind; a failing file system (disk
full, unreadable file) likewise, with exit status 1, leaving at most a resumable `<out>.partial` store.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import types
import typing
from pathlib import Path

from rapidin import __version__
from rapidin.errors import RapidinError
from rapidin.steps import STEPS, Store

NONE = "None"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _store(text: str) -> str:
    """A Zarr store's directory, given it or its zarr.json."""
    path = Path(text)
    return str(path.parent) if path.name == "zarr.json" else text


def _converter(annotation) -> tuple[typing.Callable[[str], typing.Any], type | None]:
    """(str → value, the container of several values or None) for a type annotation."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (annotation,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(annotation) or annotation
    several = origin if origin in (list, tuple) else None
    if several:
        item = (typing.get_args(annotation) or (str,))[0]
        annotation = item if item is not Ellipsis else str
    convert = {bool: _boolean, int: int, float: float, dict: json.loads, Store: _store}.get(annotation, str)
    if not optional:
        return convert, several
    return (lambda text: None if text == NONE else convert(text)), several


class _Several(argparse.Action):
    """Stores several values in their container (list or tuple); a lone `None` is no value."""

    def __init__(self, *args, collection: type = list, **kwargs):
        super().__init__(*args, **kwargs)
        self.collection = collection

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, None if values == [None] else self.collection(values))


def _add(parser: argparse.ArgumentParser, name: str, annotation, default, help_text: str) -> None:
    convert, several = _converter(annotation)
    required = default is inspect.Parameter.empty
    shown = "" if required or default in (None, "", [], ()) else f" (default: {default})"
    options = {"nargs": "+", "action": _Several, "collection": several} if several else {}
    parser.add_argument(
        _flag(name),
        dest=name,
        type=convert,
        required=required,
        default=None if required else default,
        help=f"{help_text}{shown}",
        **options,
    )


def _io_help(func) -> dict[str, str]:
    """The `Args:` lines of a step's docstring: {parameter: help}."""
    lines = inspect.getdoc(func).splitlines()
    start = lines.index("Args:") + 1 if "Args:" in lines else len(lines)
    return dict(line.strip().split(": ", 1) for line in lines[start:] if ": " in line)


def _add_step(steps, func) -> None:
    help_text = inspect.getdoc(func).splitlines()[0]
    parser = steps.add_parser(func.__name__.replace("_", "-"), help=help_text, description=help_text)
    hints, io_help = typing.get_type_hints(func), _io_help(func)
    groups = {}
    for name, parameter in inspect.signature(func).parameters.items():
        if dataclasses.is_dataclass(hints[name]):
            groups[name], field_types = hints[name], typing.get_type_hints(hints[name])
            for field in dataclasses.fields(hints[name]):
                help_text = f"{field.metadata.get('help', '')} [{field.metadata.get('key', field.name)}]"
                _add(parser, field.name, field_types[field.name], getattr(parameter.default, field.name), help_text)
        else:
            _add(parser, name, hints[name], parameter.default, io_help.get(name, ""))
    parser.set_defaults(func=func, groups=groups)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rapidin {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for func in STEPS:
        _add_step(steps, func)
    return parser


def _call(args: argparse.Namespace) -> None:
    """Call the step with its parsed flags: settings fields gathered into their dataclasses."""
    values = vars(args)
    kwargs = {}
    for name in inspect.signature(args.func).parameters:
        cls = args.groups.get(name)
        kwargs[name] = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) if cls else values[name]
    args.func(**kwargs)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        _call(args)
    except RapidinError as error:
        print(f"rapidin: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # the environment's fault, not a bug: no traceback either
        print(f"rapidin: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
