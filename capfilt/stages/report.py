"""`capfilt report`: gather the figures, write reports/summary.json and report.html."""

from __future__ import annotations

import json
from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGES, Dataset
from capfilt.report.figures import (
    collect_summary,
    pick_examples,
    resolve_threshold,
    sample_images,
    thumbnails,
    view_columns,
)
from capfilt.report.html import render_html


@dataclass
class Report:
    """What `build_report` wrote: the figures and where the two files are."""

    summary: dict
    html_path: str
    summary_path: str
    html_url: str


def build_report(
    dataset: Dataset, threshold: float | None = None, examples_per_group: int = 6
) -> Report:
    """Gather the figures, write reports/summary.json and reports/report.html."""
    from capfilt.core.sql import connect

    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist; check the path")
    if not any(dataset.has_stage(stage) for stage in STAGES):
        raise CapfiltError(
            f"{dataset.root!r} has no images/ shards yet; run `capfilt fetch` or "
            "`capfilt ingest` first"
        )
    threshold, origin = resolve_threshold(dataset, threshold)
    con = connect(dataset)
    summary = collect_summary(dataset, threshold, origin, con)

    image_columns = view_columns(con, "images") if dataset.has_stage("images") else None
    examples: dict = {}
    samples: list[dict] = []
    if dataset.has_stage("scores"):
        examples = pick_examples(con, threshold, examples_per_group, image_columns)
    elif dataset.has_stage("images"):
        samples = sample_images(con, examples_per_group * 2)

    keys = {r["key"] for groups in examples.values() for rows in groups.values() for r in rows}
    keys |= {r["key"] for r in samples}
    thumbs: dict = {}
    if keys and dataset.has_stage("images"):
        thumbs = thumbnails(connect(dataset, with_images=True), keys)

    page = render_html(summary, examples, samples, thumbs)
    dataset.fs.makedirs(dataset.reports_dir(), exist_ok=True)
    summary_path = dataset.join("reports", "summary.json")
    html_path = dataset.join("reports", "report.html")
    summary_json = json.dumps(summary, indent=2, ensure_ascii=False, default=str)
    io.write_bytes_atomic(dataset.fs, summary_path, summary_json.encode("utf-8"))
    io.write_bytes_atomic(dataset.fs, html_path, page.encode("utf-8"))
    return Report(summary, html_path, summary_path, dataset.url("reports", "report.html"))
