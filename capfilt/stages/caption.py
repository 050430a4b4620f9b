"""`capfilt caption`: synthetic captions for every downloaded image, shard by shard.

For each images/ shard, the images with status `success` are decoded, batched through the
captioner and written as captions/ rows (one per synthetic caption) in one whole shard file.
An image that cannot be decoded becomes one row with status `error`; failed downloads are
already rows in images/ and get none. The stage runner (stages/runner.py) does the rest:
which shards are done for these options, resume, provenance, processes, the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.options import Options, option
from capfilt.images.batches import (
    ShardImages,
    cpu_share,
    sharing_cores,
    stage_batches,
    successful_images,
)
from capfilt.models.blip import DEFAULT_CAPTIONER
from capfilt.models.sampling import caption_seed
from capfilt.stages import inference
from capfilt.stages.inference import ModelStage
from capfilt.stages.runner import StageRun, run_stage

DECODINGS = ("nucleus", "beam", "greedy")


@dataclass(frozen=True, kw_only=True)
class CaptionOptions(Options):
    """Options of `capfilt caption`; the defaults are CapFilt's (nucleus sampling, top-p 0.9)."""

    model: str = option(
        DEFAULT_CAPTIONER, "BLIP captioner: hub id or local directory (safetensors)."
    )
    num_captions: int = option(1, "Synthetic captions per image.", ge=1, output=True)
    decoding: str = option(
        "nucleus",
        "nucleus sampling (CapFilt), beam search, or greedy.",
        choices=DECODINGS,
        output=True,
    )
    top_p: float = option(0.9, "Nucleus sampling probability mass.", gt=0, le=1, output=True)
    # min/max_length count the prompt's tokens, as BLIP's code does.
    min_length: int = option(5, "Minimum tokens, prompt included.", ge=0, output=True)
    max_length: int = option(20, "Maximum tokens, prompt included.", ge=1, output=True)
    # BLIP samples with a repetition penalty of 1.1.
    repetition_penalty: float = option(
        1.1, "Penalty on tokens already generated (1.0: none).", gt=0, output=True
    )
    num_beams: int = option(3, "Beams for --decoding beam.", ge=1, output=True)
    prompt: str = option(
        "a picture of ", "Text the decoder starts from; stripped from the captions.", output=True
    )
    batch_size: int = inference.batch_size_option()
    precision: str = inference.precision_option()
    device: str = inference.device_option()
    seed: int = option(
        0, "Sampling seed; each caption's seed derives from it and the key.", output=True
    )
    num_workers: int | None = inference.workers_option()
    threads: int | None = inference.threads_option()
    engine: str = inference.engine_option(output=True)
    cuda_graphs: bool = option(
        False, "GPU, fast engine: replay each decoding step as a CUDA graph (fewer launches)."
    )
    fast_decode: bool = inference.fast_decode_option()
    gpu_decode: bool = inference.gpu_decode_option()
    overwrite: bool = inference.overwrite_option()

    def check(self) -> None:
        if self.decoding == "greedy" and self.num_captions != 1:
            raise CapfiltError(
                "greedy decoding gives one caption per image; pass --num-captions 1, "
                "or --decoding nucleus for several"
            )
        if self.min_length > self.max_length:
            raise CapfiltError(
                f"--min-length ({self.min_length}) is larger than --max-length ({self.max_length})"
            )

    def decoding_options(self) -> dict:
        return dict(
            decoding=self.decoding,
            top_p=self.top_p,
            min_length=self.min_length,
            max_length=self.max_length,
            repetition_penalty=self.repetition_penalty,
            num_beams=self.num_beams,
        )

    def output_options(self) -> dict:
        options = super().output_options()
        # Options of another decoding method do not shape these captions.
        unused = {
            "nucleus": ("num_beams",),
            "beam": ("top_p", "seed"),
            "greedy": ("top_p", "seed", "num_beams"),
        }
        for name in unused[self.decoding]:
            options.pop(name)
        return options


class CaptionStage(ModelStage):
    """images/ shard → captions/ shard: the synthetic captions of its downloaded images."""

    name = "caption"
    output = "captions"
    inputs = ("images",)

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        if self.model is None:
            from capfilt.models.blip import Captioner

            options = self.options
            self.model = Captioner.load(
                options.model,
                options.precision,
                options.device,
                options.engine,
                fast_options=dict(cuda_graphs=options.cuda_graphs),
            )

    def process(self, shard: int, inputs: dict, advance):
        return caption_shard(self.model, inputs["images"], self.options, on_images=advance)

    def count(self, captions) -> dict:
        errors = sum(1 for s in captions["status"].to_pylist() if s != "success")
        return dict(
            images=len(set(captions["key"].to_pylist())),
            captions=captions.num_rows - errors,
            errors=errors,
        )


@dataclass
class CaptionResult:
    """What one `capfilt caption` run did, summed over its processes."""

    run: StageRun

    @property
    def shards_done(self) -> int:
        return self.run.shards_done

    @property
    def shards_skipped(self) -> int:
        return self.run.shards_skipped

    @property
    def images(self) -> int:
        return self.run.counts.get("images", 0)

    @property
    def captions(self) -> int:
        return self.run.counts.get("captions", 0)

    @property
    def errors(self) -> int:
        return self.run.counts.get("errors", 0)

    @property
    def images_per_second(self) -> float:
        """Images captioned a second, once the model was loaded (as the progress bar counts)."""
        return self.images / self.run.work_seconds if self.run.work_seconds else 0.0

    @property
    def model(self) -> dict:
        return self.run.record.get("model", {})


def caption_shard(captioner, images_table, config: CaptionOptions, on_images=None):
    """Caption the successful images of one images/ table; return a CAPTIONS_SCHEMA table."""
    table = successful_images(images_table)
    keys = [str(k) for k in table["key"].to_pylist()]
    rows = ShardImages(keys, table["jpg"].to_pylist())
    model = captioner.model_id
    out = []
    share = cpu_share(captioner.device, config.num_workers, config.threads)
    with sharing_cores(share):
        for batch in stage_batches(rows, captioner, config, share):
            _caption_batch(captioner, batch, config, model, out)
            if on_images is not None:
                on_images(len(batch))
    return io.rows_to_table(out, io.CAPTIONS_SCHEMA)


def _caption_batch(captioner, batch, config: CaptionOptions, model: str, out: list) -> None:
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


def _caption_row(key: str, caption_id: int, text, model: str, error: str | None = None) -> dict:
    status = "success" if error is None else "error"
    return dict(
        key=key, caption_id=caption_id, text=text, model=model, status=status, error_message=error
    )


def caption_dataset(
    dataset: Dataset | str, options: CaptionOptions, captioner=None, progress: bool = True
) -> CaptionResult:
    """Caption every images/ shard of `dataset` that is not done for these options.

    Under `accelerate launch` each process takes its own shards; pass `captioner` to reuse a
    loaded model (else it is loaded only if some shard is to be captioned).
    """
    stage = CaptionStage(options, model=captioner)
    return CaptionResult(run_stage(stage, dataset, options.overwrite, progress))
