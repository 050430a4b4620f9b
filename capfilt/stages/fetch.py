"""`capfilt fetch`: img2dataset behind one function, writing DATASET/images/ as Parquet shards.

capfilt reads the URL list itself first, so that a wrong column, an empty or unreadable list
fails at once with an error the user can act on, and so that the progress display knows the
total. Lists that are not Parquet are converted to Parquet (same rows, same order) in a
temporary folder; img2dataset then downloads, resizes and writes the shards
(sources/downloads.py).

The stage runner plans the run as for any stage (stages/runner.py): a shard is done when its
provenance names these options and this list (a hash of its bytes); another list or other
options are refused unless --overwrite. img2dataset writes each shard straight to its final
name while it downloads; capfilt points it at a staging folder instead and moves a shard into
images/, with its provenance, only once img2dataset has written the shard's stats file, so
that a shard in images/ is always complete (the layout's rule). A re-run seeds the staging
folder with the done shards, so img2dataset's incremental mode downloads only the others: no
row is fetched or written twice.

A fetch killed with SIGKILL leaves no img2dataset process behind (sources/orphans.py).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core import provenance
from capfilt.core.distributed import sum_counts
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.locks import folder_locks
from capfilt.core.options import Options, option
from capfilt.core.provenance import DONE, Provenance
from capfilt.sources.downloads import USER_AGENT_TOKEN, check_distributor, download
from capfilt.sources.manifests import manifest_options
from capfilt.sources.safe_fetch import DEFAULT_IMAGE_DEADLINE, DEFAULT_MAX_IMAGE_BYTES
from capfilt.sources.url_list import (
    URL_LIST_FORMATS,
    ListColumns,
    UrlList,
    base_format,
    read_url_list,
)
from capfilt.stages import image_shards
from capfilt.stages.image_shards import ImagesResult, counts_of, run_totals
from capfilt.stages.runner import Plan, Stage, plan_stage

DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# Opt-out directives in X-Robots-Tag headers that make a download skip the image.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
STAGING = "_incoming"  # under images/; shard discovery ignores it (not a NNNNN.parquet name)


@dataclass(frozen=True, kw_only=True)
class FetchOptions(Options):
    """Everything `capfilt fetch` passes on to img2dataset (its defaults are capfilt's)."""

    url_col: str = option("url", "Column of image URLs.", output=True)
    caption_col: str | None = option(
        None, "Column of captions.", cli_default="caption, when the list has it", output=True
    )
    input_format: str | None = option(
        None,
        "csv, tsv, parquet, jsonl, json or txt (optionally .gz).",
        cli_default="from the name",
    )
    column_names: tuple[str, ...] | None = option(
        None,
        "Comma-separated column names for a csv/tsv without a header line.",
        flag="--columns",
        split=",",
        output=True,
    )
    image_size: int = image_shards.image_size_option()
    resize_mode: str = image_shards.resize_mode_option()
    processes: int = option(1, "Download processes (Spark cores).", ge=1)
    threads: int = option(32, "Download threads per process.", ge=1)
    timeout: int = option(10, "Seconds to wait for one image.", ge=1)
    retries: int = option(0, "Retries of a failed download.", ge=0)
    distributor: str = option(
        "multiprocessing",
        "multiprocessing on this machine, or pyspark / ray for a cluster (the engine must be "
        "installed).",
        choices=DISTRIBUTORS,
    )
    shard_size: int = image_shards.shard_size_option()
    opt_out_directives: tuple[str, ...] = option(
        OPT_OUT_DIRECTIVES,
        "X-Robots-Tag directives that mean 'do not use this image', comma-separated; such "
        "images are recorded, not downloaded.",
        flag="--opt-out",
        split=",",
        output=True,
    )
    encode_quality: int = 95
    min_image_size: int = 0
    overwrite: bool = image_shards.overwrite_images_option("fetch")
    # Safety of the download itself (capfilt.safe_fetch): what may be reached, how much, how long.
    allow_private_addresses: bool = option(
        False,
        "Also fetch from loopback and private addresses (a local server, an intranet). "
        "Without it such URLs, also after a redirect or DNS lookup, become failed rows. Cloud "
        "metadata and link-local addresses (169.254/16, fe80::/10) are always refused.",
    )
    max_image_bytes: int = option(
        DEFAULT_MAX_IMAGE_BYTES,
        "Largest image download in bytes.",
        ge=1,
        cli_default="33554432 (32 MiB)",
    )
    image_deadline: float = option(
        DEFAULT_IMAGE_DEADLINE,
        "Seconds one image's whole download may take (a server that drips bytes hits it).",
        gt=0,
    )

    def check(self) -> None:
        if self.input_format is not None and base_format(self.input_format) is None:
            raise CapfiltError(
                f"unknown --input-format {self.input_format!r}; "
                f"choose one of {', '.join(URL_LIST_FORMATS)} (optionally .gz)"
            )
        if not math.isfinite(self.image_deadline):
            raise CapfiltError("--image-deadline must be a number of seconds more than 0")

    def list_columns(self) -> ListColumns:
        return ListColumns(self.url_col, self.caption_col, self.input_format, self.column_names)

    def download_policy(self):
        """The capfilt.safe_fetch policy these options ask for."""
        from capfilt.sources.safe_fetch import DownloadPolicy

        return DownloadPolicy(
            allow_private_addresses=self.allow_private_addresses,
            max_image_bytes=self.max_image_bytes,
            image_deadline=float(self.image_deadline),
        )


def options_from_manifest(path: str | os.PathLike, **overrides) -> tuple[FetchOptions, dict]:
    """FetchOptions from a data_manifests/*.toml `[fetch]` table, then `overrides` on top.

    Returns the options and the manifest's `[source]` table (recorded in capfilt.json).
    """
    # A manifest may come from anyone: it cannot open the way to private networks.
    return manifest_options(path, "fetch", FetchOptions, overrides, {"allow_private_addresses"})


@dataclass
class FetchResult(ImagesResult):
    """What one `capfilt fetch` run did."""

    rows_in_list: int = 0
    rows_in_images: int = 0
    shards_missing: list[int] | None = None
    log_path: str | None = None

    @property
    def complete(self) -> bool:
        return not self.shards_missing


ProgressCallback = Callable[[int, int, int], None]  # (rows done, rows in list, successes)


class FetchStage(Stage):
    """The URL list → images/ shards (img2dataset does the work, in bulk; see `fetch`)."""

    name = "fetch"
    output = "images"
    inputs = ()
    refuse_changed_inputs = True  # another list would replace images/ wholesale

    def __init__(self, options: FetchOptions, listing: UrlList):
        super().__init__(options)
        self.listing = listing

    def shards(self, dataset: Dataset) -> list[int]:
        return sorted(_expected_shards(self.listing, self.options.shard_size))

    def input_fingerprints(self, dataset: Dataset, shard: int) -> dict:
        return {"url_list": self.listing.fingerprint}


def _shard_of(name: str) -> int | None:
    stem = name.rsplit("/", 1)[-1].split("_", 1)[0].split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


class _Staging:
    """img2dataset's output folder; complete shards move from here into images/."""

    def __init__(self, dataset: Dataset, stage: FetchStage, plan: Plan, run: str):
        self.dataset, self.stage, self.plan, self.run = dataset, stage, plan, run
        self.fs = dataset.fs
        self.images = dataset.folder("images")
        self.path = dataset.join("images", STAGING)
        self.moved: set[int] = set()
        self.stats: dict[int, dict] = {}
        self.seeded: set[int] = set()
        self._lock = threading.Lock()

    def url(self) -> str:
        return self.dataset.url("images", STAGING)

    def prepare(self) -> set[int]:
        """Adopt the shards a killed run of this same fetch finished, then mark the done ones."""
        # Beside the staging folder: img2dataset reads every *.json inside it as a shard's.
        marker = f"{self.path}_run.json"
        made_for = {"options": self.plan.options, "url_list": self.stage.listing.fingerprint}
        try:
            with self.fs.open(marker, "rb") as f:
                same = json.load(f) == made_for
        except (FileNotFoundError, ValueError):
            same = False
        if not same and self.fs.exists(self.path):  # staged by another list or other options
            self.fs.rm(self.path, recursive=True)
        self.fs.makedirs(self.path, exist_ok=True)
        io.write_bytes_atomic(self.fs, marker, json.dumps(made_for).encode())
        adopted = set(self.sweep())
        done = adopted
        if not self.plan.overwrite:
            done |= set(self.plan.of(DONE))
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:  # an object store has no empty folders
            entries = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            shard = _shard_of(name)
            if name.endswith("_stats.json") and shard not in done:
                self.fs.rm(entry)  # a leftover marker or stats without its shard: fetch again
        for shard in done - adopted:
            stats = self.dataset.stats_path("images", shard)
            seed = f"{self.path}/{shard:05d}_stats.json"
            if not self.fs.exists(seed):
                if self.fs.exists(stats):
                    self.fs.copy(stats, seed)
                else:
                    with self.fs.open(seed, "w") as f:
                        f.write("{}")
        self.seeded = done - adopted
        return done

    def successes_before(self) -> int:
        """Successful rows of the shards done before this run, from their stats files."""
        total = 0
        for shard in self.seeded:
            with self.fs.open(f"{self.path}/{shard:05d}_stats.json", "r") as f:
                total += json.load(f).get("successes", 0)
        return total

    def sweep(self) -> list[int]:
        """Move every shard whose stats file exists (so its parquet is closed) into images/,
        its stats and provenance first."""
        with self._lock:
            found = []
            try:
                entries = self.fs.ls(self.path, detail=False)
            except FileNotFoundError:
                return found
            names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
            for name in sorted(names):
                if not name.endswith("_stats.json"):
                    continue
                shard = _shard_of(name)
                parquet = f"{shard:05d}.parquet"
                if shard is None or shard in self.seeded or shard in self.moved:
                    continue
                if parquet not in names:
                    continue
                with self.fs.open(f"{self.path}/{name}", "rb") as f:
                    data = f.read()
                try:
                    stats = json.loads(data)
                except ValueError:
                    # img2dataset is still writing it, or was killed while it did: a later
                    # sweep retries, and a re-run's prepare() fetches the shard again.
                    continue
                self._move_in(shard, f"{self.path}/{parquet}", data, stats)
                self.stats[shard] = stats
                self.moved.add(shard)
                found.append(shard)
            return found

    def _move_in(self, shard: int, staged: str, stats_data: bytes, stats: dict) -> None:
        # Copy the stats, not move (img2dataset's logger may still be reading the file), and
        # write the provenance, before the parquet: a shard in images/ always has both.
        io.write_bytes_atomic(self.fs, self.dataset.stats_path("images", shard), stats_data)
        record = Provenance(
            stage="fetch",
            shard=shard,
            file=io.file_fingerprint(self.fs, staged),
            options=self.plan.options,
            inputs=self.stage.input_fingerprints(self.dataset, shard),
            run=self.run,
            rows=stats.get("count"),
        )
        provenance.write(self.images, shard, record)
        self.fs.mv(staged, self.images.shard_path(shard))

    def remove(self) -> None:
        for path in (self.path, f"{self.path}_run.json"):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)


