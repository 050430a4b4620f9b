"""Shared fixtures: offline settings, tiny BLIP checkpoints, small image datasets."""

from __future__ import annotations

import io
import os
import random
from contextlib import contextmanager

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def draw_scene(color: str, shape: str, size: int = 96, background=(245, 245, 245)):
    """A PIL image of one coloured shape; its true caption is f'a {color} {shape}'."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


def jpeg_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


SCENE_TEXTS = [f"a {c} {s}" for c in COLORS for s in SHAPES] + [
    f"a photo of a {c} {s} on a white background" for c in COLORS for s in SHAPES
]


def accelerate_launch_on_cpu(processes: int = 2) -> list[str]:
    """`accelerate launch` of `processes` CPU processes (gloo), up to the module to run.

    `--cpu` makes accelerate 1.x start a single process; `--multi_gpu` on a machine without
    CUDA starts N processes and capfilt picks gloo (MULTI_CPU) for them.
    """
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
    ]


@contextmanager
def single_torch_thread():
    """Tiny models run fastest on one thread; more only contend on a busy 2-core CI machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a test module of tiny models: `pytestmark = pytest.mark.usefixtures(...)`."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from capfilt.models.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(SCENE_TEXTS * 5 + ["a picture of", "web image jpg dsc file"], 200, out)


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory, tiny_tokenizer):
    """Local directory of a random tiny BlipForConditionalGeneration checkpoint."""
    from capfilt.models.tiny import build_tiny_blip

    return build_tiny_blip(
        tmp_path_factory.mktemp("captioner"), tiny_tokenizer, "captioner", seed=0
    )


@pytest.fixture(scope="session")
def tiny_filter(tmp_path_factory, tiny_tokenizer):
    """Local directory of a random tiny BlipForImageTextRetrieval checkpoint."""
    from capfilt.models.tiny import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("filter"), tiny_tokenizer, "filter", seed=1)


def images_schema():
    """img2dataset's Parquet schema of an images/ shard."""
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("original_width", pa.int64()),
            ("original_height", pa.int64()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
            ("jpg", pa.binary()),
        ]
    )


def write_images_dataset(
    root, n_shards: int = 2, per_shard: int = 6, seed: int = 0, bad_keys: tuple[str, ...] = ()
):
    """Write DATASET/images/ shards in img2dataset's parquet schema with toy scenes.

    Keys in `bad_keys` get bytes that are not an image (status stays success, as when an
    upstream writer let a broken file through); every 5th row is a failed download.
    Returns the list of (key, true caption) of the successful rows.
    """
    import hashlib

    import pyarrow as pa

    from capfilt.core.layout import Dataset

    rng = random.Random(seed)
    ds = Dataset(str(root))
    truths = []
    for shard in range(n_shards):
        rows = []
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            caption = f"a {color} {shape}"
            if i % 5 == 4:
                rows.append(
                    dict(
                        key=key,
                        url=f"http://127.0.0.1/{key}.jpg",
                        caption=caption,
                        status="failed_to_download",
                        error_message="HTTP Error 404",
                        width=None,
                        height=None,
                        original_width=None,
                        original_height=None,
                        exif=None,
                        sha256=None,
                        jpg=None,
                    )
                )
                continue
            data = (
                b"<html>not an image</html>"
                if key in bad_keys
                else jpeg_bytes(draw_scene(color, shape))
            )
            rows.append(
                dict(
                    key=key,
                    url=f"http://127.0.0.1/{key}.jpg",
                    caption=caption,
                    status="success",
                    error_message=None,
                    width=96,
                    height=96,
                    original_width=96,
                    original_height=96,
                    exif="{}",
                    sha256=hashlib.sha256(data).hexdigest(),
                    jpg=data,
                )
            )
            truths.append((key, caption))
        schema = images_schema()
        table = pa.table({n: [r[n] for r in rows] for n in schema.names}, schema=schema)
        ds.write_shard("images", shard, table)
    return truths


@pytest.fixture
def images_dataset(tmp_path):
    """A dataset folder with two images/ shards of toy scenes (and some failed rows)."""
    root = tmp_path / "ds"
    write_images_dataset(root)
    return root
