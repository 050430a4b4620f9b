"""`capfilt caption`: synthetic captions for every downloaded image, shard by shard.

For each images/ shard, the images with status `success` are decoded, batched through the
captioner and written as captions/ rows (one per synthetic caption) in one whole shard file.
An image that cannot be decoded becomes one row with status `error`; failed downloads are
already rows in images/ and get none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
from capfilt.models.blip import DEFAULT_CAPTIONER, PRECISIONS, check_engine, model_record
from capfilt.models.sampling import caption_seed

DECODINGS = ("nucleus", "beam", "greedy")


@dataclass(frozen=True)
class CaptionConfig:
    """Options of `capfilt caption`; the defaults are CapFilt's (nucleus sampling, top-p 0.9)."""

    model: str = DEFAULT_CAPTIONER
    num_captions: int = 1
    decoding: str = "nucleus"
    top_p: float = 0.9
    # min/max_length count the prompt's tokens, as BLIP's code does.
    min_length: int = 5
    max_length: int = 20
    # BLIP samples with a repetition penalty of 1.1.
    repetition_penalty: float = 1.1
    num_beams: int = 3
    prompt: str = "a picture of "
    batch_size: int = 32
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int | None = None  # decoding processes; None: data.resolve_workers
    engine: str = "fast"
    fast_decode: bool = False  # JPEGs decoded at a reduced scale: faster, not pixel-exact
    gpu_decode: bool = False  # plain JPEGs decoded on the model's device (torchvision)
    cuda_graphs: bool = False  # fast engine on a GPU: each decoding step replayed as a graph
    overwrite: bool = False

    def __post_init__(self):
        check_engine(self.engine)
        if self.decoding not in DECODINGS:
            raise CapfiltError(
                f"--decoding must be one of {', '.join(DECODINGS)}, not {self.decoding!r}"
            )
        if not 0 < self.top_p <= 1:
            raise CapfiltError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_captions < 1:
            raise CapfiltError(f"--num-captions must be at least 1, got {self.num_captions}")
        if self.decoding == "greedy" and self.num_captions != 1:
            raise CapfiltError(
                "greedy decoding gives one caption per image; pass --num-captions 1, "
                "or --decoding nucleus for several"
            )
        if self.min_length < 0 or self.max_length < 1:
            raise CapfiltError("--min-length must be ≥ 0 and --max-length ≥ 1")
        if self.min_length > self.max_length:
            raise CapfiltError(
                f"--min-length ({self.min_length}) is larger than --max-length ({self.max_length})"
            )
        if self.repetition_penalty <= 0:
            raise CapfiltError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise CapfiltError(f"--num-beams must be at least 1, got {self.num_beams}")
        if self.batch_size < 1:
            raise CapfiltError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise CapfiltError(f"--workers must be ≥ 0, got {self.num_workers}")
        if self.precision not in PRECISIONS:
            raise CapfiltError(f"--precision must be one of {', '.join(PRECISIONS)}")

    def decoding_options(self) -> dict:
        return dict(
            decoding=self.decoding,
            top_p=self.top_p,
            min_length=self.min_length,
            max_length=self.max_length,
            repetition_penalty=self.repetition_penalty,
            num_beams=self.num_beams,
        )


@dataclass
class CaptionResult:
    """What one `capfilt caption` run did, summed over its processes."""

    shards_done: int
    shards_skipped: int
    images: int
    captions: int
    errors: int
    seconds: float
    model: str
    revision: str | None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def caption_shard(captioner, images_table, config: CaptionConfig, on_images=None):
    """Caption the successful images of one images/ table; return a CAPTIONS_SCHEMA table."""
    table = successful_images(images_table)
    keys = [str(k) for k in table["key"].to_pylist()]
    rows = ShardImages(keys, table["jpg"].to_pylist())
    model = captioner.model_id
    out = []
    for batch in stage_batches(rows, captioner, config):
        captions = []
        if batch.pixel_values is not None:
            seeds = [
                caption_seed(config.seed, key, j)
                for key in batch.ok_keys
                for j in range(config.num_captions)
            ]
            captions = captioner.generate_captions(
                batch.pixel_values,
                prompt=config.prompt,
                num_captions=config.num_captions,
                row_seeds=seeds,
                **config.decoding_options(),
            )
        for key, index, error in zip(batch.keys, batch.pixel_index, batch.errors, strict=True):
            if index is None:
                out.append(_caption_row(key, 0, None, model, error=error))
                continue
            for caption_id, text in enumerate(captions[index]):
                out.append(_caption_row(key, caption_id, text, model))
        if on_images is not None:
            on_images(len(batch))
    return io.rows_to_table(out, io.CAPTIONS_SCHEMA)


def _caption_row(key: str, caption_id: int, text, model: str, error: str | None = None) -> dict:
    status = "success" if error is None else "error"
    return dict(
        key=key, caption_id=caption_id, text=text, model=model, status=status, error_message=error
    )


def caption_dataset(
    dataset: Dataset | str, config: CaptionConfig, captioner=None, progress: bool = True
) -> CaptionResult:
    """Caption every pending images/ shard of `dataset` into captions/ and record the run.

    Under `accelerate launch` each process takes its own shards; pass `captioner` to reuse a
    loaded model (else it is loaded only if some shard is pending).
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    ds.require_stage("images", "run `capfilt fetch` or `capfilt ingest` first")
    started = time.perf_counter()
    processes = distributed.current()
    all_shards = ds.shards("images")
    pending = ds.pending("images", "captions", overwrite=config.overwrite)
    mine = processes.my_shards(pending)
    if processes.is_main:
        ds.remove_temp_files("captions")
    processes.wait_for_everyone()  # nobody writes before the leftovers are gone

    counts = dict(shards=0, images=0, captions=0, errors=0)
    if mine and captioner is None:
        from capfilt.models.blip import Captioner

        captioner = Captioner.load(
            config.model,
            config.precision,
            config.device,
            config.engine,
            fast_options=dict(cuda_graphs=config.cuda_graphs),
        )
    if mine:
        total = count_successful(ds, mine)
        with image_progress(total, "caption", enabled=progress and processes.is_main) as bar:
            # The next shard is read while this one is captioned.
            shards = ordered_map(lambda s: (s, ds.read_shard("images", s)), mine, threads=1)
            for shard, images_table in shards:
                captions = caption_shard(captioner, images_table, config, on_images=bar.advance)
                ds.write_shard("captions", shard, captions)
                errors = sum(1 for s in captions["status"].to_pylist() if s != "success")
                counts["shards"] += 1
                counts["images"] += len(set(captions["key"].to_pylist()))
                counts["captions"] += captions.num_rows - errors
                counts["errors"] += errors

    model_info = model_record(captioner, config.model)
    totals = distributed.sum_counts(processes.gather(counts))
    models = [m for m in processes.gather(model_info) if m["revision"] is not None]
    seconds = time.perf_counter() - started
    if models:
        model_info = models[0]
    if processes.is_main:
        ds.record_run(
            "caption",
            options=recorded_options(config, captioner),
            counts=dict(totals, shards_skipped=len(all_shards) - len(pending)),
            model=model_info,
            processes=processes.world_size,
            seconds=round(seconds, 3),
        )
    processes.wait_for_everyone()
    return CaptionResult(
        shards_done=totals["shards"],
        shards_skipped=len(all_shards) - len(pending),
        images=totals["images"],
        captions=totals["captions"],
        errors=totals["errors"],
        seconds=seconds,
        model=model_info["id"],
        revision=model_info["revision"],
    )
