"""The dataset commands: fetch, ingest, caption, filter, report, export-data, query."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.app import DatasetArg, command, console
from capfilt.core.errors import CapfiltError


# --- fetch, ingest (capfilt/fetch.py, capfilt/ingest.py) -------------------------------------
class ResizeMode(str, Enum):
    keep_ratio = "keep_ratio"
    center_crop = "center_crop"
    border = "border"
    keep_ratio_largest = "keep_ratio_largest"
    no = "no"


class Distributor(str, Enum):
    multiprocessing = "multiprocessing"
    pyspark = "pyspark"
    ray = "ray"


def _value(option):
    return option.value if isinstance(option, Enum) else option


def _rows_progress(terminal, total_label: str = "rows"):
    """A rich progress bar over rows, printed to `terminal` (not to redirected stdout)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(total_label + " · {task.fields[successes]} ok"),
        TimeElapsedColumn(),
        console=Console(file=terminal, highlight=False),
        redirect_stdout=False,
        redirect_stderr=False,
        transient=False,
    )


def _print_download_summary(result, title: str) -> None:
    from rich.table import Table

    out = console()
    counts = result.counts
    if counts["count"]:
        out.print(
            f"[bold]{title}[/]: {counts['count']} rows this run, "
            f"{counts['successes']} ok ({result.success_rate:.1%}), "
            f"{counts['failed_to_download']} failed to download, "
            f"{counts['failed_to_resize']} failed to decode or resize"
        )
    else:
        out.print(f"[bold]{title}[/]: nothing to do, every shard is already done")
    if result.errors:
        table = Table("error", "rows", title="Failures this run")
        for message, n in list(result.errors.items())[:10]:
            table.add_row(message, str(n))
        out.print(table)
    if getattr(result, "skipped_columns", None):
        out.print(
            "[yellow]not kept[/] (names reserved for img2dataset's own columns): "
            + ", ".join(result.skipped_columns)
        )
    if getattr(result, "invalid_utf8_values", 0):
        out.print(
            f"[yellow]warning:[/] {result.invalid_utf8_values} values of the list were not valid "
            "UTF-8; their bad bytes became U+FFFD (\ufffd). Re-encode the list to UTF-8 to keep "
            "them"
        )


