"""The dataset folder: stage paths, shard discovery, done/pending shards and the manifest.

A DATASET is a folder (local path or any fsspec URL):

    capfilt.json            manifest: source and every stage run
    images/00000.parquet    img2dataset's schema (+ 00000_stats.json)
    captions/00000.parquet  one row per synthetic caption
    scores/00000.parquet    ITM/ITC score of every web and synthetic caption
    curated/00000.parquet   the kept pairs
    reports/

Shards are aligned by number across folders; a shard file appears only when complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import fsspec

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError, StageNotRunError

STAGES = ("images", "captions", "scores", "curated")
MANIFEST = "capfilt.json"
_SHARD_FILE = re.compile(r"^(\d{5,})\.parquet$")


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


class Dataset:
    """One dataset folder. Only this module and `io` know file names."""

    def __init__(self, root: str, storage_options: dict | None = None):
        root = str(root).rstrip("/") or "/"
        self.root = root
        self.fs, self.path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        self.path = self.path.rstrip("/")

    def __repr__(self) -> str:
        return f"Dataset({self.root!r})"

    @property
    def is_local(self) -> bool:
        return "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    # paths ---------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def url(self, *parts: str) -> str:
        """A path that other tools (img2dataset, DuckDB) can open: local path or full URL."""
        if self.is_local:
            return os.path.join(self.path, *parts)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://" + "/".join([self.path, *parts])

    def stage_dir(self, stage: str) -> str:
        return self.join(stage)

    def shard_path(self, stage: str, shard: int) -> str:
        return self.join(stage, f"{shard_name(shard)}.parquet")

    def stats_path(self, stage: str, shard: int) -> str:
        return self.join(stage, f"{shard_name(shard)}_stats.json")

    def reports_dir(self) -> str:
        return self.join("reports")

    # checks --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def ensure_writable(self) -> None:
        """Create the folder, or raise a CapfiltError saying why it cannot be written."""
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            probe = self.join(".capfilt-write-probe")
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as e:
            raise CapfiltError(
                f"cannot write to dataset folder {self.root!r}: {e}. "
                "Pass a folder you can write to."
            ) from e

    # shards --------------------------------------------------------------------------------
    def shards(self, stage: str) -> list[int]:
        """Numbers of the complete shard files of `stage`, sorted."""
        folder = self.stage_dir(stage)
        if not self.fs.exists(folder):
            return []
        found = []
        for entry in self.fs.ls(folder, detail=False):
            m = _SHARD_FILE.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def has_stage(self, stage: str) -> bool:
        return bool(self.shards(stage))

    def require_stage(self, stage: str, hint: str) -> list[int]:
        shards = self.shards(stage)
        if not shards:
            raise StageNotRunError(f"{self.root!r} has no {stage}/ shards yet; {hint}")
        return shards

    def pending(self, source: str, target: str, overwrite: bool = False) -> list[int]:
        """Shards of `source` whose `target` shard is missing (all of them with overwrite)."""
        done = set() if overwrite else set(self.shards(target))
        return [s for s in self.shards(source) if s not in done]

    def write_shard(self, stage: str, shard: int, table) -> str:
        self.fs.makedirs(self.stage_dir(stage), exist_ok=True)
        path = self.shard_path(stage, shard)
        io.write_table_atomic(self.fs, path, table)
        return path

    def read_shard(self, stage: str, shard: int, columns: list[str] | None = None):
        return io.read_table(self.fs, self.shard_path(stage, shard), columns=columns)

    def read_stage(self, stage: str, columns: list[str] | None = None):
        import pyarrow as pa

        tables = [self.read_shard(stage, s, columns) for s in self.shards(stage)]
        return pa.concat_tables(tables) if tables else None

    def remove_temp_files(self, stage: str) -> None:
        """Delete temporary files a killed run left behind."""
        folder = self.stage_dir(stage)
        if not self.fs.exists(folder):
            return
        for entry in self.fs.ls(folder, detail=False):
            if ".tmp-" in entry.rsplit("/", 1)[-1]:
                self.fs.rm(entry, recursive=True)

    # manifest ------------------------------------------------------------------------------
    def read_manifest(self) -> dict:
        path = self.join(MANIFEST)
        if not self.fs.exists(path):
            return {"format": 1, "source": None, "runs": []}
        try:
            with self.fs.open(path, "rb") as f:
                manifest = json.load(f)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else e
            raise CapfiltError(
                f"{path} is not valid JSON ({why}); restore it or delete it to start a new manifest"
            ) from e
        if not isinstance(manifest, dict):
            raise CapfiltError(f"{path} must hold a JSON object; restore it or delete it")
        manifest.setdefault("runs", [])
        # Stages read these two keys; a hand-edited or damaged file must not become a traceback.
        runs, source = manifest["runs"], manifest.get("source")
        if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
            raise CapfiltError(
                f"{path}: 'runs' must be a list of objects; restore the file or delete it to "
                "start a new manifest"
            )
        if source is not None and not isinstance(source, dict):
            raise CapfiltError(
                f"{path}: 'source' must be an object or null; restore the file or delete it"
            )
        return manifest

    @contextmanager
    def _manifest_lock(self):
        if not self.is_local:
            yield
            return
        import fcntl

        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, ".capfilt.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update_manifest(self, change: Callable[[dict], None]) -> dict:
        """Read, change and atomically rewrite the manifest (serialised between processes)."""
        with self._manifest_lock():
            manifest = self.read_manifest()
            change(manifest)
            data = json.dumps(manifest, indent=2, sort_keys=False, default=str).encode()
            self.fs.makedirs(self.path, exist_ok=True)
            if self.is_local:  # under the lock, any other temp manifest is a killed writer's
                self._remove_stale_manifests()
            io.write_bytes_atomic(self.fs, self.join(MANIFEST), data)
        return manifest

    def _remove_stale_manifests(self) -> None:
        prefix = f".{MANIFEST}.tmp-"
        for entry in self.fs.ls(self.path, detail=False):
            if entry.rsplit("/", 1)[-1].startswith(prefix):
                self.fs.rm(entry)

    def record_run(self, stage: str, options: dict, counts: dict, **extra) -> dict:
        """Append one stage run (command, options, versions, time, counts) to the manifest."""
        run = {
            "stage": stage,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "options": options,
            "counts": counts,
            "versions": package_versions(),
            **extra,
        }
        return self.update_manifest(lambda m: m["runs"].append(run))

    def set_source(self, source: dict) -> dict:
        def change(m: dict) -> None:
            m["source"] = source

        return self.update_manifest(change)


def package_versions(
    names: Iterable[str] = ("capfilt", "torch", "transformers", "img2dataset", "pyarrow", "duckdb"),
) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
