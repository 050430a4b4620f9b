"""What fetch and ingest share: the options of writing images/ shards, declared once, the
per-shard stats file img2dataset writes, and what a run of either reports.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from capfilt.core.options import option

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")


def image_size_option():
    return option(384, "Resize target in pixels.", ge=1, output=True)


def resize_mode_option():
    return option("keep_ratio", "img2dataset's resize mode.", choices=RESIZE_MODES, output=True)


def shard_size_option():
    # Keys are numbered by shard, so another shard size is another dataset.
    return option(10_000, "Rows per images/ shard.", ge=1, output=True)


def overwrite_images_option(stage: str):
    return option(
        False,
        f"Replace the images/ shards already written (only capfilt's files); the stages after "
        f"{stage} then redo their shards.",
    )


def shard_stats(statuses: list[str], messages: list[str | None], start: float, end: float):
    """img2dataset's NNNNN_stats.json of one shard: counts, and rows per status message."""
    by_status = Counter(statuses)
    return {
        "count": len(statuses),
        "successes": by_status["success"],
        "failed_to_download": by_status["failed_to_download"],
        "failed_to_resize": by_status["failed_to_resize"],
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": dict(Counter(m or "success" for m in messages)),
    }


def counts_of(stats: dict) -> dict:
    """The counters of one shard's stats, as the runner sums them (errors by message)."""
    counts = {k: stats.get(k, 0) for k in COUNTS}
    counts["errors"] = {m: n for m, n in stats.get("status_dict", {}).items() if m != "success"}
    return counts


@dataclass
class ImagesResult:
    """What one fetch or ingest run wrote to images/."""

    dataset: str
    shards_done_now: list[int]
    shards_skipped: list[int]
    counts: dict  # this run: count, successes, failed_to_download, failed_to_resize
    errors: dict  # this run: error message -> rows
    skipped_columns: list[str]
    invalid_utf8_values: int = 0  # list values whose invalid UTF-8 bytes became U+FFFD
    # Shards of the later stages that are stale now that images/ changed (folder -> count).
    stale_downstream: dict = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.counts["successes"] / self.counts["count"] if self.counts["count"] else 0.0


def run_totals(counts: dict) -> tuple[dict, dict]:
    """(counts, errors most frequent first) of a run, from the runner's summed counters."""
    errors = Counter(counts.get("errors", {}))
    return {k: counts.get(k, 0) for k in COUNTS}, dict(errors.most_common())
