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
