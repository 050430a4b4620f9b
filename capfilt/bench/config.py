"""Options of `capfilt bench`, and the architectures it builds with random weights."""

from __future__ import annotations

from dataclasses import dataclass

from capfilt.core.errors import CapfiltError
from capfilt.core.options import Options, option
from capfilt.models.blip import PRECISIONS
from capfilt.models.shapes import (
    BERT_BASE,
    SMALL_TEXT,
    SMALL_VISION,
    TINY_TEXT,
    TINY_VISION,
    VIT_B16,
    VIT_L16,
)
from capfilt.models.tiny_vlm import TINY_VLMS

WORKLOADS = ("caption", "filter", "pretrain")


# BLIP's, then tiny random captioners of other families (models/tiny_vlm.py) for `caption`.
ARCHS = ("tiny", "small", "base", "large", *TINY_VLMS)


LEVELS = ("e2e", "model", "data")


BLIP_VOCAB = 30524  # bert-base-uncased + [DEC] + [ENC]


# The released BLIP checkpoints' shapes: ViT-B/16 or ViT-L/16 at 384 px, BERT-base text.
ARCH_SHAPES = {
    # the same shapes as the tiny checkpoints of the tests and the demo
    "tiny": dict(vision=TINY_VISION, text=TINY_TEXT),
    # width 128, 4 + 4 layers, 96 px: a second small architecture for CPU ratios
    "small": dict(vision=SMALL_VISION, text=SMALL_TEXT),
    "base": dict(vision=VIT_B16, text=BERT_BASE),
    "large": dict(vision=VIT_L16, text=BERT_BASE),
}


# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, TFLOP/s, for reference.
SPEC_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0,
    ("H100", "bf16"): 989.0,
    ("A100", "bf16"): 312.0,
    ("L40S", "bf16"): 362.0,
    ("L4", "bf16"): 121.0,
}


@dataclass(frozen=True, kw_only=True)
class BenchConfig(Options):
    """Options of `capfilt bench`."""

    workload: str = option(help="What to measure.", choices=WORKLOADS, positional=True)
    model: str | None = option(
        None,
        "Checkpoint (local dir or hub id): BLIP, or for caption BLIP-2 or an image-text-to-text "
        "model; default random --arch weights.",
    )
    arch: str = option(
        "tiny",
        "Random-weight architecture: BLIP tiny (width 64, 2 + 2 layers, 64 px), small (width "
        "128, 4 + 4 layers, 96 px), base (ViT-B/16) or large (ViT-L/16); caption only: "
        "blip2-tiny, llava-tiny, idefics3-tiny or paligemma-tiny (width 64, transformers' "
        "classes).",
        choices=ARCHS,
    )
    level: str = option(
        "e2e",
        "e2e: JPEG bytes in Parquet to rows written; model: tensors in; data: the input "
        "pipeline alone (caption/filter: JPEG bytes to batches of pixels; pretrain: the "
        "training stream), per decoding worker count.",
        choices=LEVELS,
    )
    images: int = option(16, "Images per timed run.", ge=1)
    batch_size: int = option(8, "Images per batch (both sides).", ge=1)
    captions_per_image: int = option(
        1, "caption: samples per image; filter: synthetic captions (+1 web).", ge=1
    )
    precision: str = option(
        "auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16.", choices=PRECISIONS
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    new_tokens: int = option(20, "caption: new tokens per caption.", ge=1)
    # filter: tokens of each caption ([CLS] and [SEP] included)
    text_tokens: int = option(20, "filter/pretrain: tokens per caption.", ge=3)
    top_p: float = 0.9
    itc: bool = option(True, "filter: score ITC as well as ITM, both sides.")
    workers: int | None = option(
        None, "e2e image-decoding processes (default as caption/filter --workers).", ge=0
    )
    fast_decode: bool = option(False, "e2e caption/filter: capfilt decodes JPEGs at reduced scale.")
    gpu_decode: bool = option(False, "e2e caption/filter: capfilt decodes plain JPEGs on the GPU.")
    engine: str | None = option(
        None,
        "caption of BLIP-2 or an image-text-to-text model: capfilt's engine, hf (default) or "
        "vllm (a GPU).",
        choices=("hf", "vllm"),
    )
    repeats: int = option(1, "Timed runs per side; the best counts.", ge=1)
    peak_tflops: float | None = option(
        None, "FLOP bound in TFLOP/s (default: a measured matmul).", gt=0
    )
    threads: int | None = option(None, "CPU threads for torch (default: torch's own choice).", ge=1)
    cuda_graphs: bool = option(
        False, "caption on GPU: replay capfilt's decode step as a CUDA graph."
    )
    compile: bool = option(
        False, "caption on GPU: torch.compile capfilt's decode step; pretrain: its layers."
    )
    seed: int = 0

    def check(self) -> None:
        if self.level == "data" and self.images < 2 * self.batch_size:
            raise CapfiltError("--level data needs --images of 2 batches or more")
