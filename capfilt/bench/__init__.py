"""`capfilt bench`: a stage's throughput against the plain Hugging Face recipe, in one run.

config      options (declared once, the command derives from them), architectures
fixtures    random-weight BLIP models, random JPEGs and texts, a dataset of them
measure     FLOP counts, the FLOP bound of this machine, timing one side
workloads   caption, filter and pretrain: plain HF against capfilt
"""

from importlib import import_module

# Exported lazily: the CLI imports BenchConfig at start-up, the rest only when a bench runs.
_EXPORTS = {
    "ARCH_SHAPES": "config",
    "BLIP_VOCAB": "config",
    "BenchConfig": "config",
    "caption_flops": "measure",
    "random_blip": "fixtures",
    "random_jpegs": "fixtures",
    "run_bench": "workloads",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"capfilt.bench.{_EXPORTS[name]}"), name)
