"""`capfilt bench`: a stage's throughput here, capfilt's path against the plain Hugging Face recipe.

Both sides run in one process on the same model weights, the same images and the same
precision, one after the other, so their ratio holds on a noisy machine:

- caption — plain: `BlipProcessor` + `BlipForConditionalGeneration.generate` (nucleus
  sampling, `num_return_sequences`), batched; capfilt: the fast path (`models/fast.py`).
- filter — plain: `BlipForImageTextRetrieval` forward on each batch of (image, caption) pairs
  (ITM, and with ITC a second forward with `use_itm_head=False`); capfilt: the fast path.
- pretrain — one MED training step (ITC + ITM + LM, AdamW), images/s and MFU; no plain
  counterpart exists.

Levels: `e2e` (default) starts from JPEG bytes in a Parquet shard and ends with rows written
(capfilt runs its stage functions, `caption_shard`/`score_shard`, with the fast model); `model`
starts from pixel tensors. Work per image is counted analytically from the config (vision
encoder + text encoder/decoder per token) to give the achieved TFLOP/s and the fraction of the
FLOP bound, the bound being a large matmul measured on the same device and precision.
"""

from __future__ import annotations

import io as _io
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from capfilt.core.errors import CapfiltError
from capfilt.core.options import Options, option
from capfilt.models.blip import PRECISIONS
from capfilt.models.shapes import BERT_BASE, TINY_TEXT, TINY_VISION, VIT_B16, VIT_L16

WORKLOADS = ("caption", "filter", "pretrain")
ARCHS = ("tiny", "base", "large")
LEVELS = ("e2e", "model")
BLIP_VOCAB = 30524  # bert-base-uncased + [DEC] + [ENC]

