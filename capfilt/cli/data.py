"""The dataset commands: fetch, ingest, caption, filter, dedup, report, export-data, query."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.app import DatasetArg, command, console, literal, markup
from capfilt.cli.options import with_options
from capfilt.stages.caption import CaptionOptions
from capfilt.stages.dedup import DedupOptions
from capfilt.stages.export_data import ExportOptions
from capfilt.stages.fetch import FetchOptions
from capfilt.stages.filter import FilterOptions
from capfilt.stages.ingest import IngestOptions
from capfilt.stages.report import ReportOptions


# --- fetch, ingest (capfilt/stages/fetch.py, ingest.py) ----------------------------------------
def _rows_progress(terminal):
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
        TextColumn("rows · {task.fields[successes]} ok"),
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
            table.add_row(literal(message), str(n))
        out.print(table)
    if result.skipped_columns:
        out.print(
            markup(
                "[yellow]not kept[/] (names reserved for img2dataset's own columns): {names}",
                names=", ".join(result.skipped_columns),
            )
        )
    if result.invalid_utf8_values:
        out.print(
            f"[yellow]warning:[/] {result.invalid_utf8_values} values of the list were not valid "
            "UTF-8; their bad bytes became U+FFFD (\ufffd). Re-encode the list to UTF-8 to keep "
            "them"
        )
    if result.stale_downstream:
        stale = ", ".join(
            f"{folder}/ ({n} shards)" for folder, n in result.stale_downstream.items()
        )
        out.print(
            f"[yellow]images/ changed:[/] {stale} were made from the images replaced and are "
            "stale now; the next caption and filter runs redo them (`capfilt status` lists them)",
            soft_wrap=True,
        )


@command()
@with_options(FetchOptions, given_only=True)
def fetch(
    url_list: Annotated[
        str,
        typer.Argument(
            help="URL list: .csv, .tsv, .parquet, .jsonl, .json or .txt (optionally .gz), "
            "or a folder of such files."
        ),
    ],
    dataset: DatasetArg,
    options: dict,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="A data_manifests/*.toml of a known source: its [fetch] settings become the "
            "defaults (options given here still win)."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option(help="Show img2dataset's own output instead of a progress bar.")
    ] = False,
):
    """Download a URL list with img2dataset into DATASET/images/ Parquet shards.

    Every row of the list becomes exactly one row of images/, with `status` and
    `error_message` when it failed. Extra columns of the list are kept. Re-running the same
    command resumes: finished shards are skipped; another list or other options are refused
    unless --overwrite. Images whose server opts out of AI use (X-Robots-Tag: noai ...) are
    recorded as failures and not downloaded.

    Example: capfilt fetch cc3m.tsv cc3m --manifest data_manifests/cc3m.toml --processes 16
    """
    import contextlib

    from capfilt.cli.output import library_output_to, new_log_path
    from capfilt.stages.fetch import fetch as fetch_stage
    from capfilt.stages.fetch import options_from_manifest

    source = None
    if manifest is not None:
        fetch_options, source = options_from_manifest(manifest, **options)
        source = {**source, "manifest_file": str(manifest)}
    else:
        fetch_options = FetchOptions(**options)

    log_path = None if verbose else new_log_path("fetch")
    redirect = library_output_to(log_path) if log_path else contextlib.nullcontext(sys.stdout)
    try:
        with redirect as terminal:
            progress = _rows_progress(terminal)
            task = None

            def on_progress(done: int, total: int, successes: int) -> None:
                nonlocal task
                if task is None:  # the bar appears once the checks passed and rows flow
                    progress.start()
                    task = progress.add_task("fetch", total=None, successes=0)
                progress.update(task, completed=done, total=total, successes=successes)

            try:
                result = fetch_stage(
                    url_list, dataset, fetch_options, on_progress=on_progress, source=source
                )
            finally:
                progress.stop()
    except BaseException as e:
        _keep_log_of_failure(log_path, e)
        raise

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
            "to retry them",
            literal(f"; img2dataset's log: {log_path}" if log_path else ""),
            sep="",
        )
    elif log_path:
        with contextlib.suppress(OSError):
            Path(log_path).unlink()


def _keep_log_of_failure(log_path: str | None, error: BaseException) -> None:
    """After a failed fetch: delete img2dataset's log unless it says something about a crash."""
    from capfilt.core.errors import CapfiltError

    if log_path is None:
        return
    path = Path(log_path)
    if isinstance(error, CapfiltError | KeyboardInterrupt) or not path.stat().st_size:
        path.unlink(missing_ok=True)
    else:
        console(stderr=True).print(literal(f"img2dataset's log: {log_path}"), soft_wrap=True)


