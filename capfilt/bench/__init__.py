"""`capfilt bench`: a stage's throughput against the plain Hugging Face recipe, in one run.

config      options (declared once, the command derives from them), architectures
fixtures    random-weight BLIP models, random JPEGs and texts, a dataset of them
measure     FLOP counts, the FLOP bound of this machine, timing one side
workloads   caption, filter and pretrain: plain HF against capfilt
"""

from capfilt.bench.config import ARCH_SHAPES, BLIP_VOCAB, BenchConfig
from capfilt.bench.fixtures import random_blip, random_jpegs
from capfilt.bench.measure import caption_flops
from capfilt.bench.workloads import run_bench

__all__ = [
    "ARCH_SHAPES",
    "BLIP_VOCAB",
    "BenchConfig",
    "caption_flops",
    "random_blip",
    "random_jpegs",
    "run_bench",
]