class _Watcher(threading.Thread):
    """Moves finished shards into images/ while img2dataset runs, and reports progress."""

    def __init__(self, staging: _Staging, total: int, done_before: int, on_progress):
        super().__init__(daemon=True, name="capfilt-fetch-watcher")
        self.staging, self.total, self.done_before = staging, total, done_before
        self.successes_before = staging.successes_before()
        self.on_progress = on_progress
        self.stop_event = threading.Event()

    def report(self) -> None:
        if self.on_progress is None:
            return
        stats = self.staging.stats.values()
        done = self.done_before + sum(s.get("count", 0) for s in stats)
        successes = self.successes_before + sum(s.get("successes", 0) for s in stats)
        self.on_progress(min(done, self.total), self.total, successes)

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            try:
                if self.staging.sweep():
                    self.report()
            except (OSError, ValueError):  # a stats file caught mid-write: the next sweep retries
                continue


def _expected_shards(listing: UrlList, shard_size: int) -> set[int]:
    """The shard numbers img2dataset gives the list: numbering runs on across its files."""
    shards, start = set(), 0
    for rows in listing.rows_per_file:
        count = math.ceil(rows / shard_size)
        shards.update(range(start, start + count))
        start += count
    return shards


def _rows_in_images(dataset: Dataset) -> int:
    import pyarrow.parquet as pq

    total = 0
    for shard in dataset.shards("images"):
        with dataset.fs.open(dataset.shard_path("images", shard), "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _describe_source(listing: UrlList, options: FetchOptions, source: dict | None) -> dict:
    described = {
        "kind": "url_list",
        "url_list": listing.source,
        "format": listing.input_format,
        "url_col": listing.url_col,
        "caption_col": listing.caption_col,
        "extra_columns": listing.extra_columns,
        "rows": listing.rows,
        "shard_size": options.shard_size,
    }
    if listing.invalid_utf8_values:
        described["invalid_utf8_values"] = listing.invalid_utf8_values
    if source:
        described["manifest"] = source
    return described


def fetch(
    url_list: str,
    dataset: Dataset | str,
    options: FetchOptions | None = None,
    on_progress: ProgressCallback | None = None,
    source: dict | None = None,
) -> FetchResult:
    """Download every row of `url_list` into DATASET/images/ with img2dataset; resume a re-run.

    `source` (e.g. a data manifest's [source] table) is recorded in capfilt.json.
    """
    from capfilt.stages.status import downstream_stale

    options = options or FetchOptions()
    dataset = Dataset(dataset) if isinstance(dataset, str) else dataset
    check_distributor(options.distributor)
    listing = read_url_list(str(url_list), options.list_columns())
    try:
        dataset.ensure_writable("images")
        stage = FetchStage(options, listing)
        command = f"capfilt fetch {listing.source} {dataset.root}"
        with folder_locks(dataset, ("images",), command):
            plan = plan_stage(stage, dataset, options.overwrite)
            if plan.refusal:
                raise CapfiltError(plan.refusal)
            # Recorded before the download starts, so that a killed run resumes too.
            dataset.set_source(_describe_source(listing, options, source))
            images = dataset.folder("images")
            images.remove_temp_files()
            for shard in plan.orphans:  # beyond the new list's end
                images.remove_shard(shard)
            staging = _Staging(dataset, stage, plan, provenance.new_run_id())
            result = _download(listing, dataset, options, staging, on_progress)
            if result.shards_done_now:
                result.stale_downstream = downstream_stale(dataset)
            _record(dataset, listing, options, result, staging)
        return result
    finally:
        listing.cleanup()


def _download(listing, dataset, options, staging: _Staging, on_progress) -> FetchResult:
    done_before = staging.prepare()
    expected = _expected_shards(listing, options.shard_size)
    rows_before = sum(stats.get("count", 0) for stats in staging.stats.values()) + _rows_of(
        dataset, staging.seeded
    )
    watcher = _Watcher(staging, listing.rows, rows_before, on_progress)
    watcher.report()
    if expected - done_before:
        watcher.start()
        try:
            download(listing, staging.url(), done_before, options)
        finally:
            watcher.stop_event.set()
            watcher.join()
    staging.sweep()
    staging.remove()
    watcher.report()

    present = set(dataset.shards("images"))
    done_now = sorted(staging.moved)
    totals: dict = {}
    for shard in done_now:
        totals = sum_counts([totals, counts_of(staging.stats[shard])])
    counts, errors = run_totals(totals)
    return FetchResult(
        dataset=dataset.root,
        shards_done_now=done_now,
        shards_skipped=sorted((done_before - set(done_now)) & expected),
        counts=counts,
        errors=errors,
        skipped_columns=listing.skipped_columns,
        invalid_utf8_values=listing.invalid_utf8_values,
        rows_in_list=listing.rows,
        rows_in_images=_rows_in_images(dataset),
        shards_missing=sorted(expected - present),
    )


def _rows_of(dataset: Dataset, shards) -> int:
    """Rows of done shards, from their stats files."""
    total = 0
    for shard in shards:
        try:
            with dataset.fs.open(dataset.stats_path("images", shard), "rb") as f:
                total += json.load(f).get("count", 0)
        except (FileNotFoundError, ValueError):
            continue
    return total


def _record(dataset, listing: UrlList, options, result: FetchResult, staging: _Staging) -> None:
    counts = {
        **result.counts,
        "rows_in_list": result.rows_in_list,
        "rows_in_images": result.rows_in_images,
        "shards_done": len(result.shards_done_now),
        "shards_skipped": len(result.shards_skipped),
        "shards_missing": len(result.shards_missing),
    }
    dataset.record_run(
        "fetch",
        options.to_record(),
        counts,
        command=f"capfilt fetch {listing.source} {dataset.root}",
        run=staging.run,
        provenance_options=staging.plan.options,
        user_agent_token=USER_AGENT_TOKEN,
        errors=dict(list(result.errors.items())[:20]),
    )
