"""The dataset folder: stage folders, shards, generations and the manifest.

A DATASET is a folder (local path or any fsspec URL):

    capfilt.json                    manifest: source and every stage run
    images/00000.parquet            img2dataset's schema (+ .stats/00000.json, its counts)
    captions/00000.parquet          one row per synthetic caption
    scores/00000.parquet            ITM/ITC score of every web and synthetic caption
    curated/current.json            which generation of curated/ readers see
    curated/gen-000002/00000.parquet   the kept pairs of that generation
    embeddings/00000.parquet        the ITC image embedding of every scored image (filter)
    hashes/00000.parquet            SHA-256 of bytes and pixels, pHash, ... of every image (dedup)
    dedup/current.json, dedup/gen-000001/00000.parquet   duplicate group and verdict per image
    reports/current.json, reports/gen-000001/report.html, summary.json

Every shard has its provenance beside it (.provenance/00000.json, see core/provenance.py).
Shards are aligned by number across folders; a shard file appears only when complete.

Outputs that a run replaces as a whole (curated/, dedup/, reports/) are generations: a new one is
written beside the current one and switched in by rewriting current.json, one atomic write,
so a reader that resolved the folder once (`Dataset.folder`) sees one whole generation.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError, StageNotRunError

STAGES = ("images", "captions", "scores", "curated")
# Every folder of shards, CapFilt's stages and those of dedup: what `capfilt query` has views
# of and a report reads.
STAGE_FOLDERS = (*STAGES, "embeddings", "hashes", "dedup")
# Folders replaced as a whole, in generations (see the module docstring).
GENERATIONAL = frozenset({"curated", "dedup", "reports"})
MANIFEST = "capfilt.json"
CURRENT = "current.json"
# Beside the shards, in hidden folders: readers of a whole folder (pyarrow, pandas, datasets,
# DuckDB globs) take every other file in it for Parquet. datasets skips only hidden folders
# and "__" ones, so the "_provenance" of earlier datasets broke it; it is still read.
PROVENANCE_DIR = ".provenance"
LEGACY_PROVENANCE_DIR = "_provenance"
STATS_DIR = ".stats"  # img2dataset's stats of each images/ shard
METADATA_DIRS = (PROVENANCE_DIR, LEGACY_PROVENANCE_DIR, STATS_DIR)
_SHARD_FILE = re.compile(r"^(\d{5,})\.parquet$")
_GENERATION = re.compile(r"^gen-(\d{6,})$")


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


class Dataset:
    """One dataset folder. Only this module and `io` know file names."""

    def __init__(self, root: str, storage_options: dict | None = None):
        root = str(root).rstrip("/") or "/"
        self.root = root
        import fsspec  # here, not at the top: the CLI imports options that import this module

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

    def shard_path(self, stage: str, shard: int) -> str:
        return self.folder(stage).shard_path(shard)

    def stats_path(self, stage: str, shard: int) -> str:
        """img2dataset's stats of one shard. Kept out of the shards' folder listing, as
        folder readers (pandas, datasets, DuckDB globs) take every file there for Parquet; a
        dataset written before keeps its stats beside the shard, where they are still read."""
        path = self.join(stage, STATS_DIR, f"{shard_name(shard)}.json")
        legacy = self.join(stage, f"{shard_name(shard)}_stats.json")
        if not self.fs.exists(path) and self.fs.exists(legacy):
            return legacy
        return path

    # checks --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def ensure_writable(self, *folders: str) -> None:
        """Create the dataset folder, or raise a CapfiltError saying why it cannot be written;
        also each of `folders` (stage folders a run writes into) that exists already."""
        where = [self.path] + [self.join(f) for f in folders if self.fs.isdir(self.join(f))]
        for path in where:
            try:
                self.fs.makedirs(path, exist_ok=True)
                # One probe per process: processes of one run check at the same moment.
                probe = f"{path}/.capfilt-write-probe-{uuid.uuid4().hex[:8]}"
                with self.fs.open(probe, "wb") as f:
                    f.write(b"ok")
                self.fs.rm(probe)
            except OSError as e:
                which = "dataset folder" if path == self.path else "folder"
                shown = self.root if path == self.path else self.url(path[len(self.path) + 1 :])
                full = e.errno == errno.ENOSPC
                what = "Free some space, or pass" if full else "Pass"
                raise CapfiltError(
                    f"cannot write to {which} {shown!r}: {e.strerror or e}. "
                    f"{what} a folder you can write to."
                ) from e

    # shards --------------------------------------------------------------------------------
    def folder(self, stage: str) -> StageFolder:
        """The folder a reader of `stage` sees, resolved once: for a generational stage its
        current generation, which stays whole while a later run writes the next one."""
        if stage not in GENERATIONAL:
            return StageFolder(self, stage, self.join(stage))
        record = self.generation_record(stage) or {}
        folder = self.generation_folder(stage, int(record.get("generation", 0)))
        folder.record = record
        return folder

    def generation_folder(self, stage: str, generation: int | None) -> StageFolder:
        """Generation `generation` of a generational stage (0 or None: the flat legacy folder)."""
        if not generation:
            return StageFolder(self, stage, self.join(stage), generation=0)
        name = f"gen-{generation:06d}"
        return StageFolder(self, stage, self.join(stage, name), generation=generation)

    def current_generation(self, stage: str) -> int:
        """The generation readers see (0: none switched in yet, the flat folder if any)."""
        record = self.generation_record(stage)
        return int(record.get("generation", 0)) if record else 0

    def generation_record(self, stage: str) -> dict | None:
        """current.json of a generational stage: generation, run, options, time."""
        path = self.join(stage, CURRENT)
        try:
            with self.fs.open(path, "rb") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            raise CapfiltError(
                f"{path} is not valid JSON ({e}); restore it, or delete {stage}/ and re-run "
                "the stage that writes it"
            ) from e
        return record if isinstance(record, dict) else None

    def generations(self, stage: str) -> list[int]:
        """Numbers of the generation folders of `stage` (switched in or not), sorted."""
        folder = self.join(stage)
        if not self.fs.exists(folder):
            return []
        found = []
        for entry in self.fs.ls(folder, detail=False):
            m = _GENERATION.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def switch_generation(self, stage: str, generation: int, record: dict) -> None:
        """Make `generation` the one readers see (one atomic write), then remove every older
        generation but the one just replaced, which a reader may still be reading."""
        previous = self.current_generation(stage)
        data = json.dumps(dict(record, generation=generation), indent=2, default=str).encode()
        io.write_bytes_atomic(self.fs, self.join(stage, CURRENT), data)
        for old in self.generations(stage):
            if old not in (generation, previous):
                self.fs.rm(self.generation_folder(stage, old).path, recursive=True)
        if previous and self.generation_folder(stage, 0).shards():
            self.generation_folder(stage, 0).remove_shards()  # the flat legacy layout

    def shards(self, stage: str) -> list[int]:
        """Numbers of the complete shard files of `stage` (current generation), sorted."""
        return self.folder(stage).shards()

    def has_stage(self, stage: str) -> bool:
        return bool(self.shards(stage))

    def require_stage(self, stage: str, hint: str) -> list[int]:
        shards = self.shards(stage)
        if not shards:
            raise StageNotRunError(f"{self.root!r} has no {stage}/ shards yet; {hint}")
        return shards

    def write_shard(self, stage: str, shard: int, table) -> str:
        """Write one shard without provenance (tests and tools; stages go through the runner)."""
        folder = self.folder(stage)
        self.fs.makedirs(folder.path, exist_ok=True)
        path = folder.shard_path(shard)
        io.write_table_atomic(self.fs, path, table)
        return path

    def read_shard(self, stage: str, shard: int, columns: list[str] | None = None):
        return self.folder(stage).read_shard(shard, columns)

    def read_stage(self, stage: str, columns: list[str] | None = None):
        return self.folder(stage).read_all(columns)

    def remove_temp_files(self, stage: str) -> None:
        """Delete temporary files a killed run left behind (in every generation's folder)."""
        folders = [ShardFolder(self.fs, self.join(stage))]
        folders += [self.generation_folder(stage, g) for g in self.generations(stage)]
        for folder in folders:
            folder.remove_temp_files()

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

    def record_run(self, stage: str, options: dict, counts: dict | None = None, **extra) -> dict:
        """Append one stage run (command, options, versions, time, counts) to the manifest."""
        run = {
            "stage": stage,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "options": options,
            "counts": counts or {},
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


class ShardFolder:
    """A folder of numbered shard files (NNNNN + suffix), each with its provenance beside it."""

    def __init__(self, fs, path: str, suffix: str = ".parquet"):
        self.fs, self.path, self.suffix = fs, path.rstrip("/"), suffix

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def shard_path(self, shard: int) -> str:
        return f"{self.path}/{shard_name(shard)}{self.suffix}"

    def provenance_path(self, shard: int, legacy: bool = False) -> str:
        where = LEGACY_PROVENANCE_DIR if legacy else PROVENANCE_DIR
        return f"{self.path}/{where}/{shard_name(shard)}.json"

    def fingerprint(self, shard: int, path: str | None = None) -> str | None:
        """The fingerprint of a shard file (core/parquet.py), None if there is none."""
        path = path or self.shard_path(shard)
        if self.suffix == ".parquet":
            return io.file_fingerprint(self.fs, path)
        return io.content_fingerprint(self.fs, path)

    def shards(self) -> list[int]:
        """Numbers of the complete shard files, sorted."""
        if not self.fs.exists(self.path):
            return []
        pattern = re.compile(r"^(\d{5,})" + re.escape(self.suffix) + "$")
        found = []
        for entry in self.fs.ls(self.path, detail=False):
            m = pattern.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def remove_shard(self, shard: int) -> None:
        """Remove one shard file, its provenance and its stats file (img2dataset's)."""
        stats = [
            f"{self.path}/{STATS_DIR}/{shard_name(shard)}.json",
            f"{self.path}/{shard_name(shard)}_stats.json",  # where datasets kept it before
        ]
        provenance = [self.provenance_path(shard), self.provenance_path(shard, legacy=True)]
        for path in (self.shard_path(shard), *provenance, *stats):
            if self.fs.exists(path):
                self.fs.rm(path)

    def remove_shards(self) -> None:
        """Remove this folder's shard files and their provenance, nothing else."""
        for shard in self.shards():
            self.remove_shard(shard)

    def remove_temp_files(self) -> None:
        """Delete the temporary files a killed writer left (shards, provenance, stats)."""
        for folder in (self.path, *(f"{self.path}/{d}" for d in METADATA_DIRS)):
            if not self.fs.exists(folder):
                continue
            for entry in self.fs.ls(folder, detail=False):
                if ".tmp-" in entry.rsplit("/", 1)[-1]:
                    self.fs.rm(entry, recursive=True)


class StageFolder(ShardFolder):
    """The Parquet shards of one stage folder, or of one generation of a generational stage."""

    def __init__(self, dataset: Dataset, stage: str, path: str, generation: int | None = None):
        super().__init__(dataset.fs, path)
        self.dataset, self.stage, self.generation = dataset, stage, generation
        self.record: dict = {}  # a generation's current.json, as resolved

    def url(self, shard: int) -> str:
        """A path of one shard that DuckDB can open."""
        relative = self.path[len(self.dataset.path) + 1 :]
        return self.dataset.url(*relative.split("/"), f"{shard_name(shard)}.parquet")

    def read_shard(self, shard: int, columns: list[str] | None = None):
        return io.read_table(self.fs, self.shard_path(shard), columns=columns)

    def read_all(self, columns: list[str] | None = None):
        import pyarrow as pa

        tables = [self.read_shard(s, columns) for s in self.shards()]
        # Shards written before a folder gained a column (parquet.OPTIONAL_COLUMNS) have it
        # as nulls.
        return pa.concat_tables(tables, promote_options="default") if tables else None
