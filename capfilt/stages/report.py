"""`capfilt report`: gather the figures, write summary.json and report.html as a new
generation of reports/ (reports/gen-N/), switched in whole.

The report's provenance (in reports/current.json) holds its options and a fingerprint of every
folder it read, so `capfilt status` can tell when the data moved on since.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGE_FOLDERS, Dataset
from capfilt.core.options import Options, option
from capfilt.core.provenance import folder_fingerprint
from capfilt.report.figures import (
    collect_summary,
    compare_models,
    dedup_examples,
    pick_examples,
    read_evaluations,
    resolve_rule,
    sample_images,
    thumbnails,
    view_columns,
)
from capfilt.report.html import render_html
from capfilt.stages.runner import publish_generation

REPORT_FILE, SUMMARY_FILE = "report.html", "summary.json"


@dataclass(frozen=True, kw_only=True)
class ReportOptions(Options):
    """Options of `capfilt report`."""

    threshold: float | None = option(
        None,
        "ITM threshold to report at, with the rest of curated/'s rule (top fraction, "
        "--where, --keep-best).",
        ge=0,
        le=1,
        cli_default="the one curated/ was made at, else 0.5",
    )
    examples: int = option(6, "Examples per group (kept/dropped, clear/borderline).", ge=1)
    evaluations: tuple[str, ...] = option(
        (),
        "Compare models trained on this data: LABEL=FILE, a result of `capfilt evaluate --out` "
        "(repeat for each model; the demo compares the noisy web with CapFilt).",
        flag="--evaluation",
    )


@dataclass
class Report:
    """What `build_report` wrote: the figures and where the two files are."""

    summary: dict
    html_path: str
    summary_path: str
    html_url: str
    generation: int


def read_summary(dataset: Dataset) -> dict | None:
    """summary.json of the report that readers see, None when no report was written."""
    folder = dataset.folder("reports")
    try:
        with dataset.fs.open(f"{folder.path}/{SUMMARY_FILE}", "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def report_file(dataset: Dataset) -> str:
    """Where the report that readers see is (a path or URL)."""
    folder = dataset.folder("reports")
    relative = folder.path[len(dataset.path) + 1 :].split("/")
    return dataset.url(*relative, REPORT_FILE)


def report_inputs(folders: dict) -> dict:
    """A fingerprint of each stage folder a report reads."""
    return {stage: folder_fingerprint(folder) for stage, folder in folders.items()}


def build_report(
    dataset: Dataset,
    threshold: float | None = None,
    examples_per_group: int = 6,
    evaluations: tuple[str, ...] = (),
) -> Report:
    """Gather the figures, write a new generation of reports/ and switch it in; `evaluations`
    (LABEL=FILE of `capfilt evaluate --out`) adds a table comparing those models."""
    from capfilt.core.sql import connect

    models = compare_models(read_evaluations(evaluations))  # a bad file fails first
    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist; check the path")
    # One generation of curated/ and dedup/.
    folders = {stage: dataset.folder(stage) for stage in STAGE_FOLDERS}
    if not any(folder.shards() for folder in folders.values()):
        raise CapfiltError(
            f"{dataset.root!r} has no images/ shards yet; run `capfilt fetch` or "
            "`capfilt ingest` first"
        )
    dataset.ensure_writable("reports")  # before the work, not after it
    rule, origin = resolve_rule(folders["curated"], threshold)
    threshold = rule.threshold
    con = connect(dataset, folders=folders)
    summary = collect_summary(dataset, rule, origin, con, folders)
    summary["models"] = models

    has_images, has_scores = bool(folders["images"].shards()), bool(folders["scores"].shards())
    image_columns = view_columns(con, "images") if has_images else None
    examples: dict = {}
    samples: list[dict] = []
    if has_scores:
        examples = pick_examples(con, threshold, examples_per_group, image_columns, rule=rule)
    elif has_images:
        samples = sample_images(con, examples_per_group * 2)

    duplicates = dedup_examples(con, examples_per_group) if summary["dedup"] else {}
    keys = {r["key"] for groups in examples.values() for rows in groups.values() for r in rows}
    keys |= {r["key"] for r in samples}
    keys |= {r[k] for rows in duplicates.values() for r in rows for k in ("key", "representative")}
    for group in (summary["dedup"] or {}).get("largest_groups", []):
        keys |= {member["key"] for member in group["members"]}
    thumbs: dict = {}
    if keys and has_images:
        thumbs = thumbnails(connect(dataset, with_images=True, folders=folders), keys)
    page = render_html(summary, examples, samples, thumbs, duplicates)
    summary_json = json.dumps(summary, indent=2, ensure_ascii=False, default=str)

    def write(path: str) -> None:
        io.write_bytes_atomic(dataset.fs, f"{path}/{SUMMARY_FILE}", summary_json.encode("utf-8"))
        io.write_bytes_atomic(dataset.fs, f"{path}/{REPORT_FILE}", page.encode("utf-8"))

    record = dict(
        stage="report",
        options=dict(threshold=threshold, examples=examples_per_group, evaluations=evaluations),
        inputs=report_inputs(folders),
    )
    generation, path = publish_generation(dataset, "reports", write, record, "capfilt report")
    html_url = dataset.url(*path[len(dataset.path) + 1 :].split("/"), REPORT_FILE)
    return Report(summary, f"{path}/{REPORT_FILE}", f"{path}/{SUMMARY_FILE}", html_url, generation)
