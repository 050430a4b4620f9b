"""Typer parameters derived from an options dataclass (capfilt.core.options), so that each
option's name, default, help, choices and range are written once, in the stage module.

    @command()
    @with_options(CaptionOptions)
    def caption(dataset: DatasetArg, options: CaptionOptions):
        '''...'''
        caption_dataset(dataset, options)

The command's signature seen by Typer is the function's own parameters, with `options`
replaced by one parameter per declared option; the wrapper builds the dataclass from them, so
its checks run (and fail in one line) before any model loads.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import types
import typing
from typing import Annotated, Any

import typer

from capfilt.core.options import declared, default_of

OPTIONS_PARAM = "options"  # the command's parameter that receives the options


def with_options(
    options_cls,
    *,
    exclude: tuple[str, ...] = (),
    defaults: dict | None = None,
    required: tuple[str, ...] = (),
    choices: dict | None = None,
    given_only: bool = False,
):
    """Replace the `options` parameter of a command by the declared options of `options_cls`.

    `defaults`: other defaults for this command (finetune's, for instance).
    `required`: options this command requires although the dataclass has a default.
    `choices`: fewer choices for an option on this command (finetune's --task).
    `given_only`: pass a dict of the options given on the command line instead of building
    the dataclass (fetch merges them over a data manifest's settings); --help still shows the
    dataclass defaults.
    """
    defaults = defaults or {}

    def decorate(func):
        signature = inspect.signature(func)
        fields = [
            (field, spec, hint)
            for field, spec, hint in declared(options_cls)
            if field.name not in exclude
        ]
        derived = []
        for field, spec, hint in fields:
            default = defaults.get(field.name, default_of(field))
            if field.name in (choices or {}):
                spec = dataclasses.replace(spec, choices=tuple(choices[field.name]))
            if field.name in required:
                default = dataclasses.MISSING
            derived.append(_parameter(field, spec, hint, default, given_only))
        # Library-only fields with other defaults here (finetune's min_lr) are passed as well.
        hidden_defaults = {
            k: v for k, v in defaults.items() if k not in {f.name for f, _, _ in fields}
        }
        hints = typing.get_type_hints(func, include_extras=True)  # resolve string annotations
        params = []
        for p in signature.parameters.values():
            if p.name == OPTIONS_PARAM:
                params += derived
            else:
                annotation = hints.get(p.name, p.annotation)
                params.append(p.replace(annotation=annotation, kind=inspect.Parameter.KEYWORD_ONLY))
        specs = {f.name: spec for f, spec, _ in fields}
        # Split options give text: each part becomes the tuple's element type (float, int, str).
        element = {
            f.name: typing.get_args(_unwrap_optional(hint)[0])[0]
            for f, spec, hint in fields
            if spec.split and typing.get_origin(_unwrap_optional(hint)[0]) is tuple
        }
        # A repeated option given no times arrives as None; the field's default applies then.
        not_none = {f.name for f, _, hint in fields if not _unwrap_optional(hint)[1]}

        @functools.wraps(func)
        def wrapper(**kwargs):
            values = {name: _plain(kwargs.pop(name), spec) for name, spec in specs.items()}
            for name, kind in element.items():
                if values.get(name) is not None:
                    values[name] = _parts(name, values[name], kind)
            for name in not_none & {k for k, v in values.items() if v is None}:
                if name in defaults:
                    values[name] = defaults[name]
                else:
                    del values[name]
            if given_only:  # an option left out (None, or a flag not set) is not given
                values = {k: v for k, v in values.items() if v is not None and v is not False}
                kwargs[OPTIONS_PARAM] = values
            else:
                kwargs[OPTIONS_PARAM] = options_cls(**hidden_defaults, **values)
            return func(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the derived signature, not func's
        return wrapper

    return decorate


def _parameter(field, spec, hint, default, given_only: bool) -> inspect.Parameter:
    base, optional = _unwrap_optional(hint)
    help_text = spec.help
    shown = spec.cli_default
    python_type: Any = base
    cli_default = default
    given = default is not None and default is not dataclasses.MISSING
    if spec.choices is not None:
        python_type = _choice_enum(field.name, spec.choices)
        cli_default = python_type(default) if given else default
    elif typing.get_origin(base) is tuple:
        if spec.split:  # one string on the command line, split
            python_type = str
            cli_default = spec.split.join(map(str, default)) if given else default
        else:  # the option repeated
            python_type = list[typing.get_args(base)[0]]
            if given:
                cli_default = list(default) or None
    if given_only and base is not bool:
        # None means "not given": the manifest or the dataclass default applies.
        if shown is None and cli_default is not None:
            shown = cli_default.value if isinstance(cli_default, enum.Enum) else str(cli_default)
        cli_default = None
        optional = True
    if optional and python_type is not bool:
        python_type = python_type | None
    if shown is not None:  # written into the help, as click would show a plain default
        help_text = f"{help_text}  [default: {shown}]"
    info: dict = dict(help=help_text, hidden=spec.hidden)
    if shown is not None:
        info["show_default"] = False
    if spec.positional:
        typer_info = typer.Argument(**info)
    else:
        flags = [spec.flag] if spec.flag else []
        typer_info = typer.Option(*flags, **info)
    annotation = Annotated[python_type, typer_info]
    if default is dataclasses.MISSING:
        return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=cli_default, annotation=annotation
    )


def _unwrap_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


@functools.cache
def _choice_enum(name: str, choices: tuple) -> type[enum.Enum]:
    """A str Enum of the choices, which Typer shows in --help and checks."""
    return enum.Enum(
        "".join(part.title() for part in name.split("_")),
        {str(c): str(c) for c in choices},
        type=str,
    )


def _parts(name: str, parts: tuple, kind) -> tuple:
    from capfilt.core.errors import CapfiltError

    try:
        return tuple(kind(part) for part in parts)
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise CapfiltError(
            f"{flag} takes {kind.__name__} values, not {','.join(parts)!r}"
        ) from None


def _plain(value, spec):
    """A command-line value as the dataclass wants it (enums to str, lists to tuples)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return tuple(_plain(v, spec) for v in value)
    if spec.split and isinstance(value, str):
        return tuple(part.strip() for part in value.split(spec.split) if part.strip())
    return value
