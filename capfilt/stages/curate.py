"""curated/: the pairs of scores/ that the selection rule keeps, derived without a model.

The rule: a pair is kept when its ITM probability is ≥ the threshold; with --keep-best K, of
each image's synthetic captions only the K of highest ITM among those are kept (generate many,
keep the best: BLIP-2 kept 2, LAION-COCO 1 of 40). The web caption is judged by the threshold
alone. A run writes a new generation of curated/ and switches it in whole (see
core/layout.py), so a reader sees one rule's pairs, never a mix.

Images that `capfilt dedup` does not keep (a duplicate of another image kept, a placeholder,
a copy of an evaluation image: dedup/ `kept` false) are left out of curated/, whatever their
scores: dedup/ shard N is read beside scores/ shard N, and a new dedup/ generation makes
curated/ stale (the dedup command re-derives it at once).

Keep-best ranks an image's captions within one scores/ shard, and that shard holds all of
them: scores/ shard N is made from images/ shard N and captions/ shard N alone
(stages/filter.py), and an image's key is in one images/ shard only (img2dataset's key, and
ingest's, is the shard number followed by the row). tests/test_filter.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.layout import Dataset
from capfilt.stages.runner import Stage

SOURCES = ("web", "synthetic")


def curate(scores_table, threshold: float, keep_best: int | None = None):
    """The pairs of a scores/ table that the rule keeps, as a CURATED_SCHEMA table: those with
    ITM probability ≥ threshold and, with `keep_best`, at most that many synthetic pairs per
    image (`best_synthetic`). Rows keep their order in scores/."""
    import pyarrow.compute as pc

    mask = pc.fill_null(pc.greater_equal(scores_table["itm_score"], threshold), False)
    kept = scores_table.filter(mask)
    if keep_best is not None:
        kept = kept.filter(best_synthetic(kept, keep_best))
    return kept.select(io.CURATED_SCHEMA.names).cast(io.CURATED_SCHEMA)


def dropped_keys(dedup_table):
    """The keys of a dedup/ table whose image dedup does not keep."""
    import pyarrow.compute as pc

    dropped = pc.fill_null(pc.invert(dedup_table["kept"]), False)
    return dedup_table["key"].filter(dropped)


def without_dropped(table, dedup_table):
    """The rows of `table` (scores/ or curated/) whose image dedup keeps: all of them when
    dedup has not run (`dedup_table` None). Whole images go, so keep-best is unaffected."""
    import pyarrow.compute as pc

    if dedup_table is None:
        return table
    return table.filter(pc.invert(pc.is_in(table["key"], dropped_keys(dedup_table))))


def best_synthetic(pairs, keep_best: int):
    """A mask over `pairs` (scores/ rows): every web pair, and of each image's synthetic pairs
    the `keep_best` of highest ITM score. A tie goes to the lower text_id (the earlier
    caption), so the same scores always keep the same pairs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = np.ones(pairs.num_rows, dtype=bool)
    is_synthetic = pc.fill_null(pc.equal(pairs["source"], "synthetic"), False)
    synthetic = np.flatnonzero(is_synthetic.to_numpy())  # row numbers in `pairs`
    if len(synthetic) == 0:
        return pa.array(keep)
    candidates = pairs.select(["key", "itm_score", "text_id"]).take(synthetic)
    order = pc.sort_indices(
        candidates,
        sort_keys=[("key", "ascending"), ("itm_score", "descending"), ("text_id", "ascending")],
    ).to_numpy()
    keys = candidates["key"].take(order).to_numpy()
    # Sorted by image, best first: a pair's rank is its distance from its image's first pair.
    position = np.arange(len(keys))
    first_of_image = np.r_[True, keys[1:] != keys[:-1]]
    rank = position - np.maximum.accumulate(np.where(first_of_image, position, 0))
    keep[synthetic[order[rank >= keep_best]]] = False
    return pa.array(keep)


def selection_options(threshold: float, keep_best: int | None) -> dict:
    """The rule as curated/'s provenance records it. keep_best only when set, so that curated/
    derived before --keep-best existed is still done for its threshold."""
    options: dict = {"threshold": threshold}
    if keep_best is not None:
        options["keep_best"] = keep_best
    return options


def describe_selection(threshold: float, keep_best: int | None, precision: str = "g") -> str:
    """The rule in words: 'threshold 0.5', or 'threshold 0.5, best 2 synthetic per image'."""
    rule = f"threshold {threshold:{precision}}"
    return rule if keep_best is None else f"{rule}, best {keep_best} synthetic per image"


class CurateStage(Stage):
    """scores/ shard → curated/ shard (of a new generation): the pairs the rule keeps."""

    name = "curate"
    output = "curated"
    inputs = ("scores",)
    optional_inputs = ("dedup",)
    hint = "run `capfilt filter DATASET --threshold T` first"
    unit = "shards"

    def provenance_options(self) -> dict:
        return selection_options(self.options.threshold, self.options.keep_best)

    def process(self, shard: int, inputs: dict, advance):
        # Shard-local keep-best is per image: a scores/ shard holds every caption of its images.
        scores = without_dropped(inputs["scores"], inputs.get("dedup"))
        return curate(scores, self.options.threshold, self.options.keep_best)

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
