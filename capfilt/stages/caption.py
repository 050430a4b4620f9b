"""`capfilt caption`: synthetic captions for every downloaded image, shard by shard.

The captioner is a BLIP checkpoint (the default; models/blip.py) or BLIP-2 or any
image-text-to-text model of transformers (models/vlm.py), told apart by the checkpoint's
config.json before any weights load. A few options default by family (`FAMILY_DEFAULTS`): the
prompt, the longest caption, the repetition penalty and the engine; the provenance records the
values used.

For each images/ shard, the images with status `success` are decoded, batched through the
captioner and written as captions/ rows (one per synthetic caption) in one whole shard file.
An image that cannot be decoded becomes one row with status `error`; failed downloads are
already rows in images/ and get none. The stage runner (stages/runner.py) does the rest:
which shards are done for these options, resume, provenance, processes, the manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.options import Options, option
from capfilt.core.provenance import UNRESOLVED
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
ENGINES = ("fast", "hf", "vllm")
BLIP = "blip"
# Options whose default depends on the captioner's family: (BLIP's, the other models').
FAMILY_DEFAULTS = {
    "prompt": ("a picture of ", None),  # None: the family's (models/vlm.default_prompt)
    "max_length": (20, 60),
    "repetition_penalty": (1.1, 1.0),
    "engine": ("fast", "hf"),
}


@dataclass(frozen=True, kw_only=True)
class CaptionOptions(Options):
    """Options of `capfilt caption`; the defaults are CapFilt's (nucleus sampling, top-p 0.9)."""

    model: str = option(
        DEFAULT_CAPTIONER,
        "Captioner, hub id or local directory (safetensors): a BLIP captioner, BLIP-2, or an "
        "image-text-to-text model of transformers (LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...).",
    )
    num_captions: int = option(1, "Synthetic captions per image.", ge=1, output=True)
    decoding: str = option(
        "nucleus",
        "nucleus sampling (CapFilt), beam search, or greedy.",
        choices=DECODINGS,
        output=True,
    )
    top_p: float = option(0.9, "Nucleus sampling probability mass.", gt=0, le=1, output=True)
    # min/max_length count the prompt's tokens for BLIP, as BLIP's code does.
    min_length: int = option(
        5,
        "Minimum tokens: BLIP counts its prompt's, other models new tokens only.",
        ge=0,
        output=True,
    )
    max_length: int | None = option(
        None,
        "Maximum tokens: BLIP counts its prompt's, other models new tokens only (long, dense "
        "captions: 300 or more).",
        ge=1,
        output=True,
        cli_default="20 for BLIP, 60 for other models",
    )
    # BLIP samples with a repetition penalty of 1.1.
    repetition_penalty: float | None = option(
        None,
        "Penalty on tokens already generated (1.0: none).",
        gt=0,
        output=True,
        cli_default="1.1 for BLIP, 1.0 for other models",
    )
    num_beams: int = option(3, "Beams for --decoding beam.", ge=1, output=True)
    prompt: str | None = option(
        None,
        "BLIP: text the decoder starts from; other models: the instruction, in the chat "
        "template when the processor has one. Not part of the captions.",
        output=True,
        cli_default="'a picture of ' for BLIP, '' for BLIP-2, 'caption en' for PaliGemma, "
        "'Describe this image in one sentence.' for the others",
    )
    batch_size: int = inference.batch_size_option()
    precision: str = inference.precision_option()
    device: str = inference.device_option()
    seed: int = option(
        0, "Sampling seed; each caption's seed derives from it and the key.", output=True
    )
    num_workers: int | None = inference.workers_option()
    threads: int | None = inference.threads_option()
    engine: str | None = option(
        None,
        "BLIP: fast (SDPA, image keys/values once per image, no per-token syncs) or hf (the "
        "plain transformers modules); other models: hf (transformers' generate) or vllm "
        "(a GPU; pip install 'capfilt[vllm]').",
        choices=ENGINES,
        output=True,
        cli_default="fast for BLIP, hf for other models",
    )
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
        if self.engine == "vllm" and self.decoding == "beam":
            raise CapfiltError(
                "--engine vllm samples or decodes greedily: use --decoding nucleus or greedy, "
                "or --engine hf for beam search"
            )
        if self.max_length is not None and self.min_length > self.max_length:
            raise CapfiltError(
                f"--min-length ({self.min_length}) is larger than --max-length ({self.max_length})"
            )

    def for_family(self, model_type: str) -> CaptionOptions:
        """These options with the defaults of `model_type`'s family filled in; a one-line
        refusal of an option that family does not take."""
        from capfilt.models.vlm import default_prompt

        blip = model_type == BLIP
        filled = {
            name: defaults[0 if blip else 1]
            for name, defaults in FAMILY_DEFAULTS.items()
            if getattr(self, name) is None
        }
        if "prompt" in filled and not blip:
            filled["prompt"] = default_prompt(model_type)
        options = dataclasses.replace(self, **filled) if filled else self
        what = f"{self.model!r} is a {model_type!r} model"
        if blip and options.engine == "vllm":
            raise CapfiltError(
                f"--engine vllm runs BLIP-2 and image-text-to-text models; {what}: use "
                "--engine fast or hf"
            )
        if not blip and options.engine == "fast":
            raise CapfiltError(
                f"--engine fast is BLIP's; {what}: use --engine hf (its default) or vllm"
            )
        if not blip and self.gpu_decode:
            raise CapfiltError(f"--gpu-decode is for BLIP checkpoints; {what}")
        if options.min_length > options.max_length:
            raise CapfiltError(
                f"--min-length ({options.min_length}) is larger than --max-length "
                f"({options.max_length}, {model_type}'s default)"
            )
        return options

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

    def model_type(self) -> str | None:
        """The captioner's family ("blip", "llava" ...), None while its checkpoint is not on
        this machine (nothing is downloaded to tell)."""
        if self.model is not None:
            return getattr(self.model, "model_type", BLIP)
        from capfilt.models.vlm import local_model_type

        return local_model_type(self.options.model)

    def provenance_options(self) -> dict:
        options = super().provenance_options()
        model_type = self.model_type()
        if model_type is None:  # settled once the model is loaded
            for name in FAMILY_DEFAULTS:
                if name in options and options[name] is None:
                    options[name] = UNRESOLVED
            return options
        resolved = self.options.for_family(model_type)
        return dict(options, **{n: getattr(resolved, n) for n in FAMILY_DEFAULTS if n in options})

    def settled(self, options: dict) -> dict:
        options = super().settled(options)
        resolved = self.options.for_family(self.model_type())
        return {
            name: getattr(resolved, name)
            if value == UNRESOLVED and name in FAMILY_DEFAULTS
            else value
            for name, value in options.items()
        }

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        if self.model is None:
            self.model = load_captioner(self.options)

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