@command()
@with_options(IngestOptions)
def ingest(
    source: Annotated[
        str,
        typer.Argument(
            help="A folder of images (with captions.csv/.tsv/.jsonl, or none), a captions "
            "file, or a COCO-style / BLIP annotation .json."
        ),
    ],
    dataset: DatasetArg,
    options: IngestOptions,
):
    """Put local images and captions into DATASET/images/, in the same layout as `fetch`.

    One row per image-caption pair (a COCO image with five captions gives five rows). A
    missing or unreadable image becomes a row with `status` and `error_message`. Re-running
    the same command resumes; another SOURCE is refused unless --overwrite.

    Example: capfilt ingest annotations/captions_train2014.json coco --image-root train2014
    """
    from capfilt.stages.ingest import ingest as ingest_stage

    result = ingest_stage(source, dataset, options)
    _print_download_summary(result, f"ingest ({result.kind})")
    if result.unlisted_files:
        console().print(
            f"[yellow]note:[/] {result.unlisted_files} image files in the folder have no row "
            "in the captions file and were not ingested"
        )


# --- caption, filter (capfilt/stages/caption.py, filter.py) -----------------------------------
@command()
@with_options(CaptionOptions)
def caption(dataset: DatasetArg, options: CaptionOptions):
    """Write synthetic captions of every downloaded image to captions/ (BLIP, nucleus sampling).

    --model also takes BLIP-2 and image-text-to-text models of transformers (LLaVA, SmolVLM,
    PaliGemma, ...), prompted through their chat template. Works shard by shard and skips the
    shards already captioned with these options; shards captioned with other options are
    refused unless --overwrite. Under `accelerate launch -m capfilt caption ...` each process
    takes its own shards.

    Example: capfilt caption ds --num-captions 3 --batch-size 64

    Example: capfilt caption ds --model HuggingFaceTB/SmolVLM-256M-Instruct --max-length 60
    """
    from capfilt.stages.caption import caption_dataset

    result = caption_dataset(dataset, options)
    if not _is_main_process():
        return
    run = result.run
    model = result.model
    rows = [
        ("shards captioned", f"{run.shards_done}"),
        ("shards skipped (done before)", f"{run.shards_skipped}"),
        ("images", f"{result.images}"),
        ("captions written", f"{result.captions}"),
        ("errors (undecodable images)", f"{result.errors}"),
        ("images/s", f"{result.images_per_second:,.1f}"),
        ("model", f"{model.get('id')} @ {model.get('revision') or '-'}"),
    ]
    _print_stage_notes(run)
    _print_summary("caption", rows)


