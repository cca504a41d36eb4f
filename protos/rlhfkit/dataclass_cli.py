"""Command lines generated from config dataclasses (TRL's HfArgumentParser idea, small).

Each field becomes --field-name with the field's type, default and help (from
`field(metadata={"help": ...})`); validation stays in the dataclass's __post_init__, so
the CLI and the Python API reject the same inputs with the same message. Shared by the
server and the trainers, hence in the root package rather than in either of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(tp):
    """int | None -> int; Literal['a','b'] -> (str, choices)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices
    return tp, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    # Required options first in --help (a config that extends a base lists the base's first).
    fields = sorted(fields, key=lambda f: f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    for f in fields:
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, choices = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kwargs = dict(help=help_text + ("" if required else f" (default: {default})"), required=required,
                      default=default, choices=choices)
        if typing.get_origin(tp) is list:
            kwargs.update(type=typing.get_args(tp)[0], nargs="*")
        else:
            kwargs.update(type=tp)
        parser.add_argument(flag, **kwargs)
    return parser


def dataclass_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
