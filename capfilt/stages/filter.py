"""`capfilt filter`: ITM and ITC scores of every caption, and the pairs its rule keeps.

For each images/ shard, every downloaded image is paired with its web caption (text_id 0) and
each synthetic caption from captions/ (text_id caption_id + 1). The vision encoder runs once
per image; all pairs are scored into scores/ (`ScoreStage`). Then curated/ is derived from
scores/ alone (stages/curate.py) by the selection rule: ITM probability ≥ --threshold, the
--top-fraction of the dataset by a score column, an SQL --where condition, together with AND
(and with --keep-best K, at most K synthetic pairs per image, the best), as a new generation
switched in whole. A new rule on a scored dataset only re-derives curated/, without loading a
model; a rule naming a column scores/ cannot have fails before one loads.

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
    Selection,
    SourceSummary,
    check_selection,
    source_summaries,
)
from capfilt.stages.inference import ModelStage
from capfilt.stages.runner import StageRun, record_run, run_stage


@dataclass(frozen=True, kw_only=True)
class FilterOptions(Options):
    """Options of `capfilt filter`."""

    # The selection rule (stages/curate.py): not output options of scores/, so a new rule
    # only re-derives curated/. At least one of threshold, top_fraction, where; they AND.
    threshold: float | None = option(
        None,
        "Keep pairs whose ITM match probability (0 to 1) is at least this.",
        ge=0,
        le=1,
        cli_default="none",
    )
    top_fraction: float | None = option(
        None,
        "Keep the pairs whose --by score is in this top fraction (0 to 1) of the dataset's "
        "scored pairs (ties at the cut-off kept), e.g. 0.3 for DataComp's top 30 %.",
        gt=0,
        le=1,
        cli_default="none",
    )
    by: str | None = option(
        None,
        "The score column of --top-fraction: itm_score, itc_score, clip_score, siglip_score "
        "(any score column scores/ has).",
        cli_default="itm_score",
    )
    where: str | None = option(
        None,
        "Keep the pairs for which this SQL condition over the columns of scores/ holds "
        "(DuckDB, sandboxed), e.g. \"clip_score > 0.28 AND source = 'synthetic'\".",
        cli_default="none",
    )
    keep_best: int | None = option(
        None,
        "Per image, keep at most this many synthetic captions: those of highest ITM (or "
        "--best-by) among the pairs the rule keeps (a tie goes to the earlier caption). The "
        "web caption is judged by the rule alone.",
        ge=1,
        cli_default="no limit",
    )
    best_by: str | None = option(
        None,
        "The score column --keep-best ranks an image's synthetic captions by: itm_score, or "
        "clip_score to rerank as LAION-COCO did (any score column scores/ has).",
        cli_default="itm_score",
    )
    model: str = option(DEFAULT_FILTER, "BLIP ITM filter: hub id or local directory (safetensors).")
    # Extra scorers. Not output options by declaration: ScoreStage records each in scores/'
    # provenance (with its revision) only when used, so scores/ made without them stay done.
    clip_model: str | None = option(
        None,
        "Also score every pair with this CLIP checkpoint (hub id or local directory) into "
        "clip_score: the cosine similarity of CLIP's image and text embeddings, -1 to 1 "
        "(DataComp's CLIP score). Text past CLIP's 77 tokens is cut.",
        cli_default="not used",
    )
    siglip_model: str | None = option(
        None,
        "Also score every pair with this SigLIP checkpoint into siglip_score: SigLIP's match "
        "probability sigmoid(scale * cosine + bias), 0 to 1, the quantity SigLIP is trained "
        "on. Text past SigLIP's 64 tokens is cut.",
        cli_default="not used",
    )
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
        if self.by is not None and self.top_fraction is None:
            raise CapfiltError(f"--by {self.by} goes with --top-fraction F: give both")
        if self.best_by is not None and self.keep_best is None:
            raise CapfiltError(f"--best-by {self.best_by} goes with --keep-best K: give both")
        if self.threshold is None and self.top_fraction is None and self.where is None:
            raise CapfiltError(
                "capfilt filter needs a rule: --threshold T, --top-fraction F --by COLUMN or "
                "--where SQL (they combine with AND)"
            )


# --clip-model, --siglip-model: the similarity kind (capfilt.models.clip.KINDS) → its option.
SIMILARITY_OPTIONS = {"clip": "clip_model", "siglip": "siglip_model"}


def similarity_models(options: FilterOptions) -> dict[str, str]:
    """kind → checkpoint of each extra similarity scorer `options` ask for."""
    return {
        kind: getattr(options, name)
        for kind, name in SIMILARITY_OPTIONS.items()
        if getattr(options, name, None)
    }


def check_similarity_models(options: FilterOptions) -> None:
    """Find and check every --clip-model/--siglip-model checkpoint (no weights loaded), so
    that a wrong one fails in one line before any model loads."""
    from capfilt.models.clip import resolve_similarity

    wanted = similarity_models(options)
    if wanted and options.gpu_decode:
        flags = " and ".join(f"--{kind}-model" for kind in wanted)
        raise CapfiltError(
            f"--gpu-decode cannot be combined with {flags}: each image is decoded once, on "
            "the CPU, for every model; leave out --gpu-decode"
        )
    for kind, model in wanted.items():
        resolve_similarity(kind, model)


def load_similarity(options: FilterOptions) -> dict:
    """kind → `SimilarityScorer` of each extra scorer `options` ask for."""
    from capfilt.models.clip import SimilarityScorer

    return {
        kind: SimilarityScorer.load(kind, model, options.precision, options.device)
        for kind, model in similarity_models(options).items()
    }


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
    pair (and CLIP/SigLIP similarity when asked); and, written with it, the embeddings/ shard
    of its images."""

    name = "filter"
    output = "scores"
    inputs = ("images",)
    optional_inputs = ("captions",)

    def __init__(self, options, model=None, similarity: dict | None = None):
        super().__init__(options, model)
        self.similarity = similarity  # kind → SimilarityScorer; loaded by setup() unless given

    def provenance_options(self) -> dict:
        """The BLIP model's options, and each extra scorer's checkpoint and revision."""
        from capfilt.models.blip import local_revision, model_name

        options = super().provenance_options()
        for kind, model in similarity_models(self.options).items():
            loaded = (self.similarity or {}).get(kind)
            options[f"{kind}_model"] = model_name(model)
            options[f"{kind}_model_revision"] = (
                loaded.source.revision if loaded else local_revision(model) or provenance.UNRESOLVED
            )
        return options

    def settled(self, options: dict) -> dict:
        options = super().settled(options)
        for kind, scorer in (self.similarity or {}).items():
            if options.get(f"{kind}_model_revision") == provenance.UNRESOLVED:
                options = dict(options, **{f"{kind}_model_revision": scorer.source.revision})
        return options

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        self.embeddings_folder = dataset.folder("embeddings")
        if self.similarity is None:
            check_similarity_models(self.options)  # before any weights load
        if self.model is None:
            self.model = load_scorer(self.options)
        if self.similarity is None:
            self.similarity = load_similarity(self.options)

    def process(self, shard: int, inputs: dict, advance):
        features: list = []
        scores = score_shard(
            self.model,
            inputs["images"],
            inputs["captions"],
            self.options,
            on_images=advance,
            features_out=features,
            similarity=self.similarity,
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
        for kind, model in similarity_models(self.options).items():
            scorer = (self.similarity or {}).get(kind)
            record[f"{kind}_model"] = dict(id=model, revision=None)
            if scorer is not None:
                record[f"{kind}_model"] = dict(
                    id=scorer.model_id,
                    revision=scorer.source.revision,
                    path=str(scorer.source.path),
                    text_window=scorer.window,
                )
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

    # The BLIP model's options alone: the embeddings do not depend on the extra scorers.
    options = {
        name: value
        for name, value in scores_record.options.items()
        if not name.startswith(tuple(f"{kind}_model" for kind in SIMILARITY_OPTIONS))
    }

    def record(fingerprint: str) -> None:
        provenance.write(
            folder,
            shard,
            provenance.Provenance(
                stage=EmbedStage.name,
                shard=shard,
                file=fingerprint,
                options=options,
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

    rule: Selection  # as curated/ records it: with the top fraction's cut-off
    scored: StageRun
    curated: StageRun
    sources: dict[str, SourceSummary] = field(default_factory=dict)
    embedded: StageRun | None = None  # embeddings/ shards made apart from scoring

    @property
    def threshold(self) -> float | None:
        return self.rule.threshold

    @property
    def keep_best(self) -> int | None:
        return self.rule.keep_best

    @property
    def selection(self) -> str:
        """The rule curated/ was derived by, in words."""
        return self.rule.describe()

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
    similarity: dict | None = None,
):
    """Score the web and synthetic captions of one shard's images; return a SCORES_SCHEMA table.

    Pairs of an image that cannot be decoded, and a missing web caption, get null scores.
    Images are decoded, and each batch's pairs tokenized, in background threads ahead of the
    model (`image_batches`, `ordered_map`). `features_out`: a list that gets the (keys, ITC
    embeddings) of each batch's decoded images, from the same vision pass. `similarity`
    (kind → `SimilarityScorer`): each also scores every pair into `<kind>_score`, from the
    same decoded images through its own image processor, its vision encoder once per image.
    `truncated`: the text was cut to ITM's --max-text-tokens or to a similarity model's window.
    """
    similarity = similarity or {}
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
                    truncated=None,
                )
                pairs.rows.append(row)
                if index is not None and text is not None:
                    pairs.scored_rows.append(row)
                    pairs.image_index.append(index)
                    pairs.texts.append(text)
        if pairs.texts:
            input_ids, attention_mask, truncated = scorer.tokenize_marking_truncation(pairs.texts)
            pairs.tokens = (input_ids, attention_mask)
            for kind, other in similarity.items():
                pairs.more_tokens[kind], cut = other.tokenize_cpu(pairs.texts)
                truncated = truncated | cut
            for row, cut in zip(pairs.scored_rows, truncated.tolist(), strict=True):
                row["truncated"] = cut
        return pairs

    share = cpu_share(scorer.device, config.num_workers, config.threads)
    more_processors = {kind: other.image_processor for kind, other in similarity.items()}
    batches = stage_batches(rows, scorer, config, share, more_processors)
    out = []
    # Tokenizing runs ahead in a thread, but inline where the first batch is timed on a CPU
    # (`image_batches` times the model as the wait for the next batch).
    tokenizing = 0 if share is not None and share.decode is None else 1
    with sharing_cores(share):
        _score_pairs(
            scorer,
            ordered_map(pairs_of, batches, tokenizing),
            out,
            on_images,
            features_out,
            similarity,
        )
    return io.rows_to_table(out, io.SCORES_SCHEMA)


def _score_pairs(
    scorer, prepared, out: list, on_images, features_out=None, similarity: dict | None = None
) -> None:
    from capfilt.models.clip import column

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
            for kind, other in (similarity or {}).items():
                # one vision pass per image, whatever the number of its captions
                images = other.encode_images(batch.more_pixels[kind])  # (N_ok, E)
                scores = other.score(
                    images, pairs.image_index, pairs.texts, pairs.more_tokens[kind]
                )
                for row, score in zip(pairs.scored_rows, scores.tolist(), strict=True):
                    row[column(kind)] = score
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
    more_tokens: dict = field(default_factory=dict)  # similarity kind → its tokens of `texts`


def _undecoded_images(scores) -> int:
    """Images whose web caption exists but got no score: they could not be decoded."""
    import pyarrow.compute as pc

    failed = scores.filter(pc.and_(pc.is_null(scores["itm_score"]), pc.is_valid(scores["text"])))
    return len(set(failed["key"].to_pylist()))


def filter_dataset(
    dataset: Dataset | str, options: FilterOptions, scorer=None, progress: bool = True
) -> FilterResult:
    """Score every shard not done for these options into scores/, derive curated/ by the
    selection rule (threshold, top fraction, where; then --keep-best: a new generation, when
    anything changed), and record the run.

    With every shard scored no model is loaded: only curated/ is re-derived. A rule naming a
    column scores/ cannot have fails before any model loads.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    check_selection(Selection.of(options), ds, options)
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
        curate_stage = CurateStage(options)
        curated = run_stage(curate_stage, ds, options.overwrite, False, locked=True, record=False)
        rule = Selection.from_record(curated.plan.options) or curate_stage.rule
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
                selection=rule.record(),
            )
        processes.wait_for_everyone()
    return FilterResult(rule, scored, curated, sources, embedded=embedded)