@command(name="filter")
@with_options(FilterOptions)
def filter_(dataset: DatasetArg, options: FilterOptions):
    """Score web and synthetic captions with BLIP ITM/ITC (and CLIP, SigLIP) into scores/,
    keep the good ones.

    The pairs the rule keeps go to curated/, switched in whole. The rule: ITM probability ≥
    --threshold, the --top-fraction of the dataset by a score column (--by), an SQL --where
    condition over the score columns; given together, a pair meets them all. --keep-best K
    then keeps at most the K best synthetic captions of each image. Running it again with
    another rule re-derives curated/ from scores/ without loading the model.

    Example: capfilt filter ds --threshold 0.5

    Example (DataComp): capfilt filter ds --clip-model M --top-fraction 0.3 --by clip_score
    """
    from capfilt.stages.filter import filter_dataset

    result = filter_dataset(dataset, options)
    if not _is_main_process():
        return
    scored = result.scored
    rows = [
        ("shards scored", f"{scored.shards_done}"),
        ("shards skipped (scored before)", f"{scored.shards_skipped}"),
        ("images scored", f"{scored.counts.get('images', 0)}"),
        ("pairs scored", f"{scored.counts.get('pairs', 0)}"),
        ("errors (undecodable images)", f"{scored.counts.get('errors', 0)}"),
    ]
    if result.rescored:
        model = result.model
        rows.append(("model", f"{model.get('id')} @ {model.get('revision') or '-'}"))
        rows.append(("ITM token", f"{result.itm_token}"))
    else:
        rows.append(("model", "not loaded: curated/ re-derived from scores/"))
    embedded = result.embedded
    if embedded is not None and embedded.shards_done:
        rows.append(("embeddings/", f"{embedded.shards_done} shards made (vision encoder only)"))
    curated = result.curated
    if curated.plan.generation is not None:
        rows.append(("curated/", f"generation {curated.plan.generation} switched in"))
    else:
        rows.append(("curated/", "up to date (same rule and scores)"))
    _print_stage_notes(scored)
    _print_summary(f"filter, {result.selection}", rows)

    from rich.table import Table

    from capfilt.stages.curate import score_label

    # Every score column with a value (clip_score only where --clip-model scored it).
    columns = [
        c
        for c in dict.fromkeys(c for s in result.sources.values() for c in s.means)
        if any(s.means.get(c) is not None for s in result.sources.values())
    ] or ["itm_score", "itc_score"]
    table = Table("source", "pairs scored", "kept", *(f"mean {score_label(c)}" for c in columns))
    for source, s in result.sources.items():
        means = [s.means.get(c) for c in columns]
        cells = ["-" if mean is None else f"{mean:.3f}" for mean in means]
        table.add_row(literal(source), f"{s.scored}", f"{s.kept}", *cells)
    console().print(table)


# --- dedup (capfilt/stages/dedup.py) -------------------------------------------------------------
@command()
@with_options(DedupOptions)
def dedup(dataset: DatasetArg, options: DedupOptions):
    """Find duplicate images and copies of evaluation images; keep each image once.

    Hashes every image into hashes/ (SHA-256 of the bytes and of the pixels, a perceptual
    hash; per shard, resumable), then groups the whole dataset into dedup/: exact copies,
    the same pixels, perceptual near-duplicates (pHash within --phash-distance bits),
    semantic near-duplicates (the filter's image embeddings, cosine >= 1 - eps), placeholders,
    and images that copy one of an --against evaluation set (contaminated). Of each group one
    image is kept (the best filter score, then the most pixels, then the smallest key);
    nothing is deleted: each image's group, representative and reason are in dedup/. curated/
    is derived again without the images not kept, and export-data leaves them out. A re-run
    with the same data and options does nothing; other options group again without hashing.

    Example: capfilt dedup ds --against coco-karpathy-test
    """
    from capfilt.stages.dedup import dedup_dataset

    result = dedup_dataset(dataset, options)
    summary = result.summary
    hashed = result.hashed
    rows = [
        ("shards hashed", f"{hashed.shards_done}"),
        ("shards skipped (hashed before)", f"{hashed.shards_skipped}"),
        ("images hashed now", f"{hashed.counts.get('images', 0)}"),
        ("errors (undecodable images)", f"{hashed.counts.get('errors', 0)}"),
    ]
    if result.regrouped:
        rows.append(("dedup/", f"generation {result.grouped.plan.generation} switched in"))
    else:
        rows.append(("dedup/", "up to date (same hashes, inputs and options)"))
    rows += [
        ("images judged", f"{summary.get('images', 0)}"),
        ("kept", f"{summary.get('kept', 0)}"),
        ("groups of more than one image", f"{summary.get('groups', 0)}"),
        ("largest group", f"{summary.get('largest_group', 0)}"),
    ]
    for reason, n in summary.get("removed_by_reason", {}).items():
        if n:
            rows.append((f"removed: {reason}", f"{n}"))
    for root, n in summary.get("contaminated_by", {}).items():
        rows.append((f"contaminated by {root}", f"{n}"))
    curated = result.curated
    if curated is not None and curated.plan.generation is not None:
        rows.append(("curated/", f"generation {curated.plan.generation} switched in"))
    elif curated is not None:
        rows.append(("curated/", "up to date"))
    _print_stage_notes(hashed)
    for note in result.notes:
        console().print("[yellow]note:[/] ", literal(note), sep="", soft_wrap=True)
    _print_summary("dedup", rows)


