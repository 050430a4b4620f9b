"""`capfilt filter`: ITM and ITC scores of every caption, and the pairs its rule keeps.

For each images/ shard, every downloaded image is paired with its web caption (text_id 0) and
each synthetic caption from captions/ (text_id caption_id + 1). The vision encoder runs once
per image; all pairs are scored into scores/ (`ScoreStage`). Then curated/ is derived from
scores/ alone (stages/curate.py): the pairs with ITM probability ≥ threshold (and with
--keep-best K, at most K synthetic pairs per image, the best), as a new generation switched
in whole. A new threshold or --keep-best on a scored dataset only re-derives curated/, without
loading a model.

The same pass keeps each image's ITC embedding (the unit-norm projection of the vision
encoder's first token, which ITC already computes) in embeddings/ (key, embedding as float16),
one shard beside each scores/ shard with its own provenance, so that `capfilt dedup` finds
semantic near-duplicates without a model. A scores/ shard and its embeddings/ shard are
written together; an embeddings/ shard missing beside a finished scores/ shard (a dataset
scored before embeddings/ existed) is made by `EmbedStage`, which runs the vision encoder
only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from capfilt.core import distributed, provenance
from capfilt.core import parquet as io
from capfilt.core.ahead import ordered_map
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.locks import folder_locks
from capfilt.core.options import Options, option
from capfilt.images.batches import (
    ShardImages,
    cpu_share,
    sharing_cores,
    stage_batches,
    successful_images,
)
from capfilt.models.blip import DEFAULT_FILTER, ITM_TOKENS
from capfilt.stages import inference
from capfilt.stages.curate import (
    CurateStage,
    SourceSummary,
    describe_selection,
    source_summaries,
)
from capfilt.stages.inference import ModelStage
from capfilt.stages.runner import StageRun, record_run, run_stage


@dataclass(frozen=True, kw_only=True)
class FilterOptions(Options):
    """Options of `capfilt filter`."""

    threshold: float = option(
        help="Keep pairs whose ITM match probability (0 to 1) is at least this.", ge=0, le=1
    )
    # Not an output option of scores/: a new --keep-best only re-derives curated/.
    keep_best: int | None = option(
        None,
        "Per image, keep at most this many synthetic captions: those of highest ITM at or above "
        "the threshold (a tie goes to the earlier caption). The web caption is judged by the "
        "threshold alone.",
        ge=1,
        cli_default="no limit",
    )
    model: str = option(DEFAULT_FILTER, "BLIP ITM filter: hub id or local directory (safetensors).")
    itm_token: str = option(
        "auto",
        "First text token for ITM: [ENC] as BLIP trained, or [CLS] as HF; auto: [ENC] when "
        "the tokenizer has it.",
        choices=ITM_TOKENS,
        output=True,
    )
    batch_size: int = inference.batch_size_option()
    # BLIP's ITM reads at most 35 text tokens.
    max_text_tokens: int = option(35, "Longer captions are truncated.", ge=3, output=True)
    precision: str = inference.precision_option()
    device: str = inference.device_option()
    num_workers: int | None = inference.workers_option()
    threads: int | None = inference.threads_option()
    engine: str = inference.engine_option(output=False)
    fast_decode: bool = inference.fast_decode_option()
    gpu_decode: bool = inference.gpu_decode_option()
    overwrite: bool = inference.overwrite_option()

    def check(self) -> None:
        whole = isinstance(self.keep_best, int) and not isinstance(self.keep_best, bool)
        if self.keep_best is not None and not whole:
            raise CapfiltError(f"--keep-best must be a whole number, got {self.keep_best!r}")


def load_scorer(options: FilterOptions):
    """The ITM scorer `options` name."""
    from capfilt.models.blip import ItmScorer

    return ItmScorer.load(
        options.model,
        options.precision,
        options.device,
        itm_token=options.itm_token,
        max_text_tokens=options.max_text_tokens,
        engine=options.engine,
    )


@dataclass
class ScoredShard:
    """What the filter makes of one shard: its scores/ and its embeddings/ table."""

    scores: object  # SCORES_SCHEMA
    embeddings: object  # io.embeddings_table


class ScoreStage(ModelStage):
    """images/ (+ captions/) shard → scores/ shard: ITM and ITC of every web and synthetic
    pair; and, written with it, the embeddings/ shard of its images."""

    name = "filter"
    output = "scores"
    inputs = ("images",)
    optional_inputs = ("captions",)

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        self.embeddings_folder = dataset.folder("embeddings")
        if self.model is None:
            self.model = load_scorer(self.options)

    def process(self, shard: int, inputs: dict, advance):
        features: list = []
        scores = score_shard(
            self.model,
            inputs["images"],
            inputs["captions"],
            self.options,
            on_images=advance,
            features_out=features,
        )
        return ScoredShard(scores, embeddings_of(features))

    def write(self, folder, shard: int, result: ScoredShard, before_rename) -> str:
        """The scores/ shard's provenance, then the embeddings/ shard whole (with its own
        provenance: the same run, options and images/ shard), then the scores/ shard renamed
        in. A kill before that rename leaves the scores/ shard undone, so both are redone."""

        def then_embeddings(fingerprint: str) -> None:
            before_rename(fingerprint)
            write_embeddings(
                self.embeddings_folder, shard, result.embeddings, provenance.read(folder, shard)
            )

        return super().write(folder, shard, result.scores, then_embeddings)

    def count(self, result) -> dict:
        scores = result.scores if isinstance(result, ScoredShard) else result
        return dict(
            images=len(set(scores["key"].to_pylist())),
            pairs=scores.num_rows - scores["itm_score"].null_count,
            errors=_undecoded_images(scores),
        )

    def rows(self, result) -> int:
        return result.scores.num_rows

    def run_record(self) -> dict:
        record = super().run_record()
        if self.model is not None:
            record["itm_token"] = self.model.itm_token
        return record


class EmbedStage(ModelStage):
    """images/ shard → embeddings/ shard, for a shard scored before the filter kept
    embeddings: the vision encoder alone. The filter writes the others with scores/."""

    name = "embed"
    output = "embeddings"
    inputs = ("images",)

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        if self.model is None:
            self.model = load_scorer(self.options)

    def process(self, shard: int, inputs: dict, advance):
        return embed_shard(self.model, inputs["images"], self.options, on_images=advance)

    def count(self, embeddings) -> dict:
        return {"images": embeddings.num_rows}


def write_embeddings(folder, shard: int, table, scores_record: provenance.Provenance) -> None:
    """Write one embeddings/ shard whole, with the provenance that `EmbedStage` checks: the
    options of the scores/ shard made in the same pass, and the images/ shard it read."""

    def record(fingerprint: str) -> None:
        provenance.write(
            folder,
            shard,
            provenance.Provenance(
                stage=EmbedStage.name,
                shard=shard,
                file=fingerprint,
                options=scores_record.options,
                inputs={"images": scores_record.inputs.get("images")},
                run=scores_record.run,
                rows=table.num_rows,
                counts={"images": table.num_rows},
            ),
        )

    folder.fs.makedirs(folder.path, exist_ok=True)
    io.write_table_atomic(folder.fs, folder.shard_path(shard), table, before_rename=record)


def batch_embeddings(batch, features) -> tuple[list[str], object]:
    """(keys, float16 (N, E) ITC image embeddings) of the decoded images of one batch."""
    import numpy as np

    decoded = [(k, i) for k, i in zip(batch.keys, batch.pixel_index, strict=True) if i is not None]
    vectors = features.itc.float().cpu().numpy()  # (N_ok, E), unit norm
    rows = np.array([i for _, i in decoded], dtype=np.int64)
    return [k for k, _ in decoded], vectors[rows].astype(np.float16)


def embeddings_of(parts: list[tuple[list[str], object]]):
    """One embeddings/ table from the (keys, vectors) of each batch."""
    import numpy as np

    keys = [key for part_keys, _ in parts for key in part_keys]
    vectors = [v for _, v in parts if len(v)]
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float16)
    return io.embeddings_table(keys, matrix)


def embed_shard(scorer, images_table, config: FilterOptions, on_images=None):
    """The embeddings/ table of one shard's decodable images: the vision encoder alone."""
    table = successful_images(images_table)
    keys = [str(k) for k in table["key"].to_pylist()]
    parts = []
    for batch in stage_batches(ShardImages(keys, table["jpg"].to_pylist()), scorer, config):
        if any(i is not None for i in batch.pixel_index):
            parts.append(batch_embeddings(batch, scorer.encode_images(batch.pixel_values)))
        if on_images is not None:
            on_images(len(batch))
    return embeddings_of(parts)


