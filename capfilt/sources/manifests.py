"""Data manifests (data_manifests/*.toml): where a known source comes from and how."""

from __future__ import annotations

import os

from capfilt.core.errors import CapfiltError


def load_manifest(path: str | os.PathLike) -> dict:
    """Parse a data manifest TOML, or raise a CapfiltError naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise CapfiltError(
            f"data manifest {str(path)!r} not found; see data_manifests/ for the known sources"
        ) from e
    except (OSError, ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CapfiltError(f"cannot read data manifest {str(path)!r}: {why}") from e


def manifest_options(path, table_name: str, options_cls, overrides: dict, refused=frozenset()):
    """`options_cls` from a manifest's `[table_name]` table (each value checked against the
    field's type), then `overrides` (the options given on the command line) on top; and the
    manifest's `[source]` table. Fields in `refused` cannot be set from a manifest."""
    from dataclasses import fields

    manifest = load_manifest(path)
    table = manifest.get(table_name)
    if not isinstance(table, dict):
        raise CapfiltError(
            f"{path} has no [{table_name}] table: this source is not fetched from URLs"
            + (
                "; it is local data: use `capfilt ingest` as its [ingest] table and command say"
                if "ingest" in manifest
                else ""
            )
        )
    types = {f.name: str(f.type) for f in fields(options_cls) if f.name not in refused}
    settings = {
        k: _checked(path, table_name, k, v, types[k]) for k, v in table.items() if k in types
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    source = manifest.get("source", {})
    if not isinstance(source, dict):
        raise CapfiltError(f"{path}: [source] must be a table, not {type(source).__name__}")
    return options_cls(**settings), dict(source)


def _checked(path, table_name: str, key: str, value, annotation: str):
    """A manifest value checked against the field's type (fuzzing found the traceback)."""
    if annotation.startswith("tuple"):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        wanted = "a list of strings"
        value = tuple(value) if ok else value
    elif annotation.startswith("bool"):
        ok, wanted = isinstance(value, bool), "true or false"
    elif annotation.startswith("int"):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif annotation.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        wanted = "a number"
    else:  # str, or str | None
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise CapfiltError(f"{path}: [{table_name}] {key} must be {wanted}, not {value!r}")
    return value