# The released BLIP checkpoints' shapes: ViT-B/16 or ViT-L/16 at 384 px, BERT-base text.
ARCH_SHAPES = {
    # the same shapes as the tiny checkpoints of the tests and the demo
    "tiny": dict(vision=TINY_VISION, text=TINY_TEXT),
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
        None, "BLIP checkpoint (local dir or hub id); default random --arch weights."
    )
    arch: str = option(
        "tiny",
        "Random-weight architecture: tiny, base (ViT-B/16) or large (ViT-L/16).",
        choices=ARCHS,
    )
    level: str = option(
        "e2e", "e2e: JPEG bytes in Parquet to rows written; model: tensors in.", choices=LEVELS
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


# --- models with random weights --------------------------------------------------------------


def synthetic_bert_tokenizer():
    """A WordPiece tokenizer with bert-base-uncased's layout of special ids and 30524 tokens.

    [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, [DEC]=30522, [ENC]=30523, and made-up
    words elsewhere: enough to tokenize and decode whatever a randomly initialised BLIP says.
    """
    from tokenizers import Tokenizer, models

    from capfilt.models.tokenizers import as_blip_tokenizer, bert_pipeline

    special = {
        0: "[PAD]",
        100: "[UNK]",
        101: "[CLS]",
        102: "[SEP]",
        103: "[MASK]",
        30522: "[DEC]",
        30523: "[ENC]",
    }
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    filler = iter(letters + [f"##{c}" for c in letters] + [f"w{i}" for i in range(BLIP_VOCAB)])
    vocab = {}
    for index in range(BLIP_VOCAB):
        token = special.get(index) or next(filler)
        vocab[token] = index
    tok = bert_pipeline(Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]")))
    return as_blip_tokenizer(tok)


def random_blip(kind: str, arch: str, seed: int = 0):
    """(network, processor) of a randomly initialised BLIP `captioner`/`filter` of `arch`."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipProcessor,
    )

    from capfilt.models.tiny import image_processor

    shapes = ARCH_SHAPES[arch]
    tokenizer = synthetic_bert_tokenizer()
    text = dict(
        shapes["text"],
        vocab_size=BLIP_VOCAB,
        bos_token_id=30522,
        pad_token_id=0,
        sep_token_id=102,
        eos_token_id=102,
        encoder_hidden_size=shapes["vision"]["hidden_size"],
    )
    config = BlipConfig(
        text_config=text, vision_config=dict(shapes["vision"]), image_text_hidden_size=256
    )
    torch.manual_seed(seed)
    cls = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}[kind]
    network = cls(config).eval()
    processor = BlipProcessor(
        image_processor=image_processor(shapes["vision"]["image_size"]), tokenizer=tokenizer
    )
    return network, processor


def load_models(config: BenchConfig, kind: str):
    """(network, processor, label, device, dtype) for the bench, moved to device and dtype."""
    from transformers import BlipProcessor

    from capfilt.models.blip import Captioner, ItmScorer, resolve_device, resolve_dtype

    if config.model:
        stage_model = {"captioner": Captioner, "filter": ItmScorer}[kind].load(
            config.model, config.precision, config.device
        )
        processor = BlipProcessor(
            image_processor=stage_model.image_processor, tokenizer=stage_model.tokenizer
        )
        label = f"{stage_model.source.model_id} ({stage_model.source.revision})"
        return stage_model.network, processor, label, stage_model.device, stage_model.dtype
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    network, processor = random_blip(kind, config.arch, config.seed)
    network.to(device=device, dtype=dtype).eval()
    return network, processor, f"random-weights BLIP {config.arch}", device, dtype


# --- counting FLOPs ------------------------------------------------------------------------


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
    _sync(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- inputs --------------------------------------------------------------------------------


def random_jpegs(count: int, seed: int, size: tuple[int, int] = (256, 256)) -> list[bytes]:
    """Smooth random colour images as JPEG bytes, at img2dataset's default size (256 px)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
        buf = _io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def random_texts(count: int, words: int, seed: int) -> list[str]:
    """Made-up captions of `words` words from the synthetic tokenizer's vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(200, 30000)}" for _ in range(words)) for _ in range(count)]


def write_bench_dataset(root: Path, jpegs: list[bytes], web: list[str], synthetic=None):
    """An images/ shard (img2dataset schema) and optionally a captions/ shard at `root`."""
    import pyarrow as pa

    from capfilt.core import parquet as io
    from capfilt.core.layout import Dataset

    ds = Dataset(str(root))
    keys = [f"{i:09d}" for i in range(len(jpegs))]
    table = pa.table(
        {
            "key": keys,
            "url": [f"http://example.invalid/{k}.jpg" for k in keys],
            "caption": web,
            "status": ["success"] * len(keys),
            "error_message": pa.nulls(len(keys), pa.string()),
            "width": [256] * len(keys),
            "height": [256] * len(keys),
            "jpg": jpegs,
        }
    )
    ds.write_shard("images", 0, table)
    if synthetic is not None:
        rows = [
            dict(key=k, caption_id=j, text=t, model="bench", status="success", error_message=None)
            for k, texts in zip(keys, synthetic, strict=True)
            for j, t in enumerate(texts)
        ]
        ds.write_shard("captions", 0, io.rows_to_table(rows, io.CAPTIONS_SCHEMA))
    return ds


# --- capfilt's stage models on the fast path --------------------------------------------------


# --- timing --------------------------------------------------------------------------------


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


def _timed(device, run, repeats: int) -> float:
    """Best wall time of `run()` over `repeats` runs, after one untimed warm-up run."""
    import torch

    run()  # warm-up: allocator, kernels, lazy initialisation
    best = math.inf
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _side(device, run, repeats, images, pairs, flops_per_image, bound) -> SideResult:
    import torch

    try:
        seconds = _timed(device, run, repeats)
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


# --- workloads -----------------------------------------------------------------------------


def _batches(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def bench_caption(config: BenchConfig, scratch: Path) -> dict:
    import torch

    network, processor, label, device, dtype = load_models(config, "captioner")
    tokenizer = processor.tokenizer
    n, tokens = config.captions_per_image, config.new_tokens
    e2e = config.level == "e2e"
    prompt = "a picture of " if e2e else ""
    prompt_len = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # min length = max length: every caption has exactly `tokens` new tokens on both sides, so
    # a random model's early [SEP] cannot make one side's work smaller.
    lengths = dict(max_length=prompt_len + tokens, min_length=prompt_len + tokens)
    sampling = dict(do_sample=True, top_p=config.top_p, num_return_sequences=n, **lengths)
    flops = caption_flops(network.config, n, prompt_len, tokens)
    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    images = config.images
    fast_options = dict(cuda_graphs=config.cuda_graphs, compile=config.compile)

    if e2e:
        from capfilt.core.parquet import CAPTIONS_SCHEMA, rows_to_table
        from capfilt.images.decode import decode_image
        from capfilt.models.blip import Captioner, ModelSource
        from capfilt.stages.caption import CaptionOptions, caption_shard

        jpegs = random_jpegs(images, config.seed)
        ds = write_bench_dataset(scratch / "ds", jpegs, random_texts(images, 8, config.seed))
        images_table = ds.read_shard("images", 0)

        def plain():
            rows = []
            table = ds.read_shard("images", 0)
            keys, blobs = table["key"].to_pylist(), table["jpg"].to_pylist()
            for start, stop in _batches(len(keys), config.batch_size):
                pil = [decode_image(b).image for b in blobs[start:stop]]
                inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
                with torch.inference_mode():
                    ids = network.generate(
                        pixel_values=inputs.pixel_values.to(device, dtype),
                        input_ids=inputs.input_ids.to(device),
                        repetition_penalty=1.1,
                        **sampling,
                    )
                texts = tokenizer.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
                for i, text in enumerate(texts):
                    rows.append(
                        dict(
                            key=keys[start + i // n],
                            caption_id=i % n,
                            text=text,
                            model="plain",
                            status="success",
                            error_message=None,
                        )
                    )
            ds.write_shard("captions", 0, rows_to_table(rows, CAPTIONS_SCHEMA))

        source = ModelSource(label, Path("."), "bench")
        captioner = Captioner(
            network, processor, source, device, dtype, engine="fast", fast_options=fast_options
        )
        stage_config = CaptionOptions(
            model=label,
            num_captions=n,
            top_p=config.top_p,
            repetition_penalty=1.1,
            prompt=prompt,
            batch_size=config.batch_size,
            num_workers=config.workers,  # None: the stage's default
            fast_decode=config.fast_decode,
            gpu_decode=config.gpu_decode,
            **lengths,
        )

        def capfilt():
            table = caption_shard(captioner, images_table, stage_config)
            ds.write_shard("captions", 0, table)

    else:
        from capfilt.models.fast import FastCaptioner, OomBackoff

        pixels = _random_pixels(network.config, images, config.seed, device, dtype)
        fast = FastCaptioner(network, **fast_options)
        backoff = OomBackoff(config.batch_size)
        generator = torch.Generator(device=device).manual_seed(config.seed)

        def plain():
            for start, stop in _batches(images, config.batch_size):
                with torch.inference_mode():
                    network.generate(pixel_values=pixels[start:stop], **sampling)

        def capfilt():
            backoff.map(
                lambda start, stop: fast.generate(
                    pixels[start:stop],
                    num_captions=n,
                    top_p=config.top_p,
                    generator=generator,
                    **lengths,
                ),
                images,
            )

    hf = _side(device, plain, config.repeats, images, 0, flops, bound)
    ours = _side(device, capfilt, config.repeats, images, 0, flops, bound)
    return _report(
        config,
        label,
        device,
        dtype,
        flops,
        bound,
        hf,
        ours,
        extra=dict(
            prompt_tokens=prompt_len,
            new_tokens=tokens,
            captions_per_image=n,
            **fast_options,
        ),
    )


def bench_filter(config: BenchConfig, scratch: Path) -> dict:
    import torch

    network, processor, label, device, dtype = load_models(config, "filter")
    tokenizer = processor.tokenizer
    synthetic_n = config.captions_per_image
    texts_per_image = 1 + synthetic_n
    images = config.images
    words = config.text_tokens - 2
    web = random_texts(images, words, config.seed)
    synthetic = [random_texts(synthetic_n, words, config.seed * 7919 + i) for i in range(images)]
    flops = filter_flops(network.config, texts_per_image, config.text_tokens, config.itc)
    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    pairs = images * texts_per_image
    e2e = config.level == "e2e"

    def plain_scores(pixel_values, index, texts):
        encoded = tokenizer(
            texts, padding="longest", truncation=True, max_length=35, return_tensors="pt"
        )
        ids = encoded.input_ids.to(device)
        mask = encoded.attention_mask.to(device)
        pair_pixels = pixel_values[index]
        with torch.inference_mode():
            itm = network(input_ids=ids, pixel_values=pair_pixels, attention_mask=mask)
            itm = itm.itm_score.float().softmax(dim=-1)[:, 1]
            itc = None
            if config.itc:
                sim = network(
                    input_ids=ids, pixel_values=pair_pixels, attention_mask=mask, use_itm_head=False
                ).itm_score
                itc = sim.diagonal().float()
        return itm.cpu(), None if itc is None else itc.cpu()

    if e2e:
        from capfilt.core.parquet import SCORES_SCHEMA, rows_to_table
        from capfilt.images.decode import decode_image
        from capfilt.models.blip import ItmScorer, ModelSource
        from capfilt.stages.filter import FilterOptions, score_shard

        ds = write_bench_dataset(scratch / "ds", random_jpegs(images, config.seed), web, synthetic)
        images_table = ds.read_shard("images", 0)
        captions_table = ds.read_shard("captions", 0)

        def plain():
            table = ds.read_shard("images", 0)
            captions = ds.read_shard("captions", 0).to_pylist()
            by_key: dict[str, list[str]] = {}
            for row in captions:
                by_key.setdefault(row["key"], []).append(row["text"])
            keys, blobs = table["key"].to_pylist(), table["jpg"].to_pylist()
            web_texts = table["caption"].to_pylist()
            rows = []
            for start, stop in _batches(len(keys), config.batch_size):
                pil = [decode_image(b).image for b in blobs[start:stop]]
                pixel_values = processor(images=pil, return_tensors="pt").pixel_values
                pixel_values = pixel_values.to(device, dtype)
                index, texts, meta = [], [], []
                for i in range(start, stop):
                    for text_id, text in enumerate([web_texts[i], *by_key.get(keys[i], [])]):
                        index.append(i - start)
                        texts.append(text)
                        meta.append((keys[i], text_id, "web" if text_id == 0 else "synthetic"))
                itm, itc = plain_scores(pixel_values, torch.tensor(index, device=device), texts)
                for j, (key, text_id, source) in enumerate(meta):
                    rows.append(
                        dict(
                            key=key,
                            text_id=text_id,
                            source=source,
                            text=texts[j],
                            itm_score=float(itm[j]),
                            itc_score=None if itc is None else float(itc[j]),
                            model="plain",
                        )
                    )
            ds.write_shard("scores", 0, rows_to_table(rows, SCORES_SCHEMA))

        source = ModelSource(label, Path("."), "bench")
        scorer = ItmScorer(
            network, processor, source, device, dtype, itm_token="cls", engine="fast"
        )
        stage_config = FilterOptions(
            threshold=0.5,
            model=label,
            itm_token="cls",
            batch_size=config.batch_size,
            num_workers=config.workers,  # None: the stage's default
            fast_decode=config.fast_decode,
            gpu_decode=config.gpu_decode,
        )

        def capfilt():
            table = score_shard(scorer, images_table, captions_table, stage_config)
            ds.write_shard("scores", 0, table)

    else:
        from capfilt.models.fast import FastItm, OomBackoff

        pixels = _random_pixels(network.config, images, config.seed, device, dtype)
        texts = [t for i in range(images) for t in [web[i], *synthetic[i]]]
        encoded = tokenizer(texts, padding="longest", return_tensors="pt")
        all_ids, all_mask = encoded.input_ids.to(device), encoded.attention_mask.to(device)
        fast = FastItm(network)
        backoff = OomBackoff(config.batch_size)

        def plain():
            for start, stop in _batches(images, config.batch_size):
                index = torch.arange(stop - start, device=device).repeat_interleave(texts_per_image)
                plain_scores(
                    pixels[start:stop],
                    index,
                    texts[start * texts_per_image : stop * texts_per_image],
                )

        def fast_batch(start, stop):
            rows = slice(start * texts_per_image, stop * texts_per_image)
            index = torch.arange(stop - start, device=device).repeat_interleave(texts_per_image)
            embeds = fast.encode_images(pixels[start:stop])
            itm = fast.itm(embeds, index, all_ids[rows], all_mask[rows]).cpu()
            if config.itc:
                itc = fast.itc(embeds, index, all_ids[rows], all_mask[rows]).cpu()
                return itm, itc
            return itm

        def capfilt():
            backoff.map(fast_batch, images)

    hf = _side(device, plain, config.repeats, images, pairs, flops, bound)
    ours = _side(device, capfilt, config.repeats, images, pairs, flops, bound)
    return _report(
        config,
        label,
        device,
        dtype,
        flops,
        bound,
        hf,
        ours,
        extra=dict(
            texts_per_image=texts_per_image,
            text_tokens=config.text_tokens,
            itc=config.itc,
        ),
    )


def _random_pixels(blip_config, images, seed, device, dtype):
    import torch

    size = blip_config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(images, 3, size, size, generator=generator).to(device, dtype)


def _report(config, label, device, dtype, flops, bound, hf, ours, extra) -> dict:
    import torch

    from capfilt.models.blip import dtype_name

    device_name = str(device)
    if device.type == "cuda":
        device_name = f"{device} ({torch.cuda.get_device_name(device)})"
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
        images=config.images,
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
        # capfilt's decoding options apply to its end-to-end side only
        fast_decode=config.level == "e2e" and config.fast_decode,
        gpu_decode=config.level == "e2e" and config.gpu_decode,
    )


def bench_pretrain(config: BenchConfig, scratch: Path) -> dict:
    """Images/s and MFU of MED training steps (ITC + ITM + LM) on random data.

    plain: transformers' eager attention and the default (for-each) AdamW; capfilt: SDPA in
    every attention module and, on GPU, the fused AdamW. Same weights, data and autocast.
    """
    import torch

    from capfilt.models.blip import dtype_name, resolve_device, resolve_dtype
    from capfilt.models.med import MED, compile_layers, med_config

    if config.model:
        raise CapfiltError("bench pretrain builds a MED from --arch; --model is not used here")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    tokenizer = synthetic_bert_tokenizer()
    med_cfg = med_config(config.arch, tokenizer, queue_size=max(config.batch_size * 4, 64))
    size = med_cfg.image_size
    generator = torch.Generator().manual_seed(config.seed)
    batch = config.batch_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device)
    ids = torch.randint(1000, 30000, (batch, config.text_tokens), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    steps = max(1, config.images // batch)
    bound = config.peak_tflops or measure_matmul_tflops(device, dtype)
    flops = pretrain_flops(med_cfg.blip_config(), config.text_tokens)
    images = steps * batch

    def side(attention: str, fused: bool, compile: bool = False) -> SideResult:
        torch.manual_seed(config.seed)
        med = MED(med_cfg, attention=attention).to(device).train()
        if compile:
            compile_layers(med)
        params = [p for p in med.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)

        def run():
            for _ in range(steps):
                with autocast:
                    loss = sum(med(pixels, ids, mask).values())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return _side(device, run, config.repeats, images, 0, flops, bound)

    hf = side("eager", fused=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the eager side's model and optimizer are gone
    ours = side("sdpa", fused=device.type == "cuda", compile=config.compile)
    spec = spec_peak_tflops(device, dtype)
    return dict(
        workload="pretrain",
        level="model: MED training step (forward + backward + AdamW) on random tensors",
        model=f"random-weights MED {config.arch} ({size} px)",
        device=str(device)
        if device.type != "cuda"
        else f"{device} ({torch.cuda.get_device_name(device)})",
        dtype=dtype_name(dtype),
        threads=torch.get_num_threads(),
        images=images,
        batch_size=batch,
        text_tokens=config.text_tokens,
        compile=config.compile,
        gflops_per_image=flops / 1e9,
        bound_tflops=bound,
        bound_source="--peak-tflops" if config.peak_tflops else "measured matmul",
        spec_peak_tflops=spec,
        flop_bound_images_per_s=bound * 1e12 / flops,
        plain_hf=asdict(hf),
        capfilt=asdict(ours),
        speedup=ours.images_per_s / hf.images_per_s
        if hf.images_per_s and ours.images_per_s
        else None,
        # MFU: achieved model FLOP/s over the data sheet's dense peak where the chip is known,
        # else over the measured matmul bound.
        mfu=(ours.tflops / spec if spec else ours.fraction_of_bound) if ours.tflops else None,
    )


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


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark of `config.workload`; returns the result as a JSON-ready dict."""
    import torch

    runner = {"caption": bench_caption, "filter": bench_filter, "pretrain": bench_pretrain}
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as scratch:
            return runner[config.workload](config, Path(scratch))
    finally:
        torch.set_num_threads(threads)