@command()
def fetch(
    url_list: Annotated[
        str,
        typer.Argument(
            help="URL list: .csv, .tsv, .parquet, .jsonl, .json or .txt (optionally .gz), "
            "or a folder of such files."
        ),
    ],
    dataset: DatasetArg,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="A data_manifests/*.toml of a known source: its [fetch] settings become the "
            "defaults (options given here still win)."
        ),
    ] = None,
    url_col: Annotated[
        str | None, typer.Option(help="Column of image URLs.  [default: url]")
    ] = None,
    caption_col: Annotated[
        str | None,
        typer.Option(help="Column of captions.  [default: caption, when the list has it]"),
    ] = None,
    input_format: Annotated[
        str | None,
        typer.Option(help="csv, tsv, parquet, jsonl, json or txt.  [default: from the name]"),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(help="Comma-separated column names for a csv/tsv without a header line."),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Resize target in pixels.  [default: 384]")
    ] = None,
    resize_mode: Annotated[
        ResizeMode | None,
        typer.Option(help="img2dataset's resize mode.  [default: keep_ratio]"),
    ] = None,
    processes: Annotated[
        int | None, typer.Option(help="Download processes (Spark cores).  [default: 1]")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Download threads per process.  [default: 32]")
    ] = None,
    timeout: Annotated[
        int | None, typer.Option(help="Seconds to wait for one image.  [default: 10]")
    ] = None,
    retries: Annotated[
        int | None, typer.Option(help="Retries of a failed download.  [default: 0]")
    ] = None,
    distributor: Annotated[
        Distributor | None,
        typer.Option(
            help="multiprocessing on this machine, or pyspark / ray for a cluster (the engine "
            "must be installed).  [default: multiprocessing]"
        ),
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option(help="Rows per images/ shard.  [default: 10000]")
    ] = None,
    opt_out: Annotated[
        str | None,
        typer.Option(
            help="X-Robots-Tag directives that mean 'do not use this image', comma-separated; "
            "such images are recorded, not downloaded.  [default: noai,noimageai,noindex,"
            "noimageindex]"
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the images/ shards already fetched and start again.")
    ] = False,
    allow_private_addresses: Annotated[
        bool,
        typer.Option(
            help="Also fetch from loopback, private and link-local addresses (a local server, "
            "an intranet). Without it such URLs, also after a redirect or DNS lookup, become "
            "failed rows. Cloud metadata addresses are always refused."
        ),
    ] = False,
    max_image_bytes: Annotated[
        int | None,
        typer.Option(help="Largest image download in bytes.  [default: 33554432 (32 MiB)]"),
    ] = None,
    image_deadline: Annotated[
        float | None,
        typer.Option(
            help="Seconds one image's whole download may take (a server that drips bytes "
            "hits it).  [default: 60]"
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option(help="Show img2dataset's own output instead of a progress bar.")
    ] = False,
):
    """Download a URL list with img2dataset into DATASET/images/ Parquet shards.

    Every row of the list becomes exactly one row of images/, with `status` and
    `error_message` when it failed. Extra columns of the list are kept. Re-running the same
    command resumes: finished shards are skipped. Images whose server opts out of AI use
    (X-Robots-Tag: noai ...) are recorded as failures and not downloaded.

    Example: capfilt fetch cc3m.tsv cc3m --manifest data_manifests/cc3m.toml --processes 16
    """
    import contextlib

    from capfilt.cli.output import library_output_to, new_log_path
    from capfilt.stages.fetch import FetchOptions, options_from_manifest
    from capfilt.stages.fetch import fetch as fetch_stage

    overrides = dict(
        url_col=url_col,
        caption_col=caption_col,
        input_format=input_format,
        column_names=tuple(c.strip() for c in columns.split(",")) if columns else None,
        image_size=image_size,
        resize_mode=_value(resize_mode),
        processes=processes,
        threads=threads,
        timeout=timeout,
        retries=retries,
        distributor=_value(distributor),
        shard_size=shard_size,
        opt_out_directives=(
            tuple(d.strip() for d in opt_out.split(",") if d.strip())
            if opt_out is not None
            else None
        ),
        overwrite=overwrite or None,
        allow_private_addresses=allow_private_addresses or None,
        max_image_bytes=max_image_bytes,
        image_deadline=image_deadline,
    )
    source = None
    if manifest is not None:
        options, source = options_from_manifest(manifest, **overrides)
        source = {**source, "manifest_file": str(manifest)}
    else:
        options = FetchOptions(**{k: v for k, v in overrides.items() if v is not None})

    log_path = None if verbose else new_log_path("fetch")
    redirect = library_output_to(log_path) if log_path else contextlib.nullcontext(sys.stdout)
    with redirect as terminal:
        with _rows_progress(terminal) as progress:
            task = progress.add_task("fetch", total=None, successes=0)

            def on_progress(done: int, total: int, successes: int) -> None:
                progress.update(task, completed=done, total=total, successes=successes)

            result = fetch_stage(url_list, dataset, options, on_progress=on_progress, source=source)

    _print_download_summary(result, "fetch")
    out = console()
    out.print(
        f"images/: {result.rows_in_images} of {result.rows_in_list} rows of the list "
        f"({len(result.shards_done_now)} shards fetched now, "
        f"{len(result.shards_skipped)} already done)"
    )
    if result.shards_missing:
        out.print(
            f"[bold yellow]warning:[/] {len(result.shards_missing)} shards failed "
            f"({', '.join(map(str, result.shards_missing[:10]))}); run the same command again "
            "to retry them" + (f"; img2dataset's log: {log_path}" if log_path else "")
        )
    elif log_path:
        with contextlib.suppress(OSError):
            Path(log_path).unlink()


@command()
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder of images (with captions.csv/.tsv/.jsonl, or none), a captions "
            "file, or a COCO-style / BLIP annotation .json."
        ),
    ],
    dataset: DatasetArg,
    captions: Annotated[
        str | None, typer.Option(help="Captions file for a folder SOURCE (csv, tsv, jsonl).")
    ] = None,
    file_col: Annotated[
        str | None,
        typer.Option(help="Column of image file names.  [default: file_name, file, image, ...]"),
    ] = None,
    caption_col: Annotated[str, typer.Option(help="Column of captions.")] = "caption",
    image_root: Annotated[
        str | None,
        typer.Option(help="Folder the image paths are relative to.  [default: SOURCE's folder]"),
    ] = None,
    image_size: Annotated[int, typer.Option(help="Resize target in pixels.")] = 384,
    resize_mode: Annotated[
        ResizeMode, typer.Option(help="img2dataset's resize mode.")
    ] = ResizeMode.keep_ratio,
    shard_size: Annotated[int, typer.Option(help="Rows per images/ shard.")] = 10_000,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the images/ shards already written and start again.")
    ] = False,
):
    """Put local images and captions into DATASET/images/, in the same layout as `fetch`.

    One row per image-caption pair (a COCO image with five captions gives five rows). A
    missing or unreadable image becomes a row with `status` and `error_message`.

    Example: capfilt ingest annotations/captions_train2014.json coco --image-root train2014
    """
    from capfilt.stages.ingest import IngestOptions
    from capfilt.stages.ingest import ingest as ingest_stage

    options = IngestOptions(
        captions_file=captions,
        file_col=file_col,
        caption_col=caption_col,
        image_root=image_root,
        image_size=image_size,
        resize_mode=_value(resize_mode),
        shard_size=shard_size,
        overwrite=overwrite,
    )
    with _rows_progress(sys.stdout) as progress:
        task = progress.add_task("ingest", total=None, successes=0)

        def on_progress(done: int, total: int, successes: int) -> None:
            progress.update(task, completed=done, total=total, successes=successes)

        result = ingest_stage(source, dataset, options, on_progress=on_progress)
    _print_download_summary(result, f"ingest ({result.kind})")
    if result.unlisted_files:
        console().print(
            f"[yellow]note:[/] {result.unlisted_files} image files in the folder have no row "
            "in the captions file and were not ingested"
        )


