"""FLOPs of each workload, the FLOP bound of this machine, and the timing of one side."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from capfilt.bench.config import SPEC_PEAK_TFLOPS


def _vision_flops(vision) -> float:
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    width, ffn = vision.hidden_size, vision.intermediate_size
    patch = 2 * (tokens - 1) * 3 * vision.patch_size**2 * width
    per_layer = 2 * tokens * (4 * width**2 + 2 * width * ffn) + 4 * tokens**2 * width
    return patch + vision.num_hidden_layers * per_layer


def _text_layer_flops(text, queries: int, context: float, image_tokens: int, cross: bool):
    """FLOPs of one text layer for `queries` tokens attending to `context` tokens (self)."""
    width, ffn = text.hidden_size, text.intermediate_size
    flops = 2 * queries * (4 * width**2 + 2 * width * ffn) + 4 * queries * context * width
    if cross:
        flops += 2 * queries * 2 * width**2 + 4 * queries * image_tokens * width
    return flops


def _image_tokens(vision) -> int:
    return (vision.image_size // vision.patch_size) ** 2 + 1


def _cross_kv_flops(text, vision) -> float:
    """Keys and values of one image for every cross-attention layer (once per image)."""
    return (
        text.num_hidden_layers
        * 2
        * _image_tokens(vision)
        * 2
        * vision.hidden_size
        * (text.hidden_size)
    )


def caption_flops(blip_config, captions: int, prompt_len: int, new_tokens: int) -> float:
    """Useful FLOPs to caption one image: vision, image K/V once, prompt once, then per token."""
    text, vision = blip_config.text_config, blip_config.vision_config
    n_img = _image_tokens(vision)
    layers = text.num_hidden_layers
    flops = _vision_flops(vision) + _cross_kv_flops(text, vision)
    flops += layers * _text_layer_flops(text, prompt_len, (prompt_len + 1) / 2, n_img, True)
    head = 2 * text.hidden_size**2 + 2 * text.hidden_size * text.vocab_size
    for step in range(new_tokens):
        context = prompt_len + step + 1
        flops += captions * (layers * _text_layer_flops(text, 1, context, n_img, True) + head)
    return float(flops)


def filter_flops(blip_config, texts: int, text_len: float, itc: bool) -> float:
    """Useful FLOPs to score `texts` captions of one image: vision once, ITM (+ ITC) per text."""
    text, vision = blip_config.text_config, blip_config.vision_config
    n_img = _image_tokens(vision)
    layers = text.num_hidden_layers
    flops = _vision_flops(vision) + _cross_kv_flops(text, vision)
    flops += texts * layers * _text_layer_flops(text, text_len, text_len, n_img, True)
    if itc:
        flops += texts * layers * _text_layer_flops(text, text_len, text_len, n_img, False)
    return float(flops)


def measure_matmul_tflops(device, dtype) -> float:
    """Attainable TFLOP/s of a large square matmul on `device` in `dtype` (the FLOP bound)."""
    import torch

    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    seconds = time.perf_counter() - start
    return 2 * size**3 * repeats / seconds / 1e12


def spec_peak_tflops(device, dtype) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = {torch.bfloat16: "bf16", torch.float16: "bf16"}.get(dtype)
    for (chip, prec), peak in SPEC_PEAK_TFLOPS.items():
        if chip in name and prec == precision:
            return peak
    return None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SideResult:
    """One side of the comparison."""

    seconds: float | None
    images_per_s: float
    pairs_per_s: float | None = None
    tflops: float | None = None
    fraction_of_bound: float | None = None
    peak_memory_gib: float | None = None
    error: str | None = None


def timed(device, run, repeats: int) -> float:
    """Best wall time of `run()` over `repeats` runs, after one untimed warm-up run."""
    import torch

    run()  # warm-up: allocator, kernels, lazy initialisation
    best = math.inf
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def side(device, run, repeats, images, pairs, flops_per_image, bound) -> SideResult:
    import torch

    try:
        seconds = timed(device, run, repeats)
    except Exception as error:  # noqa: BLE001 - an OOM of one side is a result, not a crash
        from capfilt.models.fast import is_out_of_memory

        if not is_out_of_memory(error):
            raise
        message = f"out of memory: {str(error).splitlines()[0]}"
        del error
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return SideResult(None, 0.0, error=message)
    tflops = flops_per_image * images / seconds / 1e12
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    return SideResult(
        seconds=seconds,
        images_per_s=images / seconds,
        pairs_per_s=pairs / seconds if pairs else None,
        tflops=tflops,
        fraction_of_bound=tflops / bound if bound else None,
        peak_memory_gib=peak,
    )


def batches(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def report(
    config, label, device, dtype, flops, bound, hf, ours, extra, level=None, images=None
) -> dict:
    """The result of a bench: both sides, the work per image and the FLOP bound. `level`
    and `images` replace the level's description and --images where a workload differs."""
    import torch

    from capfilt.models.blip import dtype_name

    device_name = str(device)
    if device.type == "cuda":
        device_name = f"{device} ({torch.cuda.get_device_name(device)})"
    if level is None:
        level = (
            "end to end: JPEG bytes in Parquet -> rows written"
            if config.level == "e2e"
            else "model: pixel tensors in, ids/scores out"
        )
    speedup = None
    if hf.images_per_s and ours.images_per_s:
        speedup = ours.images_per_s / hf.images_per_s
    return dict(
        workload=config.workload,
        level=level,
        model=label,
        device=device_name,
        dtype=dtype_name(dtype),
        threads=torch.get_num_threads(),
        images=config.images if images is None else images,
        batch_size=config.batch_size,
        **extra,
        gflops_per_image=flops / 1e9,
        bound_tflops=bound,
        bound_source="--peak-tflops" if config.peak_tflops else "measured matmul",
        spec_peak_tflops=spec_peak_tflops(device, dtype),
        flop_bound_images_per_s=bound * 1e12 / flops,
        plain_hf=asdict(hf),
        capfilt=asdict(ours),
        speedup=speedup,
    )


def decode_flags(config) -> dict:
    """caption/filter: capfilt's decoding options, which apply to its end-to-end side only."""
    e2e = config.level == "e2e"
    return dict(fast_decode=e2e and config.fast_decode, gpu_decode=e2e and config.gpu_decode)


def pretrain_flops(blip_config, text_len: int) -> float:
    """Training FLOPs per image of MED: 3x the trained forward passes + the momentum forwards.

    Trained forward: vision, unimodal text (ITC), three image-grounded text passes (ITM: the
    positive pair and two hard negatives) and the decoder (LM). Momentum (no grad): vision and
    unimodal text once more.
    """
    text, vision = blip_config.text_config, blip_config.vision_config
    n_img = _image_tokens(vision)
    layers = text.num_hidden_layers
    unimodal = layers * _text_layer_flops(text, text_len, text_len, n_img, False)
    grounded = layers * _text_layer_flops(text, text_len, text_len, n_img, True)
    grounded += _cross_kv_flops(text, vision)
    decoder = grounded + text_len * (
        2 * text.hidden_size**2 + 2 * text.hidden_size * text.vocab_size
    )
    vision_flops = _vision_flops(vision)
    trained = vision_flops + unimodal + 3 * grounded + decoder
    return float(3 * trained + vision_flops + unimodal)
