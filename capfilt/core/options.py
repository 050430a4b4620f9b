"""Options declared once: each field of a stage's options dataclass carries its default, help
text, choices and range, and whether it shapes the stage's output.

The Typer command is derived from the dataclass (`capfilt.cli.options`), the checks run when
the dataclass is built (before any model loads), and the options that shape the output are
what the stage records as each shard's provenance:

    @dataclass(frozen=True)
    class CaptionOptions(Options):
        top_p: float = option(0.9, "Nucleus sampling probability mass.", gt=0, le=1, output=True)

Fields declared with plain `field()` or a bare default are library-only: no command-line
option, no checks.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from capfilt.core.errors import CapfiltError

_KEY = "capfilt"


@dataclass(frozen=True)
class Spec:
    """What a declared option is, beyond its type and default."""

    help: str
    choices: tuple | None = None
    ge: float | None = None  # value ≥ ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value ≤ le
    output: bool = False  # shapes the stage's output: part of every shard's provenance
    flag: str | None = None  # the command-line name, when not --field-name
    split: str | None = None  # tuple options: the command line gives one string, split on this
    cli_default: str | None = None  # the default shown in --help, when not the field's
    hidden: bool = False  # accepted on the command line, not listed in --help
    positional: bool = False  # a command-line argument rather than an --option


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices=None,
    ge=None,
    gt=None,
    le=None,
    output: bool = False,
    flag: str | None = None,
    split: str | None = None,
    cli_default: str | None = None,
    hidden: bool = False,
    positional: bool = False,
):
    """A dataclass field declaring one option (see the module docstring)."""
    spec = Spec(
        help=help,
        choices=tuple(choices) if choices is not None else None,
        ge=ge,
        gt=gt,
        le=le,
        output=output,
        flag=flag,
        split=split,
        cli_default=cli_default,
        hidden=hidden,
        positional=positional,
    )
    metadata = {_KEY: spec}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spec_of(field: dataclasses.Field) -> Spec | None:
    return field.metadata.get(_KEY)


def flag_of(field: dataclasses.Field) -> str:
    spec = spec_of(field)
    return (spec.flag if spec and spec.flag else None) or "--" + field.name.replace("_", "-")


def declared(cls) -> list[tuple[dataclasses.Field, Spec, Any]]:
    """(field, spec, type) of every declared option of an options class, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, spec_of(f), hints[f.name]) for f in dataclasses.fields(cls) if spec_of(f)]


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def range_text(spec: Spec) -> str | None:
    """'in (0, 1]', 'at least 1', '> 0' ... for a message, or None without a range."""
    low = ("(", spec.gt) if spec.gt is not None else ("[", spec.ge) if spec.ge is not None else None
    if low and spec.le is not None:
        return f"in {low[0]}{low[1]:g}, {spec.le:g}]"
    if spec.gt is not None:
        return f"> {spec.gt:g}"
    if spec.ge is not None:
        return f"at least {spec.ge:g}" if spec.ge >= 1 else f"≥ {spec.ge:g}"
    if spec.le is not None:
        return f"at most {spec.le:g}"
    return None


def check_value(field: dataclasses.Field, spec: Spec, value) -> None:
    """Raise a CapfiltError naming the option when `value` breaks its choices or range."""
    if value is None:
        return
    name = flag_of(field) if not spec.positional else field.name.upper()
    if spec.choices is not None:
        values = value if isinstance(value, tuple | list) else (value,)
        for one in values:
            if one not in spec.choices:
                raise CapfiltError(
                    f"{name} must be one of {', '.join(map(str, spec.choices))}, not {one!r}"
                )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and math.isnan(value):
        raise CapfiltError(f"{name} must be a number, got nan")
    ok = (
        (spec.ge is None or value >= spec.ge)
        and (spec.gt is None or value > spec.gt)
        and (spec.le is None or value <= spec.le)
    )
    if not ok:
        raise CapfiltError(f"{name} must be {range_text(spec)}, got {value:g}")


class Options:
    """Base of the options dataclasses: declared checks at construction, then `check()`."""

    def __post_init__(self) -> None:
        for field, spec, _ in declared(type(self)):
            check_value(field, spec, getattr(self, field.name))
        self.check()

    def check(self) -> None:
        """Rules between options (e.g. --min-length ≤ --max-length); raise CapfiltError."""

    def output_options(self) -> dict:
        """The options that shape the stage's output (recorded as each shard's provenance)."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f, spec, _ in declared(type(self))
            if spec.output
        }

    def to_record(self) -> dict:
        """Every option, JSON-ready, for the manifest."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
