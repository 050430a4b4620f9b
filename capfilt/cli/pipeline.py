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
        stages.append(Stage(command, args, options))
    return Pipeline(str(variables.get("name", path.stem)), variables, tuple(stages))


def _expand(text: str, variables: dict) -> str:
    return text.format(**variables) if "{" in text else text


def _expand_value(value, variables: dict):
    """An option's value with {variables} filled in: a string, or each string of a list."""
    if isinstance(value, str):
        return _expand(value, variables)
    if isinstance(value, list):
        return [_expand_value(item, variables) for item in value]
    return value