# --- caption, filter (capfilt/caption.py, capfilt/filter.py) ---------------------------------
class Decoding(str, Enum):
    nucleus = "nucleus"
    beam = "beam"
    greedy = "greedy"


class InferencePrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ItmToken(str, Enum):
    auto = "auto"
    enc = "enc"
    cls = "cls"


InferencePrecisionOpt = Annotated[
    InferencePrecision,
    typer.Option(help="Weights and activations: auto is bf16 on GPU, fp32 on CPU."),
]
InferenceDeviceOpt = Annotated[
    str, typer.Option(help="auto (this process's GPU under accelerate launch), cpu, cuda:N.")
]
DecodeWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Processes decoding JPEGs; 0: threads of the main process. "
        "Default: 0 on CPU; on GPU the CPU cores less 2 (2 to 16).",
    ),
]
FastDecodeOpt = Annotated[
    bool,
    typer.Option(
        help="Decode JPEGs at 1/2, 1/4 or 1/8 scale when the model's input is that small: "
        "much faster, pixels slightly different from the full decode + resize."
    ),
]
GpuDecodeOpt = Annotated[
    bool,
    typer.Option(
        help="Decode plain JPEGs on the model's device with torchvision (nvJPEG on a GPU) and "
        "resize them there; other images take the PIL path. Needs torchvision."
    ),
]
OverwriteShardsOpt = Annotated[
    bool, typer.Option(help="Redo shards that are already done instead of skipping them.")
]


class Engine(str, Enum):
    fast = "fast"
    hf = "hf"


EngineOpt = Annotated[
    Engine,
    typer.Option(
        help="fast: SDPA, image keys/values once per image, no per-token syncs; "
        "hf: the plain transformers modules (the reference)."
    ),
]


