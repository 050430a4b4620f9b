"""Image decoding and batching shared by every stage."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import draw_scene, jpeg_bytes

from capfilt.data import decode_image, preprocess


@pytest.mark.parametrize("size", [64, 97])
def test_batched_pil_preprocessing_equals_the_transformers_processor(size):
    from capfilt.models.tiny import image_processor

    processor = image_processor(size)
    rng = random.Random(0)
    images = []
    for i in range(6):
        side = rng.choice([1, 31, 96, 200])
        scene = draw_scene(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), side)
        if i % 2:
            scene = scene.resize((side, max(1, side // 2)))
        images.append(decode_image(jpeg_bytes(scene)).image)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    got = preprocess(processor, images)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_images_without_orientation_are_decoded_unchanged():
    scene = draw_scene("green", "triangle")
    decoded = decode_image(jpeg_bytes(scene))
    assert decoded.ok and decoded.image.size == scene.size and decoded.image.mode == "RGB"


@pytest.mark.parametrize("batch_size, workers", [(10, 2), (40, 2), (3, 2)])
def test_batches_decoded_in_chunks_by_workers_equal_one_process(batch_size, workers):
    """Each batch is split over the workers and put together again, in order, errors kept."""
    from capfilt.data import ShardImages, image_batches
    from capfilt.models.tiny import image_processor

    rng = random.Random(1)
    keys, blobs = [], []
    for i in range(37):
        keys.append(f"k{i:03d}")
        if i % 9 == 4:
            blobs.append(b"not an image")
        else:
            scene = draw_scene(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), 48)
            blobs.append(jpeg_bytes(scene))
    rows = ShardImages(keys, blobs, extra={"caption": [f"c{i}" for i in range(37)]})
    processor = image_processor(32)
    one = list(image_batches(rows, processor, batch_size, num_workers=0))
    split = list(image_batches(rows, processor, batch_size, workers, device=torch.device("cpu")))
    assert [len(b) for b in split] == [len(b) for b in one]
    assert sum(len(b) for b in split) == 37
    for a, b in zip(one, split, strict=True):
        assert a.keys == b.keys and a.errors == b.errors and a.pixel_index == b.pixel_index
        assert a.extra == b.extra
        assert torch.equal(a.pixel_values, b.pixel_values)
    errors = {k: e for b in split for k, e in zip(b.keys, b.errors, strict=True) if e}
    assert sorted(errors) == ["k004", "k013", "k022", "k031"]
