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
