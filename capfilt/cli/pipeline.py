"""`capfilt run pipelines/X.toml`: a pipeline file is a list of capfilt commands with options.

    [pipeline]
    name = "blip-base-cc3m"
    dataset = "data/cc3m"            # {dataset} in args; the default positional argument

    [[stage]]
    command = "caption"              # any capfilt command
    args = ["{dataset}"]             # positional arguments (default: ["{dataset}"])
    num_captions = 3                 # options: --num-captions 3
    overwrite = false                # booleans: --overwrite / --no-overwrite

Every stage goes through the same command-line parser as when typed, so a pipeline accepts
exactly the options `capfilt COMMAND --help` lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from capfilt.core.errors import CapfiltError


@dataclass(frozen=True)
class Stage:
    command: str
    args: tuple[str, ...]
    options: dict = field(default_factory=dict)

    def argv(self) -> list[str]:
        """The command line for this stage, as `capfilt` would parse it."""
        argv = [self.command, *self.args]
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + name.replace("_", "-"))
            elif isinstance(value, list):
                for item in value:
                    argv += [flag, str(item)]
            else:
                argv += [flag, str(value)]
        return argv


@dataclass(frozen=True)
class Pipeline:
    name: str
    variables: dict
    stages: tuple[Stage, ...]


def load_pipeline(path: str | Path, overrides: dict | None = None) -> Pipeline:
    """Read a pipeline TOML; `overrides` replace [pipeline] variables such as `dataset`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CapfiltError(f"pipeline file {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CapfiltError(f"pipeline file {str(path)!r} is not valid TOML: {e}") from None
    header = data.get("pipeline", {})
    if not isinstance(header, dict):
        raise CapfiltError(f"{path}: [pipeline] must be a table")
    variables = {k: v for k, v in header.items() if not isinstance(v, dict | list)}
    variables.update(overrides or {})
    raw_stages = data.get("stage")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise CapfiltError(f"{path}: no [[stage]] tables; add at least one stage")
    stages = []
    for i, raw in enumerate(raw_stages, 1):
        if not isinstance(raw, dict):  # `stage = [1, 2]` rather than [[stage]] tables
            raise CapfiltError(
                f"{path}: stage {i} must be a [[stage]] table, not {type(raw).__name__}"
            )
        raw = dict(raw)
        command = raw.pop("command", None)
        if not isinstance(command, str):
            raise CapfiltError(f'{path}: stage {i} has no `command = "..."`')
        args = raw.pop("args", ["{dataset}"])
        if not isinstance(args, list):
            raise CapfiltError(f"{path}: stage {i} ({command}): `args` must be a list")
        try:
            args = tuple(_expand(str(a), variables) for a in args)
            options = {k: _expand_value(v, variables) for k, v in raw.items()}
        except KeyError as e:
            raise CapfiltError(
                f"{path}: stage {i} ({command}) uses {{{e.args[0]}}}, which [pipeline] does not set"
            ) from None
        except _NotAField as e:
            raise CapfiltError(f"{path}: stage {i} ({command}) {e}") from None
        stages.append(Stage(command, args, options))
    _check_commands(path, stages)
    return Pipeline(str(variables.get("name", path.stem)), variables, tuple(stages))


class _NotAField(ValueError):
    """A `{...}` in a pipeline value that is not a variable: the message says what it is."""


# `{{` and `}}` are literal braces, `{name}` a variable; any other brace is refused.
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def _expand(text: str, variables: dict) -> str:
    """`text` with each {name} replaced by its variable, once (a value is never expanded
    again, so variables that name each other cannot loop). Only plain names: unlike
    str.format, `{name.attr}`, `{name[0]}` and `{0}` reach no Python object."""
    if "{" not in text:
        return text

    def field(match: re.Match) -> str:
        token, name = match.group(0), match.group(1)
        if token in ("{{", "}}"):
            return token[0]
        if name is None:
            raise _NotAField(
                f"has an unbalanced brace in {text!r}; write {{{{ or }}}} for a literal one"
            )
        if not name.isidentifier():
            raise _NotAField(
                f"uses {{{name}}}, which is not a variable name; a value may hold {{name}} "
                "of a [pipeline] variable, and {{ or }} for a literal brace"
            )
        if name not in variables:
            raise KeyError(name)
        return str(variables[name])

    return _FIELD.sub(field, text)


def _check_commands(path: Path, stages: list[Stage]) -> None:
    """Refuse, before any stage runs, a command capfilt does not have: found at stage 5, it
    would fail hours into a run (and no stage may name anything but a capfilt command)."""
    from typer.main import get_command

    from capfilt.cli import app

    commands = get_command(app).commands
    for i, stage in enumerate(stages, 1):
        if stage.command not in commands:
            raise CapfiltError(
                f"{path}: stage {i} ({stage.command}) is not a capfilt command; the commands: "
                f"{', '.join(sorted(commands))}"
            )


def _expand_value(value, variables: dict):
    """An option's value with {variables} filled in: a string, or each string of a list."""
    if isinstance(value, str):
        return _expand(value, variables)
    if isinstance(value, list):
        return [_expand_value(item, variables) for item in value]
    return value
