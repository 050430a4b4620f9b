"""curated/: the pairs of scores/ with ITM probability ≥ the threshold, derived without a
model. A run writes a new generation of curated/ and switches it in whole (see
core/layout.py), so a reader sees one threshold's pairs, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.layout import Dataset
from capfilt.stages.runner import Stage

SOURCES = ("web", "synthetic")


def curate(scores_table, threshold: float):
    """The pairs of a scores/ table with ITM probability ≥ threshold, as a CURATED_SCHEMA table."""
    import pyarrow.compute as pc

    mask = pc.fill_null(pc.greater_equal(scores_table["itm_score"], threshold), False)
    return scores_table.filter(mask).select(io.CURATED_SCHEMA.names).cast(io.CURATED_SCHEMA)


class CurateStage(Stage):
    """scores/ shard → curated/ shard (of a new generation): the pairs kept at the threshold."""

    name = "curate"
    output = "curated"
    inputs = ("scores",)
    hint = "run `capfilt filter DATASET --threshold T` first"
    unit = "shards"

    def provenance_options(self) -> dict:
        return {"threshold": self.options.threshold}

    def process(self, shard: int, inputs: dict, advance):
        return curate(inputs["scores"], self.options.threshold)

    def count(self, curated) -> dict:
        return {"pairs": curated.num_rows}


@dataclass
class SourceSummary:
    """Scores of one caption source over the whole dataset, and what curated/ keeps."""

    pairs: int = 0
    scored: int = 0
    kept: int = 0
    mean_itm: float | None = None
    mean_itc: float | None = None


def source_summaries(dataset: Dataset) -> dict[str, SourceSummary]:
    """Per source (web, synthetic): pairs and mean scores of scores/, pairs kept in curated/."""
    import pyarrow.compute as pc

    scores = dataset.folder("scores")
    curated = dataset.folder("curated")
    totals = {s: dict(pairs=0, scored=0, kept=0, itm=0.0, itc=0.0) for s in SOURCES}
    for shard in scores.shards():
        table = scores.read_shard(shard, ["source", "itm_score", "itc_score"])
        for source in SOURCES:
            rows = table.filter(pc.equal(table["source"], source))
            total = totals[source]
            total["pairs"] += rows.num_rows
            total["scored"] += rows.num_rows - rows["itm_score"].null_count
            total["itm"] += pc.sum(rows["itm_score"]).as_py() or 0.0
            total["itc"] += pc.sum(rows["itc_score"]).as_py() or 0.0
    for shard in curated.shards():
        table = curated.read_shard(shard, ["source"])
        for source in SOURCES:
            totals[source]["kept"] += pc.sum(pc.equal(table["source"], source)).as_py() or 0
    return {
        source: SourceSummary(
            pairs=t["pairs"],
            scored=t["scored"],
            kept=t["kept"],
            mean_itm=t["itm"] / t["scored"] if t["scored"] else None,
            mean_itc=t["itc"] / t["scored"] if t["scored"] else None,
        )
        for source, t in totals.items()
    }