@command()
def caption(
    dataset: DatasetArg,
    model: Annotated[
        str, typer.Option(help="BLIP captioner: hub id or local directory (safetensors).")
    ] = "Salesforce/blip-image-captioning-large",
    num_captions: Annotated[int, typer.Option(help="Synthetic captions per image.")] = 1,
    decoding: Annotated[
        Decoding, typer.Option(help="nucleus sampling (CapFilt), beam search, or greedy.")
    ] = Decoding.nucleus,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling probability mass.")] = 0.9,
    min_length: Annotated[int, typer.Option(help="Minimum tokens, prompt included.")] = 5,
    max_length: Annotated[int, typer.Option(help="Maximum tokens, prompt included.")] = 20,
    repetition_penalty: Annotated[
        float, typer.Option(help="Penalty on tokens already generated (1.0: none).")
    ] = 1.1,
    num_beams: Annotated[int, typer.Option(help="Beams for --decoding beam.")] = 3,
    prompt: Annotated[
        str, typer.Option(help="Text the decoder starts from; stripped from the captions.")
    ] = "a picture of ",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    precision: InferencePrecisionOpt = InferencePrecision.auto,
    device: InferenceDeviceOpt = "auto",
    seed: Annotated[
        int, typer.Option(help="Sampling seed; each caption's seed derives from it and the key.")
    ] = 0,
    workers: DecodeWorkersOpt = None,
    engine: EngineOpt = Engine.fast,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            help="GPU, fast engine: replay each decoding step as a CUDA graph (fewer launches)."
        ),
    ] = False,
    fast_decode: FastDecodeOpt = False,
    gpu_decode: GpuDecodeOpt = False,
    overwrite: OverwriteShardsOpt = False,
):
    """Write synthetic captions of every downloaded image to captions/ (BLIP, nucleus sampling).

    Works shard by shard and skips finished shards; under `accelerate launch -m capfilt
    caption ...` each process takes its own shards.

    Example: capfilt caption ds --num-captions 3 --batch-size 64
    """
    from capfilt.stages.caption import CaptionConfig, caption_dataset

    config = CaptionConfig(
        model=model,
        num_captions=num_captions,
        decoding=decoding.value,
        top_p=top_p,
        min_length=min_length,
        max_length=max_length,
        repetition_penalty=repetition_penalty,
        num_beams=num_beams,
        prompt=prompt,
        batch_size=batch_size,
        precision=precision.value,
        device=device,
        seed=seed,
        num_workers=workers,
        engine=engine.value,
        cuda_graphs=cuda_graphs,
        fast_decode=fast_decode,
        gpu_decode=gpu_decode,
        overwrite=overwrite,
    )
    result = caption_dataset(dataset, config)
    if not _is_main_process():
        return
    rows = [
        ("shards captioned", f"{result.shards_done}"),
        ("shards skipped (done before)", f"{result.shards_skipped}"),
        ("images", f"{result.images}"),
        ("captions written", f"{result.captions}"),
        ("errors (undecodable images)", f"{result.errors}"),
        ("images/s", f"{result.images_per_second:,.1f}"),
        ("model", f"{result.model} @ {result.revision or '-'}"),
    ]
    _print_summary("caption", rows)


@command(name="filter")
def filter_(
    dataset: DatasetArg,
    threshold: Annotated[
        float, typer.Option(help="Keep pairs whose ITM match probability is at least this.")
    ],
    model: Annotated[
        str, typer.Option(help="BLIP ITM filter: hub id or local directory (safetensors).")
    ] = "Salesforce/blip-itm-large-coco",
    itm_token: Annotated[
        ItmToken,
        typer.Option(help="First text token for ITM: [ENC] as BLIP trained, or [CLS] as HF."),
    ] = ItmToken.auto,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    max_text_tokens: Annotated[int, typer.Option(help="Longer captions are truncated.")] = 35,
    precision: InferencePrecisionOpt = InferencePrecision.auto,
    device: InferenceDeviceOpt = "auto",
    workers: DecodeWorkersOpt = None,
    engine: EngineOpt = Engine.fast,
    fast_decode: FastDecodeOpt = False,
    gpu_decode: GpuDecodeOpt = False,
    overwrite: OverwriteShardsOpt = False,
):
    """Score web and synthetic captions with BLIP ITM/ITC into scores/, keep the good ones.

    Pairs with ITM probability ≥ threshold go to curated/. Running it again with another
    threshold re-derives curated/ from scores/ without loading the model.

    Example: capfilt filter ds --threshold 0.5
    """
    from capfilt.stages.filter import FilterConfig, filter_dataset

    config = FilterConfig(
        threshold=threshold,
        model=model,
        itm_token=itm_token.value,
        batch_size=batch_size,
        precision=precision.value,
        device=device,
        num_workers=workers,
        max_text_tokens=max_text_tokens,
        engine=engine.value,
        fast_decode=fast_decode,
        gpu_decode=gpu_decode,
        overwrite=overwrite,
    )
    result = filter_dataset(dataset, config)
    if not _is_main_process():
        return
    rows = [
        ("shards scored", f"{result.shards_scored}"),
        ("shards skipped (scored before)", f"{result.shards_skipped}"),
        ("images scored", f"{result.images}"),
        ("pairs scored", f"{result.pairs}"),
        ("errors (undecodable images)", f"{result.errors}"),
    ]
    if result.rescored:
        rows.append(("model", f"{result.model} @ {result.revision or '-'}"))
        rows.append(("ITM token", f"{result.itm_token}"))
    else:
        rows.append(("model", "not loaded: curated/ re-derived from scores/"))
    _print_summary(f"filter, threshold {result.threshold:g}", rows)

    from rich.table import Table

    table = Table("source", "pairs scored", "kept", "mean ITM", "mean ITC")
    for source, s in result.sources.items():
        mean_itm = "-" if s.mean_itm is None else f"{s.mean_itm:.3f}"
        mean_itc = "-" if s.mean_itc is None else f"{s.mean_itc:.3f}"
        table.add_row(source, f"{s.scored}", f"{s.kept}", mean_itm, mean_itc)
    console().print(table)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    console().print(table)