def load_captioner(options: CaptionOptions):
    """The captioner of `options.model`: a BLIP `Captioner`, or a `VlmCaptioner` for any other
    family. Its family, weights format and the engine's options are checked first, from the
    checkpoint's config.json, before any weights load."""
    from capfilt.models.blip import check_weights, checkpoint_config, resolve_checkpoint

    source = resolve_checkpoint(options.model)
    check_weights(source, "captioner")  # pickles only, a training run: one line, whatever family
    config = checkpoint_config(source, "a BLIP or image-text-to-text checkpoint")
    model_type = config.get("model_type")
    if model_type == BLIP:
        from capfilt.models.blip import Captioner

        options = options.for_family(BLIP)
        return Captioner.load(
            options.model,
            options.precision,
            options.device,
            options.engine,
            fast_options=dict(cuda_graphs=options.cuda_graphs),
        )
    from capfilt.models.vlm import VlmCaptioner, captioning_class

    captioning_class(source, config)  # a model type that captions, before its weights load
    options = options.for_family(model_type)
    return VlmCaptioner.from_source(
        source, model_type, options.precision, options.device, options.engine
    )


def caption_shard(captioner, images_table, config: CaptionOptions, on_images=None):
    """Caption the successful images of one images/ table; return a CAPTIONS_SCHEMA table."""
    config = config.for_family(getattr(captioner, "model_type", BLIP))
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
