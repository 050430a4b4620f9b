"""Thin Typer commands: parse options, call one stage function, print a summary.

Heavy imports (torch, transformers, img2dataset) live inside the stage modules' functions so
that `capfilt --help` answers at once.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from capfilt.errors import CapfiltError

app = typer.Typer(
    name="capfilt",
    help="Curate web image-text datasets with BLIP's CapFilt, and train on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def command(*args, **kwargs):
    """`app.command`, printing CapfiltErrors in one line with exit code 2 instead of a traceback."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*a, **kw):
            try:
                return func(*a, **kw)
            except CapfiltError as e:
                from rich.markup import escape

                console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(e.exit_code) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _version(value: bool) -> None:
    if value:
        from capfilt import __version__

        print(f"capfilt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Curate web image-text datasets with BLIP's CapFilt, and train on them.

    Example: capfilt fetch urls.csv ds && capfilt caption ds && capfilt filter ds --threshold 0.5
    """


DatasetArg = Annotated[
    str, typer.Argument(help="Dataset folder (local path or fsspec URL such as s3://bucket/ds).")
]


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

    from capfilt.fetch import (
        FetchOptions,
        library_output_to,
        new_log_path,
        options_from_manifest,
    )
    from capfilt.fetch import fetch as fetch_stage

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
    from capfilt.ingest import IngestOptions
    from capfilt.ingest import ingest as ingest_stage

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


@command()
def toyweb(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write images/ and urls.csv into.")],
    images: Annotated[int, typer.Option(help="Number of image-text pairs.")] = 200,
    wrong_fraction: Annotated[
        float, typer.Option(help="Fraction of captions that are wrong like web alt-text.")
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same web.")] = 0,
    image_size: Annotated[int, typer.Option(help="Side of the rendered images in pixels.")] = 96,
    base_url: Annotated[
        str, typer.Option(help="Where OUT_DIR will be served; the URLs of urls.csv start with it.")
    ] = "http://127.0.0.1:8000",
):
    """Write a synthetic toy web: rendered scenes with known true captions, some captions wrong.

    urls.csv has the columns url, caption, true_caption, caption_is_wrong and wrong_kind
    (other_image, file_name, boilerplate, wrong_color, wrong_shape); `capfilt fetch` keeps them.

    Example: capfilt toyweb toy --images 500 && python -m http.server 8000 --directory toy
    """
    from capfilt import toyweb as toyweb_stage

    if not 0.0 <= wrong_fraction <= 1.0:
        raise CapfiltError(f"--wrong-fraction must be between 0 and 1, got {wrong_fraction}")
    if images < 1:
        raise CapfiltError("--images must be at least 1")
    try:
        pairs, url_list = toyweb_stage.write_toyweb(
            out_dir, images, wrong_fraction, seed, base_url=base_url, image_size=image_size
        )
    except OSError as e:
        raise CapfiltError(f"cannot write the toy web to {str(out_dir)!r}: {e}") from e
    wrong = sum(p.caption_is_wrong for p in pairs)
    port = base_url.rsplit(":", 1)[-1].strip("/") if base_url.count(":") > 1 else "80"
    console().print(
        f"wrote {len(pairs)} images ({wrong} with a wrong caption) to {out_dir}/images and "
        f"{url_list}\nserve it with: python -m http.server {port} --bind 127.0.0.1 "
        f"--directory {out_dir}"
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
    from capfilt.caption import CaptionConfig, caption_dataset

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
    from capfilt.filter import FilterConfig, filter_dataset

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
    from capfilt.layout import Dataset
    from capfilt.report import build_report, print_summary

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
    from capfilt.export_data import ExportFormat
    from capfilt.export_data import export_data as run_export
    from capfilt.layout import Dataset

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


# --- pretrain, finetune, export, run (capfilt/train.py, capfilt/pipeline.py) -----------------
class Preset(str, Enum):
    tiny = "tiny"
    base = "base"
    large = "large"


class Source(str, Enum):
    all = "all"
    web = "web"
    synthetic = "synthetic"


class FinetuneTask(str, Enum):
    caption = "caption"
    itm = "itm"


RunOut = Annotated[str, typer.Option("--out", help="Run folder: checkpoints step-N/, log.jsonl.")]
InitOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Start from HF BLIP weights (captioner and/or ITM model: hub id or local "
        "dir, safetensors only; repeat for both) or a capfilt run/export folder."
    ),
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        help="Tokenizer folder; default: --init's, else a WordPiece trained on the training texts."
    ),
]
SourceOpt = Annotated[Source, typer.Option(help="Train on web texts, synthetic ones, or all.")]
BatchOpt = Annotated[int, typer.Option(help="Pairs per batch per process.")]
AccumOpt = Annotated[int, typer.Option(help="Gradient accumulation steps.")]
EpochsOpt = Annotated[int, typer.Option(help="Epochs (ignored with --max-steps).")]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warm-up steps (at most 10% of the run).")]
WeightDecayOpt = Annotated[float, typer.Option(help="AdamW weight decay.")]
QueueOpt = Annotated[int | None, typer.Option(help="ITC feature queue size (BLIP: 57600).")]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.")
]
FlipOpt = Annotated[
    bool, typer.Option(help="Random horizontal flips (turn off when captions say left/right).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")]
SaveEveryOpt = Annotated[int, typer.Option(help="Checkpoint every N optimizer steps.")]
KeepOpt = Annotated[int, typer.Option(help="Keep the last K checkpoints.")]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader worker processes for JPEG decoding.")]
OverwriteRunOpt = Annotated[bool, typer.Option(help="Start again instead of resuming --out.")]


def _train_summary(result) -> None:
    if not result.is_main_process:
        return
    out = console()
    losses = "  ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    out.print(
        f"[bold green]✓[/] {result.step}/{result.total_steps} steps{resumed} on "
        f"{result.examples} pairs; {losses}; {result.images_per_second:.1f} images/s"
    )
    if result.skipped:
        out.print("skipped rows: " + ", ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    if result.checkpoint:
        out.print(f"checkpoint: {result.checkpoint}")


CompileOpt = Annotated[
    bool,
    typer.Option(help="torch.compile each transformer layer (GPU; the first steps compile)."),
]


@command()
def pretrain(
    datasets: Annotated[list[str], typer.Argument(help="Dataset folders (curated/ or images/).")],
    out: RunOut,
    preset: Annotated[Preset, typer.Option(help="Model size when not --init.")] = Preset.base,
    init: InitOpt = None,
    tokenizer: TokenizerOpt = None,
    source: SourceOpt = Source.all,
    batch_size: BatchOpt = 32,
    grad_accum: AccumOpt = 1,
    epochs: EpochsOpt = 20,
    max_steps: MaxStepsOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-4,
    warmup_steps: WarmupOpt = 3000,
    weight_decay: WeightDecayOpt = 0.05,
    queue_size: QueueOpt = None,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    flip: FlipOpt = True,
    seed: SeedOpt = 42,
    save_every: SaveEveryOpt = 1000,
    keep_last: KeepOpt = 2,
    num_workers: WorkersOpt = 4,
    overwrite: OverwriteRunOpt = False,
):
    """Pretrain BLIP's MED model (ITC + ITM + LM) on one or more datasets through Accelerate.

    Reads each dataset's curated/ pairs (its web captions when it has not been filtered).
    Re-running the same command resumes from the newest checkpoint in --out; run it under
    `accelerate launch -m capfilt pretrain ...` for several GPUs.

    Example: capfilt pretrain ds1 ds2 --out runs/base --preset base --batch-size 75
    """
    from capfilt.train import TrainConfig, train

    config = TrainConfig(
        datasets=tuple(datasets),
        out=out,
        task="pretrain",
        preset=preset.value,
        init=tuple(init or ()),
        tokenizer=tokenizer,
        source=source.value,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        queue_size=queue_size,
        precision=precision,
        compile=compile,
        flip=flip,
        seed=seed,
        save_every=save_every,
        keep_last=keep_last,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    _train_summary(train(config, console=console()))


@command()
def finetune(
    datasets: Annotated[list[str], typer.Argument(help="Dataset folders (e.g. COCO ingested).")],
    init: Annotated[list[str], typer.Option(help="A capfilt run folder (or HF BLIP weights).")],
    out: RunOut,
    task: Annotated[
        FinetuneTask, typer.Option(help="caption: LM with a prompt; itm: ITC + ITM (the filter).")
    ] = FinetuneTask.caption,
    prompt: Annotated[str, typer.Option(help="Captioner prompt (its tokens get no loss).")] = (
        "a picture of "
    ),
    source: SourceOpt = Source.all,
    batch_size: BatchOpt = 32,
    grad_accum: AccumOpt = 1,
    epochs: EpochsOpt = 5,
    max_steps: MaxStepsOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-5,
    warmup_steps: WarmupOpt = 0,
    weight_decay: WeightDecayOpt = 0.05,
    queue_size: QueueOpt = None,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    flip: FlipOpt = True,
    seed: SeedOpt = 42,
    save_every: SaveEveryOpt = 1000,
    keep_last: KeepOpt = 2,
    num_workers: WorkersOpt = 4,
    overwrite: OverwriteRunOpt = False,
):
    """Finetune a pretrained MED into a captioner (LM) or a filter (ITC + ITM), as on COCO.

    Then `capfilt export --out DIR` writes the Hugging Face checkpoints caption/filter load.

    Example: capfilt finetune coco --task caption --init runs/base --out runs/base-cap
    """
    from capfilt.train import TrainConfig, train

    config = TrainConfig(
        datasets=tuple(datasets),
        out=out,
        task=task.value,
        init=tuple(init),
        source=source.value,
        prompt=prompt,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        min_lr=0.0,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        queue_size=queue_size,
        precision=precision,
        compile=compile,
        flip=flip,
        seed=seed,
        save_every=save_every,
        keep_last=keep_last,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    _train_summary(train(config, console=console()))


@command()
def export(
    run_dir: Annotated[str, typer.Argument(help="A capfilt run folder (or one step-N of it).")],
    out: Annotated[str, typer.Option("--out", help="Folder for captioner/ and filter/.")],
    only: Annotated[
        list[str] | None, typer.Option(help="Export only 'captioner' or 'filter'.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing folders.")] = False,
):
    """Write a run's newest checkpoint as Hugging Face BLIP checkpoints (safetensors).

    `OUT/captioner` is a BlipForConditionalGeneration and `OUT/filter` a
    BlipForImageTextRetrieval, each with its processor; caption/filter and plain
    transformers load them.

    Example: capfilt export runs/base --out models/base
    """
    from capfilt.export import KINDS, export_run

    written = export_run(run_dir, out, tuple(only or KINDS), overwrite=overwrite)
    for kind, folder in written.items():
        console().print(f"[bold green]✓[/] {kind}: {folder}")


# --- run (capfilt/pipeline.py) ----------------------------------------------------------------
@command()
def run(
    pipeline_file: Annotated[
        Path, typer.Argument(help="A pipeline TOML, e.g. pipelines/demo.toml.")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a [pipeline] variable: --set dataset=/data/ds."),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these stages (by command name).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the commands without running them.")] = False,
):
    """Run a whole pipeline file: its stages in order, each as the capfilt command it names.

    Finished shards are skipped by every stage, so re-running a pipeline resumes it.

    Example: capfilt run pipelines/blip_base_cc3m.toml --set dataset=/data/cc3m
    """
    import shlex

    from capfilt.pipeline import load_pipeline

    overrides = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise CapfiltError(f"--set expects NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value
    pipeline = load_pipeline(pipeline_file, overrides)
    out = console()
    for i, stage in enumerate(pipeline.stages, 1):
        if only and stage.command not in only:
            continue
        argv = stage.argv()
        out.print(
            f"[bold]▶ {pipeline.name} {i}/{len(pipeline.stages)}:[/] capfilt {shlex.join(argv)}"
        )
        if dry_run:
            continue
        import click

        try:
            # Without standalone mode click returns a command's exit code instead of exiting.
            exit_code = app(argv, standalone_mode=False)
        except click.ClickException as e:  # usage errors: unknown option, bad value
            raise CapfiltError(f"stage {i} ({stage.command}): {e.format_message()}") from None
        if isinstance(exit_code, int) and exit_code != 0:
            console(stderr=True).print(f"[bold red]stage {i} ({stage.command}) failed[/]")
            raise typer.Exit(exit_code)


# --- demo, evaluate (capfilt/demo.py, capfilt/evaluate.py) ------------------------------------
@command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the toy data, datasets and runs.")],
    images: Annotated[int, typer.Option(help="Toy web image-text pairs.")] = 2000,
    annotated_images: Annotated[
        int, typer.Option(help="Pairs of the clean, human-annotated-like set (plays COCO).")
    ] = 400,
    heldout_images: Annotated[int, typer.Option(help="Held-out pairs for retrieval R@K.")] = 300,
    wrong_fraction: Annotated[
        float, typer.Option(help="Fraction of web captions that are wrong.")
    ] = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed of the toy data.")] = 0,
    pipeline: Annotated[
        Path | None, typer.Option(help="Pipeline file to run.  [default: pipelines/demo.toml]")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a pipeline variable, as `capfilt run --set`."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for torch; the tiny models run fastest on one, with no thread "
            "syncing per tiny matrix product.  [default: 1 on CPU]"
        ),
    ] = None,
):
    """Run the whole CapFilt loop offline on a generated toy web, and print what it achieved.

    Generates a toy web (with known wrong captions), a small clean annotated set and held-out
    scenes, serves the web on 127.0.0.1, and runs pipelines/demo.toml: fetch, pretrain,
    finetune captioner and filter, export, caption, filter, report, pretrain on the curated
    pairs, evaluate. Prints the filter's precision/recall against the truth, synthetic
    captions, and retrieval R@1 before and after CapFilt. Re-running resumes.

    Example: capfilt demo demo
    """
    import time

    import torch

    from capfilt.demo import (
        DEFAULT_PIPELINE,
        DemoConfig,
        demo_figures,
        make_toy_data,
        serve_toy_web,
    )

    if threads is not None or not torch.cuda.is_available():
        torch.set_num_threads(threads or 1)
    started = time.perf_counter()
    config = DemoConfig(
        images=images,
        annotated_images=annotated_images,
        heldout_images=heldout_images,
        wrong_fraction=wrong_fraction,
        seed=seed,
    )
    data = make_toy_data(out_dir, config)
    out = console()
    out.print(
        f"toy web: {len(data.web_pairs)} pairs, {data.wrong_captions} with a wrong caption; "
        f"{annotated_images} annotated and {heldout_images} held-out pairs; in {out_dir}/toy"
    )
    with serve_toy_web(data) as variables:
        overrides = [f"{name}={value}" for name, value in variables.items()]
        run(
            pipeline_file=pipeline or DEFAULT_PIPELINE,
            set_=overrides + list(set_ or []),
            only=None,
            dry_run=False,
        )
    print_demo_figures(demo_figures(out_dir), out_dir, time.perf_counter() - started)


def print_demo_figures(figures, out_dir: Path, seconds: float) -> None:
    from rich.table import Table

    out = console()
    out.rule("[bold]what CapFilt did on the toy web")
    truth = figures.truth
    if truth:
        out.print(
            f"filter vs the truth: of {truth['wrong']} wrong web captions it dropped "
            f"{truth['caught']} (recall {_pct(truth['recall'])}); of {truth['dropped']} web "
            f"captions it dropped, {truth['caught']} were wrong (precision "
            f"{_pct(truth['precision'])})"
        )
    if figures.kept:
        out.print("curated pairs: " + ", ".join(f"{n} {s}" for s, n in figures.kept.items()))
    if figures.caption_samples:
        table = Table("synthetic caption", "true caption", title="Synthetic captions (samples)")
        for row in figures.caption_samples:
            table.add_row(row["synthetic"], row["truth"])
        out.print(table)
        out.print(f"synthetic captions equal to the truth: {_pct(figures.synthetic_correct)}")
    if figures.retrieval:
        table = Table(
            "pretrained on",
            "image→text R@1",
            "text→image R@1",
            "i→t R@5",
            "t→i R@5",
            title="Retrieval on held-out toy scenes (ITC similarity)",
        )
        for label, result in figures.retrieval.items():
            i2t, t2i = result["image_to_text"], result["text_to_image"]
            table.add_row(
                label, _pct(i2t["R@1"]), _pct(t2i["R@1"]), _pct(i2t["R@5"]), _pct(t2i["R@5"])
            )
        out.print(table)
    out.print(
        f"done in {seconds / 60:.1f} min; report: {out_dir}/web/reports/report.html; "
        f'explore: capfilt query {out_dir}/web "select * from scores limit 5"',
        soft_wrap=True,
    )


def _pct(rate) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


@command()
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="A capfilt run folder (pretrain or finetune), an export folder, or a BLIP ITM "
            "checkpoint (local dir or hub id)."
        ),
    ],
    dataset: DatasetArg,
    caption_col: Annotated[
        str, typer.Option(help="Column of images/ with the reference texts (e.g. true_caption).")
    ] = "caption",
    batch_size: Annotated[int, typer.Option(help="Images or texts per forward pass.")] = 64,
    max_images: Annotated[
        int | None, typer.Option(help="Evaluate on the first N usable images only.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the result as JSON to this file.")
    ] = None,
):
    """Image-text retrieval recall (R@1, R@5, R@10) of a model, by ITC similarity.

    Image→text ranks every distinct text of DATASET for each image; text→image ranks every
    image for each distinct text. A hit is any pair the dataset holds, so repeated texts
    and several captions per image count as in COCO retrieval.

    Example: capfilt evaluate runs/base coco-test --json
    """
    import json

    from capfilt.evaluate import EvaluateConfig, evaluate_retrieval

    config = EvaluateConfig(
        caption_col=caption_col, batch_size=batch_size, max_images=max_images, device=device
    )
    result = evaluate_retrieval(model, dataset, config)
    text = json.dumps(result.to_dict(), indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if json_output:
        print(text)
        return
    from rich.table import Table

    table = Table(
        "direction",
        *result.image_to_text,
        title=(
            f"retrieval · {model}{'' if result.step is None else f' (step {result.step})'} · "
            f"{result.images} images, "
            f"{result.texts} distinct texts"
        ),
    )
    for name, recalls in (
        ("image → text", result.image_to_text),
        ("text → image", result.text_to_image),
    ):
        table.add_row(name, *(_pct(v) for v in recalls.values()))
    console().print(table)
    if result.skipped:
        console().print(
            "skipped rows: " + ", ".join(f"{k}: {v}" for k, v in result.skipped.items())
        )


# --- bench (capfilt/bench.py) ------------------------------------------------------------------
class BenchWorkload(str, Enum):
    caption = "caption"
    filter = "filter"
    pretrain = "pretrain"


@command()
def bench(
    workload: Annotated[BenchWorkload, typer.Argument(help="What to measure.")],
    model: Annotated[
        str | None,
        typer.Option(help="BLIP checkpoint (local dir or hub id); default random --arch weights."),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(help="Random-weight architecture: tiny, base (ViT-B/16) or large (ViT-L/16)."),
    ] = "tiny",
    level: Annotated[
        str,
        typer.Option(help="e2e: JPEG bytes in Parquet to rows written; model: tensors in."),
    ] = "e2e",
    images: Annotated[int, typer.Option(help="Images per timed run.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per batch (both sides).")] = 8,
    captions_per_image: Annotated[
        int,
        typer.Option(help="caption: samples per image; filter: synthetic captions (+1 web)."),
    ] = 1,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    new_tokens: Annotated[int, typer.Option(help="caption: new tokens per caption.")] = 20,
    text_tokens: Annotated[int, typer.Option(help="filter/pretrain: tokens per caption.")] = 20,
    itc: Annotated[bool, typer.Option(help="filter: score ITC as well as ITM, both sides.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(help="e2e image-decoding processes (default as caption/filter --workers)."),
    ] = None,
    fast_decode: Annotated[
        bool, typer.Option(help="e2e caption/filter: capfilt decodes JPEGs at reduced scale.")
    ] = False,
    gpu_decode: Annotated[
        bool, typer.Option(help="e2e caption/filter: capfilt decodes plain JPEGs on the GPU.")
    ] = False,
    repeats: Annotated[int, typer.Option(help="Timed runs per side; the best counts.")] = 1,
    peak_tflops: Annotated[
        float | None, typer.Option(help="FLOP bound in TFLOP/s (default: a measured matmul).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's own choice).")
    ] = None,
    cuda_graphs: Annotated[
        bool, typer.Option(help="caption on GPU: replay capfilt's decode step as a CUDA graph.")
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            help="caption on GPU: torch.compile capfilt's decode step; pretrain: its layers."
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Measure a stage's throughput against the plain Hugging Face recipe, in one run.

    Prints images/s of plain transformers and of capfilt on the same weights, images and
    precision, their ratio, the achieved TFLOP/s and the fraction of the FLOP bound.

    Example: capfilt bench caption --arch base --images 64 --batch-size 32 --json
    """
    from capfilt.bench import BenchConfig, run_bench

    config = BenchConfig(
        workload=workload.value,
        model=model,
        arch=arch,
        level=level,
        images=images,
        batch_size=batch_size,
        captions_per_image=captions_per_image,
        precision=precision,
        device=device,
        new_tokens=new_tokens,
        text_tokens=text_tokens,
        itc=itc,
        workers=workers,
        fast_decode=fast_decode,
        gpu_decode=gpu_decode,
        repeats=repeats,
        peak_tflops=peak_tflops,
        threads=threads,
        cuda_graphs=cuda_graphs,
        compile=compile,
    )
    result = run_bench(config)
    if json_output:
        import json

        print(json.dumps(result, indent=2))
        return
    print_bench(result)


def print_bench(result: dict) -> None:
    from rich.table import Table

    out = console()
    out.print(
        f"[bold]{result['workload']}[/] · {result['model']} · {result['device']} · "
        f"{result['dtype']} · {result['images']} images, batch {result['batch_size']}"
    )
    out.print(f"level: {result['level']}")
    table = Table("", "seconds", "images/s", "pairs/s", "TFLOP/s", "of FLOP bound")
    sides = [("plain HF", "plain_hf"), ("capfilt", "capfilt")]
    for name, key in sides:
        side = result.get(key)
        if side is None:
            continue
        if side.get("error"):
            table.add_row(name, "-", "-", "-", "-", side["error"])
            continue
        table.add_row(
            name,
            f"{side['seconds']:.3f}",
            f"{side['images_per_s']:.2f}",
            "-" if side["pairs_per_s"] is None else f"{side['pairs_per_s']:.2f}",
            f"{side['tflops']:.4f}",
            f"{100 * side['fraction_of_bound']:.2f} %",
        )
    out.print(table)
    out.print(
        f"work {result['gflops_per_image']:.2f} GFLOP/image; FLOP bound "
        f"{result['bound_tflops']:.2f} TFLOP/s ({result['bound_source']}) = "
        f"{result['flop_bound_images_per_s']:.1f} images/s"
    )
    if result.get("speedup"):
        out.print(f"[bold]capfilt / plain HF: {result['speedup']:.2f}x[/]")
    if result.get("mfu") is not None:
        basis = "data-sheet peak" if result.get("spec_peak_tflops") else "measured bound"
        out.print(f"[bold]MFU {100 * result['mfu']:.1f} %[/] (of the {basis})")


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
    from capfilt.layout import Dataset
    from capfilt.query import run_query

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