# --- report, export-data (capfilt/report.py, capfilt/export_data.py) -------------------------
@command()
def report(
    dataset: DatasetArg,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="ITM threshold to report at; defaults to the last filter run's, else 0.5.",
            min=0.0,
            max=1.0,
        ),
    ] = None,
    examples: Annotated[
        int, typer.Option(help="Examples per group (kept/dropped, clear/borderline).", min=1)
    ] = 6,
    open_report: Annotated[
        bool, typer.Option("--open", help="Open reports/report.html in the web browser.")
    ] = False,
):
    """Summarise the dataset in the terminal and write reports/report.html and summary.json.

    The HTML report is one self-contained file: totals per stage, fetch errors, ITM
    histograms with the threshold, what each threshold would keep, kept and dropped examples
    with thumbnails, and the filter's precision and recall where the dataset has truth columns.

    Example: capfilt report ds --threshold 0.6 --open
    """
    from capfilt.core.layout import Dataset
    from capfilt.report.terminal import print_summary
    from capfilt.stages.report import build_report

    result = build_report(Dataset(dataset), threshold=threshold, examples_per_group=examples)
    out = console()
    print_summary(result.summary, out)
    out.print(f"wrote {result.html_url} and {result.summary_path}", soft_wrap=True)
    if open_report:
        import webbrowser
        from pathlib import Path as _Path

        if "://" in result.html_url:
            out.print("the report is not on this machine; copy it here to open it")
        else:
            webbrowser.open(_Path(result.html_url).resolve().as_uri())


@command("export-data")
def export_data(
    dataset: DatasetArg,
    out: Annotated[str, typer.Option("--out", help="Folder to write (local path or fsspec URL).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="parquet (self-contained shards), webdataset (tar shards: KEY_TEXTID.jpg/.txt/"
            ".json per curated pair) or hf (datasets.save_to_disk folder with an Image column).",
        ),
    ] = "parquet",
    overwrite: Annotated[bool, typer.Option(help="Replace what --out already holds.")] = False,
):
    """Export the curated pairs with their images for training code.

    Example: capfilt export-data ds --format webdataset --out ds-wds
    """
    from capfilt.core.layout import Dataset
    from capfilt.stages.export_data import ExportFormat
    from capfilt.stages.export_data import export_data as run_export

    formats = [f.value for f in ExportFormat]
    if format not in formats:
        raise CapfiltError(f"--format must be one of {', '.join(formats)}, got {format!r}")
    result = run_export(Dataset(dataset), format, out, overwrite=overwrite)
    console().print(
        f"exported {result.pairs:,} pairs of {result.images:,} images as {result.format} "
        f"({result.shards} shards) to {result.out}",
        soft_wrap=True,
    )
    if result.missing_images:
        console(stderr=True).print(
            f"[yellow]warning:[/] {len(result.missing_images)} curated images have no image "
            f"bytes in images/ and were not exported (e.g. key {result.missing_images[0]})",
            soft_wrap=True,
        )


# --- query ---------------------------------------------------------------------------------
class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@command()
def query(
    dataset: DatasetArg,
    sql: Annotated[
        str, typer.Argument(help="SQL over the views images, captions, scores, curated.")
    ],
    format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Output as a table, CSV or JSON lines.")
    ] = OutputFormat.table,
    with_images: Annotated[
        bool, typer.Option(help="Keep the `jpg` bytes column in the `images` view.")
    ] = False,
):
    """Run DuckDB SQL over the dataset's Parquet shards.

    Views: `images` (without the image bytes unless --with-images), `captions`, `scores`,
    `curated` — one for each stage that has run.

    Example: capfilt query ds "select status, count(*) from images group by 1"
    """
    from capfilt.core.layout import Dataset
    from capfilt.stages.query import run_query

    columns, rows = run_query(Dataset(dataset), sql, with_images=with_images)
    print_rows(columns, rows, format.value)


def print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt == "json":
        import json

        for row in rows:
            print(json.dumps(dict(zip(columns, row, strict=True)), default=str, ensure_ascii=False))
    else:
        from rich.table import Table

        table = Table(*columns, show_lines=False)
        for row in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        console().print(table)
