"""`capfilt filter`: ITM and ITC scores of every caption, and the pairs kept at a threshold.

For each images/ shard, every downloaded image is paired with its web caption (text_id 0) and
each synthetic caption from captions/ (text_id caption_id + 1). The vision encoder runs once
per image; all pairs are scored into scores/. Then curated/ is derived from scores/ alone: the
pairs with ITM probability ≥ threshold. A new threshold on a scored dataset only re-derives
curated/, without loading a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from capfilt.core import distributed
from capfilt.core import parquet as io
from capfilt.core.ahead import ordered_map
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.progress import image_progress
from capfilt.images.batches import (
    ShardImages,
    count_successful,
    recorded_options,
    stage_batches,
    successful_images,
)
from capfilt.models.blip import (
    DEFAULT_FILTER,
    ITM_TOKENS,
    PRECISIONS,
    check_engine,
    model_record,
)

SOURCES = ("web", "synthetic")


@dataclass(frozen=True)
class FilterConfig:
    """Options of `capfilt filter`."""

    threshold: float
    model: str = DEFAULT_FILTER
    itm_token: str = "auto"
    batch_size: int = 32
    precision: str = "auto"
    device: str = "auto"
    num_workers: int | None = None  # decoding processes; None: 2 on GPU, 0 (threads) on CPU
    # BLIP's ITM reads at most 35 text tokens.
    max_text_tokens: int = 35
    engine: str = "fast"
    fast_decode: bool = False  # JPEGs decoded at a reduced scale: faster, not pixel-exact
    gpu_decode: bool = False  # plain JPEGs decoded on the model's device (torchvision)
    overwrite: bool = False

    def __post_init__(self):
        check_engine(self.engine)
        if not 0 <= self.threshold <= 1:
            raise CapfiltError(
                f"--threshold is an ITM probability and must be in [0, 1], got {self.threshold}"
            )
        if self.itm_token not in ITM_TOKENS:
            raise CapfiltError(f"--itm-token must be one of {', '.join(ITM_TOKENS)}")
        if self.batch_size < 1:
            raise CapfiltError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise CapfiltError(f"--workers must be ≥ 0, got {self.num_workers}")
        if self.max_text_tokens < 3:
            raise CapfiltError(f"--max-text-tokens must be at least 3, got {self.max_text_tokens}")
        if self.precision not in PRECISIONS:
            raise CapfiltError(f"--precision must be one of {', '.join(PRECISIONS)}")


@dataclass
class SourceSummary:
    """Scores of one caption source over the whole dataset, and what the threshold kept."""

    pairs: int = 0
    scored: int = 0
    kept: int = 0
    mean_itm: float | None = None
    mean_itc: float | None = None


@dataclass
class FilterResult:
    """What one `capfilt filter` run did, summed over its processes."""

    threshold: float
    shards_scored: int
    shards_skipped: int
    images: int
    pairs: int
    errors: int
    seconds: float
    model: str
    revision: str | None
    itm_token: str | None
    sources: dict[str, SourceSummary] = field(default_factory=dict)

    @property
    def rescored(self) -> bool:
        return self.shards_scored > 0


def synthetic_captions(captions_table) -> dict[str, list[tuple[int, str]]]:
    """key → [(caption_id, text)] of the successful captions of one captions/ table."""
    found: dict[str, list[tuple[int, str]]] = {}
    if captions_table is None:
        return found
    for key, caption_id, text, status in zip(
        captions_table["key"].to_pylist(),
        captions_table["caption_id"].to_pylist(),
        captions_table["text"].to_pylist(),
        captions_table["status"].to_pylist(),
        strict=True,
    ):
        if status == "success" and text is not None:
            found.setdefault(str(key), []).append((caption_id, text))
    for texts in found.values():
        texts.sort()
    return found


def score_shard(scorer, images_table, captions_table, config: FilterConfig, on_images=None):
    """Score the web and synthetic captions of one shard's images; return a SCORES_SCHEMA table.

    Pairs of an image that cannot be decoded, and a missing web caption, get null scores.
    Images are decoded, and each batch's pairs tokenized, in background threads ahead of the
    model (`image_batches`, `ordered_map`).
    """
    table = successful_images(images_table)
    keys = [str(k) for k in table["key"].to_pylist()]
    web = table["caption"].to_pylist() if "caption" in table.column_names else [None] * len(keys)
    synthetic = synthetic_captions(captions_table)
    rows = ShardImages(keys, table["jpg"].to_pylist(), extra={"caption": web})
    model = scorer.model_id

    def pairs_of(batch) -> BatchPairs:
        pairs = BatchPairs(batch)
        for key, index, web_caption in zip(
            batch.keys, batch.pixel_index, batch.extra["caption"], strict=True
        ):
            texts = [(0, "web", web_caption)]
            texts += [(cid + 1, "synthetic", text) for cid, text in synthetic.get(key, [])]
            for text_id, source, text in texts:
                row = dict(
                    key=key,
                    text_id=text_id,
                    source=source,
                    text=text,
                    itm_score=None,
                    itc_score=None,
                    model=model,
                )
                pairs.rows.append(row)
                if index is not None and text is not None:
                    pairs.scored_rows.append(row)
                    pairs.image_index.append(index)
                    pairs.texts.append(text)
        if pairs.texts:
            pairs.tokens = scorer.tokenize_cpu(pairs.texts)
        return pairs

    batches = stage_batches(rows, scorer, config)
    out = []
    for pairs in ordered_map(pairs_of, batches, threads=1):
        batch = pairs.batch
        if pairs.texts:
            features = scorer.encode_images(batch.pixel_values)
            itm, itc = scorer.score(features, pairs.image_index, pairs.texts, pairs.tokens)
            for row, itm_score, itc_score in zip(
                pairs.scored_rows, itm.tolist(), itc.tolist(), strict=True
            ):
                row["itm_score"], row["itc_score"] = itm_score, itc_score
        out.extend(pairs.rows)
        if on_images is not None:
            on_images(len(batch))
    return io.rows_to_table(out, io.SCORES_SCHEMA)


@dataclass
class BatchPairs:
    """The score rows of one image batch, and the (image, text) pairs among them to score."""

    batch: object  # ImageBatch
    rows: list[dict] = field(default_factory=list)  # every row, scored or not, in order
    scored_rows: list[dict] = field(default_factory=list)  # rows of a decoded image with text
    image_index: list[int] = field(default_factory=list)  # pixel row of each scored pair
    texts: list[str] = field(default_factory=list)
    tokens: tuple | None = None  # (input_ids, attention_mask) CPU tensors of `texts`


def curate(scores_table, threshold: float):
    """The pairs of a scores/ table with ITM probability ≥ threshold, as a CURATED_SCHEMA table."""
    import pyarrow.compute as pc

    mask = pc.fill_null(pc.greater_equal(scores_table["itm_score"], threshold), False)
    return scores_table.filter(mask).select(io.CURATED_SCHEMA.names).cast(io.CURATED_SCHEMA)


def source_totals(scores_table, curated_table) -> dict[str, dict]:
    """Per source: pairs, scored pairs, kept pairs and score sums (to be merged across shards)."""
    import pyarrow.compute as pc

    totals = {}
    for source in SOURCES:
        scores = scores_table.filter(pc.equal(scores_table["source"], source))
        kept = curated_table.filter(pc.equal(curated_table["source"], source))
        totals[source] = dict(
            pairs=scores.num_rows,
            scored=scores.num_rows - scores["itm_score"].null_count,
            kept=kept.num_rows,
            itm_sum=pc.sum(scores["itm_score"]).as_py() or 0.0,
            itc_sum=pc.sum(scores["itc_score"]).as_py() or 0.0,
        )
    return totals


def stale_scores(ds: Dataset, shards: list[int]) -> list[int]:
    """Scored shards whose captions/ shard was written after them (caption re-run since)."""
    stale = []
    for shard in shards:
        captions = ds.shard_path("captions", shard)
        try:
            if ds.fs.exists(captions) and ds.fs.modified(captions) > ds.fs.modified(
                ds.shard_path("scores", shard)
            ):
                stale.append(shard)
        except (NotImplementedError, FileNotFoundError, OSError):  # no mtimes on this filesystem
            pass
    return stale


def filter_dataset(
    dataset: Dataset | str, config: FilterConfig, scorer=None, progress: bool = True
) -> FilterResult:
    """Score every pending shard into scores/, derive curated/ at the threshold, record the run.

    A shard is pending when it has no scores/ shard, or its captions/ shard is newer. With
    nothing pending no model is loaded: only curated/ is re-derived.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    ds.require_stage("images", "run `capfilt fetch` or `capfilt ingest` first")
    started = time.perf_counter()
    processes = distributed.current()
    all_shards = ds.shards("images")
    pending = ds.pending("images", "scores", overwrite=config.overwrite)
    if not config.overwrite:
        pending = sorted(set(pending) | set(stale_scores(ds, ds.shards("scores"))))
    mine = processes.my_shards(pending)
    if processes.is_main:
        ds.remove_temp_files("scores")
        ds.remove_temp_files("curated")
    processes.wait_for_everyone()

    counts = dict(shards=0, images=0, pairs=0, errors=0, shards_without_captions=0)
    if mine and scorer is None:
        from capfilt.models.blip import ItmScorer

        scorer = ItmScorer.load(
            config.model,
            config.precision,
            config.device,
            itm_token=config.itm_token,
            max_text_tokens=config.max_text_tokens,
            engine=config.engine,
        )
    if mine:
        has_captions = set(ds.shards("captions"))
        total = count_successful(ds, mine)
        with image_progress(total, "filter", enabled=progress and processes.is_main) as bar:

            def read(shard: int):
                captions = ds.read_shard("captions", shard) if shard in has_captions else None
                return shard, ds.read_shard("images", shard), captions

            # The next shard is read while this one is scored.
            for shard, images_table, captions_table in ordered_map(read, mine, threads=1):
                if captions_table is None:
                    counts["shards_without_captions"] += 1
                scores = score_shard(
                    scorer, images_table, captions_table, config, on_images=bar.advance
                )
                ds.write_shard("scores", shard, scores)
                errors = _undecoded_images(scores)
                counts["shards"] += 1
                counts["images"] += len(set(scores["key"].to_pylist()))
                counts["pairs"] += scores.num_rows - scores["itm_score"].null_count
                counts["errors"] += errors
    processes.wait_for_everyone()  # every scores/ shard exists before curated/ is derived

    totals_by_source: dict = {}
    for shard in processes.my_shards(ds.shards("scores")):
        scores = ds.read_shard("scores", shard)
        curated = curate(scores, config.threshold)
        ds.write_shard("curated", shard, curated)
        totals_by_source = distributed.sum_counts(
            [totals_by_source, source_totals(scores, curated)]
        )

    model_info = _model_info(scorer, config.model)
    totals = distributed.sum_counts(processes.gather(counts))
    totals_by_source = distributed.sum_counts(processes.gather(totals_by_source))
    loaded = [m for m in processes.gather(model_info) if m["revision"] is not None]
    if loaded:
        model_info = loaded[0]
    sources = {name: _summary(totals_by_source.get(name)) for name in SOURCES}
    seconds = time.perf_counter() - started
    if processes.is_main:
        ds.record_run(
            "filter",
            options=recorded_options(config, scorer),
            counts=dict(
                totals,
                shards_skipped=len(all_shards) - len(pending),
                kept={name: s.kept for name, s in sources.items()},
                pairs_by_source={name: s.pairs for name, s in sources.items()},
            ),
            model=model_info,
            itm_token=model_info.get("itm_token"),
            rescored=bool(totals["shards"]),
            processes=processes.world_size,
            seconds=round(seconds, 3),
        )
    processes.wait_for_everyone()
    return FilterResult(
        threshold=config.threshold,
        shards_scored=totals["shards"],
        shards_skipped=len(all_shards) - len(pending),
        images=totals["images"],
        pairs=totals["pairs"],
        errors=totals["errors"],
        seconds=seconds,
        model=model_info["id"],
        revision=model_info["revision"],
        itm_token=model_info.get("itm_token"),
        sources=sources,
    )


def _undecoded_images(scores) -> int:
    """Images whose web caption exists but got no score: they could not be decoded."""
    import pyarrow.compute as pc

    failed = scores.filter(pc.and_(pc.is_null(scores["itm_score"]), pc.is_valid(scores["text"])))
    return len(set(failed["key"].to_pylist()))


def _summary(totals: dict | None) -> SourceSummary:
    if not totals:
        return SourceSummary()
    scored = totals["scored"]
    return SourceSummary(
        pairs=totals["pairs"],
        scored=scored,
        kept=totals["kept"],
        mean_itm=totals["itm_sum"] / scored if scored else None,
        mean_itc=totals["itc_sum"] / scored if scored else None,
    )


def _model_info(scorer, model_id: str) -> dict:
    if scorer is None:
        return dict(id=model_id, revision=None, itm_token=None)
    return dict(model_record(scorer, model_id), itm_token=scorer.itm_token)