@dataclass
class FilterResult:
    """What one `capfilt filter` run did, summed over its processes."""

    threshold: float
    scored: StageRun
    curated: StageRun
    sources: dict[str, SourceSummary] = field(default_factory=dict)
    keep_best: int | None = None
    embedded: StageRun | None = None  # embeddings/ shards made apart from scoring

    @property
    def selection(self) -> str:
        """The rule curated/ was derived by, in words."""
        return describe_selection(self.threshold, self.keep_best)

    @property
    def rescored(self) -> bool:
        return self.scored.shards_done > 0

    @property
    def model(self) -> dict:
        return self.scored.record.get("model", {})

    @property
    def itm_token(self) -> str | None:
        return self.scored.record.get("itm_token")


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


def score_shard(
    scorer,
    images_table,
    captions_table,
    config: FilterOptions,
    on_images=None,
    features_out: list | None = None,
):
    """Score the web and synthetic captions of one shard's images; return a SCORES_SCHEMA table.

    Pairs of an image that cannot be decoded, and a missing web caption, get null scores.
    Images are decoded, and each batch's pairs tokenized, in background threads ahead of the
    model (`image_batches`, `ordered_map`). `features_out`: a list that gets the (keys, ITC
    embeddings) of each batch's decoded images, from the same vision pass.
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

    share = cpu_share(scorer.device, config.num_workers, config.threads)
    batches = stage_batches(rows, scorer, config, share)
    out = []
    # Tokenizing runs ahead in a thread, but inline where the first batch is timed on a CPU
    # (`image_batches` times the model as the wait for the next batch).
    tokenizing = 0 if share is not None and share.decode is None else 1
    with sharing_cores(share):
        _score_pairs(
            scorer, ordered_map(pairs_of, batches, tokenizing), out, on_images, features_out
        )
    return io.rows_to_table(out, io.SCORES_SCHEMA)


def _score_pairs(scorer, prepared, out: list, on_images, features_out=None) -> None:
    for pairs in prepared:
        batch = pairs.batch
        decoded = any(i is not None for i in batch.pixel_index)
        features = None
        if pairs.texts or (features_out is not None and decoded):
            features = scorer.encode_images(batch.pixel_values)
        if features_out is not None and decoded:
            features_out.append(batch_embeddings(batch, features))
        if pairs.texts:
            itm, itc = scorer.score(features, pairs.image_index, pairs.texts, pairs.tokens)
            for row, itm_score, itc_score in zip(
                pairs.scored_rows, itm.tolist(), itc.tolist(), strict=True
            ):
                row["itm_score"], row["itc_score"] = itm_score, itc_score
        out.extend(pairs.rows)
        if on_images is not None:
            on_images(len(batch))


@dataclass
class BatchPairs:
    """The score rows of one image batch, and the (image, text) pairs among them to score."""

    batch: object  # ImageBatch
    rows: list[dict] = field(default_factory=list)  # every row, scored or not, in order
    scored_rows: list[dict] = field(default_factory=list)  # rows of a decoded image with text
    image_index: list[int] = field(default_factory=list)  # pixel row of each scored pair
    texts: list[str] = field(default_factory=list)
    tokens: tuple | None = None  # (input_ids, attention_mask) CPU tensors of `texts`


def _undecoded_images(scores) -> int:
    """Images whose web caption exists but got no score: they could not be decoded."""
    import pyarrow.compute as pc

    failed = scores.filter(pc.and_(pc.is_null(scores["itm_score"]), pc.is_valid(scores["text"])))
    return len(set(failed["key"].to_pylist()))


def filter_dataset(
    dataset: Dataset | str, options: FilterOptions, scorer=None, progress: bool = True
) -> FilterResult:
    """Score every shard not done for these options into scores/, derive curated/ by the
    threshold and --keep-best (a new generation, when anything changed), and record the run.

    With every shard scored no model is loaded: only curated/ is re-derived.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    ds.ensure_writable("scores", "embeddings", "curated")
    processes = distributed.current()
    with folder_locks(ds, ("scores", "embeddings", "curated"), "capfilt filter", processes):
        score_stage = ScoreStage(options, model=scorer)
        scored = run_stage(score_stage, ds, options.overwrite, progress, locked=True, record=False)
        # Only the shards scored before the filter kept embeddings are left to do here: every
        # shard scored now has its embeddings already (so never --overwrite: no second pass).
        embedded = run_stage(
            EmbedStage(options, model=score_stage.model),
            ds,
            False,
            progress,
            locked=True,
            record=False,
        )
        curated = run_stage(
            CurateStage(options), ds, options.overwrite, False, locked=True, record=False
        )
        sources = source_summaries(ds) if processes.is_main else {}
        if processes.is_main:
            record_run(
                ds,
                "filter",
                options,
                [scored, embedded, curated],
                counts=dict(
                    kept={name: s.kept for name, s in sources.items()},
                    pairs_by_source={name: s.pairs for name, s in sources.items()},
                ),
                rescored=scored.shards_done > 0,
                threshold=options.threshold,
                keep_best=options.keep_best,
            )
        processes.wait_for_everyone()
    return FilterResult(
        options.threshold, scored, curated, sources, options.keep_best, embedded=embedded
    )