def _print_stage_notes(run) -> None:
    """What the runner did beyond the usual: stale shards redone, orphans removed."""
    from capfilt.core.provenance import STALE, shard_list

    stale = [s for s in run.plan.todo if run.plan.checks[s].state == STALE]
    if stale and not run.plan.overwrite:
        why = run.plan.checks[stale[0]].why
        console().print(
            f"[yellow]redone:[/] {len(stale)} stale shards ({shard_list(stale)}): ",
            literal(why),
            sep="",
            soft_wrap=True,
        )
    if run.plan.orphans:
        console().print(
            f"[yellow]removed:[/] {len(run.plan.orphans)} shards whose input shard is gone "
            f"({shard_list(run.plan.orphans)})"
        )


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title=literal(title), show_header=False)  # a --where is the user's text
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, literal(value))
    console().print(table)


# --- report, export-data (capfilt/stages/report.py, export_data.py) ----------------------------
@command()
@with_options(ReportOptions)
def report(
    dataset: DatasetArg,
    options: ReportOptions,
    open_report: Annotated[
        bool, typer.Option("--open", help="Open the report in the web browser.")
    ] = False,
):
    """Summarise the dataset in the terminal and write a report: report.html, summary.json.

    The HTML report is one self-contained file: totals per stage, fetch errors, ITM
    histograms with the threshold, what each threshold would keep, kept and dropped examples
    with thumbnails, and the filter's precision and recall where the dataset has truth columns.
    Each run writes a new generation of reports/ (reports/gen-N/) and switches it in whole.

    Example: capfilt report ds --threshold 0.6 --open
    """
    from capfilt.core.layout import Dataset
    from capfilt.report.terminal import print_summary
    from capfilt.stages.report import build_report

    result = build_report(
        Dataset(dataset),
        threshold=options.threshold,
        examples_per_group=options.examples,
        evaluations=options.evaluations,
    )
    out = console()
    print_summary(result.summary, out)
    out.print(literal(f"wrote {result.html_url} and {result.summary_path}"), soft_wrap=True)
    if open_report:
        import webbrowser

        if "://" in result.html_url:
            out.print("the report is not on this machine; copy it here to open it")
        else:
            webbrowser.open(Path(result.html_url).resolve().as_uri())


@command("export-data")
@with_options(ExportOptions)
def export_data(dataset: DatasetArg, options: ExportOptions):
    """Export the curated pairs with their images for training code.

    The export is written beside --out and put in place whole when done (a killed run resumes);
    --out must be new, empty, or an earlier export (replaced only with --overwrite).

    Example: capfilt export-data ds --format webdataset --out ds-wds
    """
    from capfilt.core.layout import Dataset
    from capfilt.stages.export_data import export_data as run_export

    result = run_export(Dataset(dataset), options.format, options.out, overwrite=options.overwrite)
    console().print(
        literal(
            f"exported {result.pairs:,} pairs of {result.images:,} images as {result.format} "
            f"({result.shards} shards) to {result.out}"
        ),
        soft_wrap=True,
    )
    if result.missing_images:
        console(stderr=True).print(
            markup(
                f"[yellow]warning:[/] {len(result.missing_images)} curated images have no "
                "image bytes in images/ and were not exported (e.g. key {key})",
                key=result.missing_images[0],
            ),
            soft_wrap=True,
        )


