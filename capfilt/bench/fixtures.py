"""What a bench runs on: random-weight BLIP models, random JPEGs and texts, a dataset of them."""

from __future__ import annotations

import io as _io
from pathlib import Path

from capfilt.bench.config import ARCH_SHAPES, BLIP_VOCAB, BenchConfig


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


def write_bench_dataset(
    root: Path, jpegs: list[bytes], web: list[str], synthetic=None, shard_size: int | None = None
):
    """images/ shards (img2dataset schema) of `shard_size` rows (default: one shard) and
    optionally the matching captions/ shards at `root`."""
    import pyarrow as pa

    from capfilt.core import parquet as io
    from capfilt.core.layout import Dataset

    ds = Dataset(str(root))
    keys = [f"{i:09d}" for i in range(len(jpegs))]
    size = shard_size or max(1, len(keys))
    for shard, start in enumerate(range(0, len(keys), size)):
        part = slice(start, start + size)
        count = len(keys[part])
        table = pa.table(
            {
                "key": keys[part],
                "url": [f"http://example.invalid/{k}.jpg" for k in keys[part]],
                "caption": web[part],
                "status": ["success"] * count,
                "error_message": pa.nulls(count, pa.string()),
                "width": [256] * count,
                "height": [256] * count,
                "jpg": jpegs[part],
            }
        )
        ds.write_shard("images", shard, table)
        if synthetic is not None:
            rows = [
                dict(
                    key=k, caption_id=j, text=t, model="bench", status="success", error_message=None
                )
                for k, texts in zip(keys[part], synthetic[part], strict=True)
                for j, t in enumerate(texts)
            ]
            ds.write_shard("captions", shard, io.rows_to_table(rows, io.CAPTIONS_SCHEMA))
    return ds


def random_pixels(blip_config, images, seed, device, dtype):
    import torch

    size = blip_config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(images, 3, size, size, generator=generator).to(device, dtype)


def random_pretrain_batch(batch: int, image_size: int, text_tokens: int, seed: int, device):
    """(pixels, input_ids, attention_mask) of a MED training batch of random data on `device`:
    ids from [CLS] to [SEP] of `synthetic_bert_tokenizer`, every token visible."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    ids = torch.randint(1000, 30000, (batch, text_tokens), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    return pixels.to(device), ids.to(device), torch.ones_like(ids, device=device)
