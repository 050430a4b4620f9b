"""`capfilt fetch`: img2dataset behind one function, writing DATASET/images/ as Parquet shards.

capfilt reads the URL list itself first, so that a wrong column, an empty or unreadable list
fails at once with an error the user can act on, and so that the progress display knows the
total. Lists that are not Parquet are converted to Parquet (same rows, same order) in a
temporary folder; img2dataset then downloads, resizes and writes the shards.

img2dataset writes each shard straight to its final name while it downloads; capfilt points it
at a staging folder instead and moves a shard into images/ only once img2dataset has written
the shard's stats file, so that a shard in images/ is always complete (the layout's rule).
A re-run seeds the staging folder with the finished shards, so img2dataset's incremental mode
downloads only the missing ones: no row is fetched or written twice."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.sources.manifests import load_manifest
from capfilt.sources.safe_fetch import DEFAULT_IMAGE_DEADLINE, DEFAULT_MAX_IMAGE_BYTES
from capfilt.sources.url_list import (
    URL_LIST_FORMATS,
    ListColumns,
    UrlList,
    base_format,
    read_url_list,
)

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


# Opt-out directives in X-Robots-Tag headers that make a download skip the image.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


USER_AGENT_TOKEN = "capfilt"


STAGING = "_incoming"  # under images/; shard discovery ignores it (not a NNNNN.parquet name)


@dataclass(frozen=True)
class FetchOptions:
    """Everything `capfilt fetch` passes on to img2dataset (its defaults are capfilt's)."""

    url_col: str = "url"
    caption_col: str | None = None  # None: use a "caption" column when the list has one
    input_format: str | None = None  # None: from the file name
    column_names: tuple[str, ...] | None = None  # for csv/tsv lists without a header line
    image_size: int = 384
    resize_mode: str = "keep_ratio"
    processes: int = 1
    threads: int = 32
    timeout: int = 10
    retries: int = 0
    distributor: str = "multiprocessing"
    shard_size: int = 10_000
    opt_out_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES
    encode_quality: int = 95
    min_image_size: int = 0
    overwrite: bool = False
    # Safety of the download itself (capfilt.safe_fetch): what may be reached, how much, how long.
    allow_private_addresses: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_deadline: float = DEFAULT_IMAGE_DEADLINE

    def validate(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise CapfiltError(
                f"unknown --resize-mode {self.resize_mode!r}; "
                f"choose one of {', '.join(RESIZE_MODES)}"
            )
        if self.distributor not in DISTRIBUTORS:
            raise CapfiltError(
                f"unknown --distributor {self.distributor!r}; "
                f"choose one of {', '.join(DISTRIBUTORS)}"
            )
        if self.input_format is not None and base_format(self.input_format) is None:
            raise CapfiltError(
                f"unknown --input-format {self.input_format!r}; "
                f"choose one of {', '.join(URL_LIST_FORMATS)} (optionally .gz)"
            )
        for name in ("image_size", "processes", "threads", "timeout", "shard_size"):
            if getattr(self, name) < 1:
                raise CapfiltError(f"--{name.replace('_', '-')} must be at least 1")
        if self.retries < 0:
            raise CapfiltError("--retries must be 0 or more")
        if self.max_image_bytes < 1:
            raise CapfiltError("--max-image-bytes must be at least 1")
        if not (self.image_deadline > 0 and math.isfinite(self.image_deadline)):
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
    manifest = load_manifest(path)
    table = manifest.get("fetch")
    if not isinstance(table, dict):
        raise CapfiltError(
            f"{path} has no [fetch] table: this source is not fetched from URLs"
            + (
                "; it is local data: use `capfilt ingest` as its [ingest] table and command say"
                if "ingest" in manifest
                else ""
            )
        )
    # A manifest may come from anyone: it cannot open the way to private networks.
    known = {f.name for f in fields(FetchOptions)} - {"allow_private_addresses"}
    settings = {k: _manifest_setting(path, k, v) for k, v in table.items() if k in known}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    source = manifest.get("source", {})
    if not isinstance(source, dict):
        raise CapfiltError(f"{path}: [source] must be a table, not {type(source).__name__}")
    return FetchOptions(**settings), dict(source)


def _manifest_setting(path, key: str, value):
    """A [fetch] value checked against FetchOptions' type (fuzzing found the traceback)."""
    annotation = next(f.type for f in fields(FetchOptions) if f.name == key)
    annotation = str(annotation)
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
        raise CapfiltError(f"{path}: [fetch] {key} must be {wanted}, not {value!r}")
    return value


@dataclass
class FetchResult:
    """What one `capfilt fetch` run did."""

    dataset: str
    rows_in_list: int
    rows_in_images: int
    shards_done_now: list[int]
    shards_skipped: list[int]
    shards_missing: list[int]
    counts: dict  # this run: count, successes, failed_to_download, failed_to_resize
    errors: dict  # this run: error message -> rows
    skipped_columns: list[str]
    log_path: str | None = None
    invalid_utf8_values: int = 0  # list values whose invalid UTF-8 bytes became U+FFFD

    @property
    def success_rate(self) -> float:
        return self.counts["successes"] / self.counts["count"] if self.counts["count"] else 0.0

    @property
    def complete(self) -> bool:
        return not self.shards_missing


ProgressCallback = Callable[[int, int, int], None]  # (rows done, rows in list, successes)


def check_distributor(distributor: str) -> None:
    """Fail clearly when the engine is missing (img2dataset would silently write nothing)."""
    if distributor == "pyspark":
        if importlib.util.find_spec("pyspark") is None:
            raise CapfiltError(
                "--distributor pyspark needs PySpark: pip install pyspark (and Java 17), "
                "or use --distributor multiprocessing"
            )
        if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
            raise CapfiltError(
                "--distributor pyspark needs Java (17 or newer) on PATH or in JAVA_HOME; "
                "install a JDK or use --distributor multiprocessing"
            )
    elif distributor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise CapfiltError(
                "--distributor ray needs Ray: pip install ray (and start or join a cluster "
                "with `ray start`), or use --distributor multiprocessing"
            )


@contextlib.contextmanager
def _spark_session(processes: int) -> Iterator[None]:
    """Use the active Spark session, or start a local one with `processes` cores."""
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is not None:
        yield
        return
    # Spark's Python workers must run this interpreter, which has img2dataset installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master(f"local[{processes}]")
        .appName("capfilt-fetch")
        .config("spark.driver.memory", "2g")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    try:
        yield
    finally:
        spark.stop()


def _shard_of(name: str) -> int | None:
    stem = name.rsplit("/", 1)[-1].split("_", 1)[0].split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


class _Staging:
    """img2dataset's output folder; complete shards move from here into images/."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.fs = dataset.fs
        self.path = dataset.join("images", STAGING)
        self.moved: set[int] = set()
        self.stats: dict[int, dict] = {}
        self.seeded: set[int] = set()
        self._lock = threading.Lock()

    def url(self) -> str:
        return self.dataset.url("images", STAGING)

    def prepare(self) -> set[int]:
        """Adopt shards a killed run finished, then mark every shard of images/ as done."""
        self.fs.makedirs(self.path, exist_ok=True)
        self.sweep()
        done = set(self.dataset.shards("images"))
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:  # an object store has no empty folders
            entries = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            shard = _shard_of(name)
            if name.endswith("_stats.json") and shard not in done:
                self.fs.rm(entry)  # its parquet is gone from images/: fetch it again
        for shard in done:
            stats = self.dataset.stats_path("images", shard)
            marker = f"{self.path}/{shard:05d}_stats.json"
            if not self.fs.exists(marker):
                if self.fs.exists(stats):
                    self.fs.copy(stats, marker)
                else:
                    with self.fs.open(marker, "w") as f:
                        f.write("{}")
        self.seeded = done
        self.moved.clear()
        return done

    def successes_before(self) -> int:
        """Successful rows of the shards done before this run, from their stats files."""
        total = 0
        for shard in self.seeded:
            with self.fs.open(f"{self.path}/{shard:05d}_stats.json", "r") as f:
                total += json.load(f).get("successes", 0)
        return total

    def sweep(self) -> list[int]:
        """Move every shard whose stats file exists (so its parquet is closed) into images/."""
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
                stats_file = f"{self.path}/{name}"
                with self.fs.open(stats_file, "rb") as f:
                    data = f.read()
                try:
                    stats = json.loads(data)
                except ValueError:
                    # img2dataset is still writing it, or was killed while it did: a later
                    # sweep retries, and a re-run's prepare() fetches the shard again.
                    continue
                # Copy, not move (img2dataset's logger may still be reading the stats file),
                # and before the parquet, so a shard in images/ always has its stats.
                io.write_bytes_atomic(self.fs, self.dataset.stats_path("images", shard), data)
                self.fs.mv(f"{self.path}/{parquet}", self.dataset.shard_path("images", shard))
                self.stats[shard] = stats
                self.moved.add(shard)
                found.append(shard)
            return found

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


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


def _check_resume(dataset: Dataset, listing: UrlList, options: FetchOptions) -> None:
    """Refuse a re-run whose shards would not line up with the shards already fetched.

    The source is recorded before the download starts, so a run that was killed half-way
    resumes too.
    """
    if options.overwrite or not dataset.has_stage("images"):
        return
    source = dataset.read_manifest().get("source") or {}
    if source.get("kind") != "url_list":
        raise CapfiltError(
            f"{dataset.root!r} already has images/ shards that `capfilt fetch` did not "
            "write; pass --overwrite to replace them, or fetch into a new folder"
        )
    before = (source.get("shard_size"), source.get("rows"))
    now = (options.shard_size, listing.rows)
    if before != now:
        raise CapfiltError(
            f"{dataset.root!r} was fetched with --shard-size {before[0]} from a list of "
            f"{before[1]} rows, but this run has --shard-size {now[0]} and {now[1]} rows: "
            "resuming would mix shards. Re-run with the same list and --shard-size, or pass "
            "--overwrite to fetch again from scratch"
        )


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


def _remove_images(dataset: Dataset) -> None:
    folder = dataset.stage_dir("images")
    if dataset.fs.exists(folder):
        dataset.fs.rm(folder, recursive=True)


def _download_here(listing: UrlList, staging: _Staging, options: FetchOptions) -> None:
    """img2dataset's reader and downloader, run in this process.

    With one process, img2dataset's `download()` would still start a worker process and a
    logger process, each importing img2dataset again (seconds on a laptop, more than the
    download of a small list); the same reader, downloader and writer run here instead.
    """
    from img2dataset.reader import Reader
    from img2dataset.writer import ParquetSampleWriter

    from capfilt.sources.safe_fetch import SafeDownloader, SafeResizer

    tmp_path = f"{staging.path}/_tmp"
    staging.fs.makedirs(tmp_path, exist_ok=True)
    done = {_shard_of(p) for p in staging.fs.glob(f"{staging.path}/*_stats.json")}
    reader = Reader(
        listing.img2dataset_input(),
        "parquet",
        listing.url_col,
        listing.caption_col,
        None,
        None,
        listing.extra_columns or None,
        options.shard_size,
        done,
        staging.dataset.url("images", STAGING, "_tmp"),
        0,
    )
    policy = options.download_policy()
    resizer = SafeResizer.wrapping(
        max_pixels=policy.max_image_pixels,
        image_size=options.image_size,
        resize_mode=options.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=options.encode_quality,
        min_image_size=options.min_image_size,
    )
    downloader = SafeDownloader.wrapping(
        policy=policy,
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=options.threads,
        save_caption=listing.caption_col is not None,
        extract_exif=True,
        output_folder=staging.url(),
        column_list=reader.column_list,
        timeout=options.timeout,
        number_sample_per_shard=options.shard_size,
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=options.retries,
        user_agent_token=USER_AGENT_TOKEN,
        disallowed_header_directives=list(options.opt_out_directives) or None,
    )
    failed = [shard for ok, shard in map(downloader, reader) if not ok]
    if failed:  # img2dataset's distributors retry a failed shard once
        failed = [shard for ok, shard in map(downloader, failed) if not ok]
    if staging.fs.exists(tmp_path):  # on an object store it vanished with its last file
        staging.fs.rm(tmp_path, recursive=True)


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
    options = options or FetchOptions()
    dataset = Dataset(dataset) if isinstance(dataset, str) else dataset
    options.validate()
    check_distributor(options.distributor)
    listing = read_url_list(str(url_list), options.list_columns())
    try:
        dataset.ensure_writable()
        _check_resume(dataset, listing, options)
        if options.overwrite:
            _remove_images(dataset)
        dataset.set_source(_describe_source(listing, options, source))
        return _download(listing, dataset, options, on_progress)
    finally:
        listing.cleanup()


def _download(listing, dataset, options, on_progress) -> FetchResult:
    staging = _Staging(dataset)
    done_before = staging.prepare()
    expected = _expected_shards(listing, options.shard_size)
    rows_before = _rows_in_images(dataset)
    watcher = _Watcher(staging, listing.rows, rows_before, on_progress)
    watcher.report()
    todo = expected - done_before
    if todo:
        watcher.start()
        engine = (
            _spark_session(options.processes)
            if options.distributor == "pyspark"
            else contextlib.nullcontext()
        )
        from img2dataset import download

        sigint = signal.getsignal(signal.SIGINT)
        try:
            from capfilt.sources.safe_fetch import guarded_img2dataset

            # Worker processes get the guard with the pickled downloader (SafeDownloader).
            with engine, guarded_img2dataset(options.download_policy()):
                if options.processes == 1 and options.distributor == "multiprocessing":
                    _download_here(listing, staging, options)
                else:
                    download(
                        url_list=listing.img2dataset_input(),
                        output_folder=staging.url(),
                        input_format="parquet",
                        output_format="parquet",
                        url_col=listing.url_col,
                        caption_col=listing.caption_col,
                        save_additional_columns=listing.extra_columns or None,
                        image_size=options.image_size,
                        resize_mode=options.resize_mode,
                        encode_quality=options.encode_quality,
                        min_image_size=options.min_image_size,
                        processes_count=options.processes,
                        thread_count=options.threads,
                        timeout=options.timeout,
                        retries=options.retries,
                        distributor=options.distributor,
                        number_sample_per_shard=options.shard_size,
                        incremental_mode="incremental",
                        user_agent_token=USER_AGENT_TOKEN,
                        # img2dataset reads an empty list as "respect nothing".
                        disallowed_header_directives=list(options.opt_out_directives),
                        compute_hash="sha256",
                        enable_wandb=False,
                    )
        finally:
            # img2dataset installs a SIGINT handler that exits with status 0; put ours back.
            signal.signal(signal.SIGINT, sigint)
            watcher.stop_event.set()
            watcher.join()
    staging.sweep()
    staging.remove()
    watcher.report()

    present = set(dataset.shards("images"))
    done_now = sorted(staging.moved)
    counts = Counter()
    errors = Counter()
    for shard in done_now:
        stats = staging.stats[shard]
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            counts[key] += stats.get(key, 0)
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                errors[message] += n
    counts = {
        k: counts[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")
    }
    result = FetchResult(
        dataset=dataset.root,
        rows_in_list=listing.rows,
        rows_in_images=_rows_in_images(dataset),
        shards_done_now=done_now,
        shards_skipped=sorted(done_before & expected),
        shards_missing=sorted(expected - present),
        counts=counts,
        errors=dict(errors.most_common()),
        skipped_columns=listing.skipped_columns,
        invalid_utf8_values=listing.invalid_utf8_values,
    )
    _record(dataset, listing, options, result)
    return result


def _record(dataset, listing: UrlList, options: FetchOptions, result: FetchResult):
    recorded = asdict(options)
    recorded["opt_out_directives"] = list(options.opt_out_directives)
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
        recorded,
        counts,
        command=f"capfilt fetch {listing.source} {dataset.root}",
        user_agent_token=USER_AGENT_TOKEN,
        errors=dict(list(result.errors.items())[:20]),
    )