# --- status (capfilt/stages/status.py) ----------------------------------------------------------
@command()
def status(
    dataset: DatasetArg,
    json_output: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
):
    """Show each stage's shards as done, stale or pending, and why.

    A shard is done when its provenance matches its file and the input shards it was made from
    are still there, unchanged; stale shards name what changed (re-fetched images, re-written
    captions, other options). Nothing is written.

    Example: capfilt status ds
    """
    from capfilt.stages.status import dataset_status

    result = dataset_status(dataset)
    if json_output:
        import json

        print(json.dumps(result.to_dict(), indent=2))
        return
    print_status(result)


def print_status(result) -> None:
    from rich.table import Table

    from capfilt.core.provenance import shard_list

    out = console()
    table = Table("folder", "shards", "done", "stale", "pending", "", title=literal(result.dataset))
    for folder in result.folders:
        if not folder.shards and not folder.orphans:
            table.add_row(f"{folder.folder}/", "-", "", "", "", "not run")
            continue
        table.add_row(
            f"{folder.folder}/",
            str(folder.shards),
            str(len(folder.done)),
            str(len(folder.stale)) if folder.stale else "",
            str(len(folder.pending)) if folder.pending else "",
            literal(folder.note),
        )
    out.print(table)
    for folder in result.folders:
        for reason, shards in folder.reasons.items():
            which = "" if folder.folder == "reports" else f" {shard_list(shards)}"
            out.print(literal(f"{folder.folder}/{which} {reason}"), soft_wrap=True)
    if all(f.up_to_date for f in result.folders):
        out.print("every stage is up to date")


# --- query (capfilt/stages/query.py) ----------------------------------------------------------
class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@command()
def query(
    dataset: DatasetArg,
    sql: Annotated[
        str,
        typer.Argument(
            help="SQL over the views images, captions, scores, curated, embeddings, hashes, "
            "dedup, dedup_groups."
        ),
    ],
    format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Output as a table, CSV or JSON lines.")
    ] = OutputFormat.table,
    with_images: Annotated[
        bool, typer.Option(help="Keep the `jpg` bytes column in the `images` view.")
    ] = False,
    allow_external_access: Annotated[
        bool,
        typer.Option(
            "--allow-external-access",
            help="Lift the sandbox: the SQL may read and write other files and reach the "
            "network. Use it knowingly.",
        ),
    ] = False,
):
    """Run DuckDB SQL over the dataset's Parquet shards.

    Views: `images` (without the image bytes unless --with-images), `captions`, `scores`,
    `curated`, `embeddings`, `hashes`, `dedup` — one for each stage that has run — and
    `dedup_groups`, every duplicate group of more than one image.

    The SQL runs in a sandbox: it reads those views and nothing else. Reading other files,
    COPY/EXPORT, ATTACH, INSTALL/LOAD and SET are refused unless --allow-external-access.

    Example: capfilt query ds "select status, count(*) from images group by 1"
    """
    from capfilt.core.layout import Dataset
    from capfilt.stages.query import run_query

    columns, rows = run_query(
        Dataset(dataset),
        sql,
        with_images=with_images,
        allow_external_access=allow_external_access,
    )
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
        from rich.text import Text

        table = Table(show_lines=False)
        for name in columns:
            table.add_column(literal(name))
        for row in rows:
            table.add_row(*(Text("NULL", style="dim") if v is None else literal(v) for v in row))
        console().print(table)
