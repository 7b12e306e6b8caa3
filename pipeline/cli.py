"""What the jobs share on the command line: flags made from a job's config dataclass (one flag
per field, its help the field's comment, with the default), and one line per mistake.

A user's mistake is a ``UserError``; ``main`` prints it as ``jobs.NAME: error: <message>`` on
stderr and exits with status 2, argparse's convention. Any other exception is a bug of ours and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import numbers
import os
import re
import sys
import types
import typing
from typing import Any, Callable, TypeVar

from pipeline.outputs import UserError

T = TypeVar("T")


class JobParser(argparse.ArgumentParser):
    """argparse with the usage line ``python -m jobs.NAME`` and errors as one line ``jobs.NAME: error: ...``."""

    def __init__(self, module: str, doc: str | None):
        super().__init__(prog=f"python -m {module}", description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.module = module

    def error(self, message: str) -> typing.NoReturn:  # one line, as every other mistake (no usage block)
        self.exit(2, f"{self.module}: error: {message} (the flags: python -m {self.module} --help)\n")


def field_comments(cls: type) -> dict[str, str]:
    """The trailing comment of each field line of a dataclass (``name: type = ...  # comment``),
    its base dataclasses' too (a subclass's own comment wins)."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"\s+(\w+): [^#]+?#\s*(.+)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


class _Numbers(argparse.Action):
    """Numbers given space- or comma-separated: ``--speeds 0 0.1 0.5`` or ``--speeds 0,0.1,0.5``."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = []
        for value in values:
            for part in str(value).split(","):
                if part.strip():
                    try:
                        out.append(float(part))
                    except ValueError:
                        parser.error(f"{option_string} takes numbers (space- or comma-separated), got {part!r}")
        setattr(namespace, self.dest, out)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def config_parser(module: str, doc: str | None, config: type, flags: dict[str, dict[str, Any]] | None = None,
                  skip: tuple[str, ...] = ()) -> JobParser:
    """A parser with one ``--flag-name`` per field of the dataclass ``config`` (but ``skip``):
    required when the field has no default, its type from the annotation (Literal -> choices,
    bool -> on/off switch, list -> several values), its help the field's comment and default.
    ``flags``: field -> extra ``add_argument`` keywords (e.g. another flag name)."""
    parser = JobParser(module, doc)
    hints = typing.get_type_hints(config)
    comments = field_comments(config)
    fields = dataclasses.fields(config)
    for f in sorted(fields, key=lambda f: _default(f) is not dataclasses.MISSING):  # the required flags first
        if f.name in skip:
            continue
        hint, default = hints[f.name], _default(f)
        args: dict[str, Any] = {"dest": f.name}
        optional = _is_optional(hint)
        base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
        if base is bool:
            args["action"] = argparse.BooleanOptionalAction if optional or default else "store_true"
        elif typing.get_origin(base) is typing.Literal:
            args.update(choices=list(typing.get_args(base)), type=str)
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            args.update(nargs="+", **({"action": _Numbers} if item is float else {"type": item}))
        else:
            args["type"] = base
        help_text = comments.get(f.name, "")
        if default is dataclasses.MISSING:
            args["required"] = True
            help_text += " (required)"
        else:
            args["default"] = default
            if not (base is bool and not default):
                help_text += f" (default: {_shown(default) if default is not None else 'none'})"
        args["help"] = help_text.strip()
        extra = dict((flags or {}).get(f.name, {}))
        names = extra.pop("names", [f"--{f.name.replace('_', '-')}"])
        args.update(extra)
        parser.add_argument(*names, **args)
    return parser


def check_fields(config: Any) -> None:
    """Each field of the dataclass ``config`` against its annotation, or a one-line ``UserError``:
    ``int`` (not a bool), ``float`` (an int or float), ``str`` (not empty), ``bool``,
    ``Literal[...]`` (one of its values), ``list[X]`` (of X's), each or None where the annotation
    allows it; other annotations are not checked. A tuple becomes a list, a numpy number an int or
    float, a path its string (``_plain``). Every job's config calls it first in
    ``__post_init__`` and then checks only ranges and relations."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        optional = _is_optional(hint)
        if optional and value is None:
            continue
        base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
        value = _plain(value, base)
        setattr(config, f.name, value)
        if not _fits(value, base):
            raise UserError(f"{type(config).__name__}.{f.name} must be {_kind(base)}"
                            f"{' or None' if optional else ''}, got {value!r}")


def _plain(value: Any, hint: Any) -> Any:
    """What Python code may pass for a field, as the plain value JSON and argparse give: a
    tuple as a list, a numpy number as int or float, a path as its string."""
    if typing.get_origin(hint) is list and isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_plain(v, typing.get_args(hint)[0] if typing.get_args(hint) else Any) for v in value]
    if hint in (int, float) and isinstance(value, numbers.Integral) and type(value) not in (bool, int):
        return int(value)
    if hint is float and isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
        return float(value)
    if isinstance(value, os.PathLike) and hint is str:
        return os.fspath(value)
    return value


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _fits(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and value != ""
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    return True


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) is list:
        return f"a list ({_kind(typing.get_args(hint)[0])} each)"
    return {bool: "True or False", int: "an integer", float: "a number", str: "a non-empty string"}.get(hint, str(hint))


def parse_config(parser: JobParser, config: Callable[..., T], argv: list[str] | None) -> T:
    """The config of the parsed arguments; a value the config refuses is reported like an
    argparse error (one line, exit status 2)."""
    values = vars(parser.parse_args(argv))
    try:
        return config(**values)
    except UserError as e:
        parser.exit(2, f"{parser.module}: error: {one_line(e)}\n")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def run_job(module: str, job: Callable[[], T]) -> T:
    """Run ``job``; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        return job()
    except UserError as e:
        sys.stderr.write(f"{module}: error: {one_line(e)}\n")
        raise SystemExit(2) from None
