"""img2dataset wired once: its reader, resizer, downloader and writer, behind capfilt's
download guard (sources/safe_fetch.py), run in this process or handed to a distributor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator

from capfilt.core.errors import CapfiltError

USER_AGENT_TOKEN = "capfilt"


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


def download(listing, output_folder: str, done: set[int], options) -> None:
    """Download `listing` into `output_folder` (img2dataset's Parquet shards and stats files),
    leaving out the shards in `done`, under capfilt's download guard; `options` are
    FetchOptions. One process runs here; more go through img2dataset's distributors."""
    import signal

    from capfilt.sources.safe_fetch import guarded_img2dataset

    engine = (
        _spark_session(options.processes)
        if options.distributor == "pyspark"
        else contextlib.nullcontext()
    )
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Worker processes get the guard with the pickled downloader (SafeDownloader).
        with engine, guarded_img2dataset(options.download_policy()):
            if options.processes == 1 and options.distributor == "multiprocessing":
                _download_here(listing, output_folder, done, options)
            else:
                from img2dataset import download as img2dataset_download

                from capfilt.sources.orphans import processes_end_with_this_one

                workers = (
                    processes_end_with_this_one()
                    if options.distributor == "multiprocessing"
                    else contextlib.nullcontext()
                )
                # img2dataset's incremental mode skips the shards whose stats file exists.
                with workers:
                    img2dataset_download(
                        url_list=listing.img2dataset_input(),
                        output_folder=output_folder,
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


def _download_here(listing, output_folder: str, done: set[int], options) -> None:
    """img2dataset's reader and downloader, run in this process.

    With one process, img2dataset's `download()` would still start a worker process and a
    logger process, each importing img2dataset again (seconds on a laptop, more than the
    download of a small list); the same reader, downloader and writer run here instead.
    """
    import fsspec
    from img2dataset.reader import Reader

    from capfilt.sources.safe_fetch import SafeDownloader, SafeResizer
    from capfilt.sources.writers import WriteIdParquetSampleWriter

    fs, path = fsspec.core.url_to_fs(output_folder)
    tmp_path = f"{path}/_tmp"
    fs.makedirs(tmp_path, exist_ok=True)
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
        f"{output_folder}/_tmp",
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
        sample_writer_class=WriteIdParquetSampleWriter,
        resizer=resizer,
        thread_count=options.threads,
        save_caption=listing.caption_col is not None,
        extract_exif=True,
        output_folder=output_folder,
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
    if fs.exists(tmp_path):  # on an object store it vanished with its last file
        fs.rm(tmp_path, recursive=True)
