"""Image decoding and batching shared by every stage."""

from __future__ import annotations

import io
import random

import pytest
import torch
from conftest import draw_scene, jpeg_bytes

from capfilt.images.decode import decode_image
from capfilt.images.pixels import preprocess


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


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("batch_size, workers", [(10, 2), (40, 2), (3, 2)])
def test_batches_decoded_in_chunks_by_workers_equal_one_process(batch_size, workers, split):
    """Each batch is split over the workers and put together again (as for a GPU), or made
    whole by one worker (for the CPU): in order, errors kept, the same pixels."""
    from capfilt.images.batches import ShardImages, image_batches
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
    split = list(
        image_batches(
            rows, processor, batch_size, workers, device=torch.device("cpu"), split_batches=split
        )
    )
    assert [len(b) for b in split] == [len(b) for b in one]
    assert sum(len(b) for b in split) == 37
    for a, b in zip(one, split, strict=True):
        assert a.keys == b.keys and a.errors == b.errors and a.pixel_index == b.pixel_index
        assert a.extra == b.extra
        assert torch.equal(a.pixel_values, b.pixel_values)
    errors = {k: e for b in split for k, e in zip(b.keys, b.errors, strict=True) if e}
    assert sorted(errors) == ["k004", "k013", "k022", "k031"]


def _scenes():
    """Two 256 px scenes (JPEG scales 1/4 to 64 px) and a 300x200 one (only 1/2 fits 64 px)."""
    return [
        draw_scene("red", "circle", 256),
        draw_scene("blue", "square", 256),
        draw_scene("green", "triangle", 200).resize((300, 200)),
    ]


def test_default_decoding_is_the_full_decode_and_transformers_preprocessing():
    import io

    import numpy as np
    from PIL import Image

    from capfilt.images.batches import BatchPreprocessor, ShardImages
    from capfilt.models.tiny import image_processor

    processor = image_processor(64)
    data = [jpeg_bytes(scene) for scene in _scenes()]
    full = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    decoded = [decode_image(d).image for d in data]
    for got, want in zip(decoded, full, strict=True):
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    batch = BatchPreprocessor(ShardImages(["a", "b", "c"], data), processor)([0, 1, 2])
    expected = processor(images=full, return_tensors="pt")["pixel_values"]
    assert torch.allclose(batch.pixel_values, expected, atol=1e-5)


def test_fast_decode_scales_jpegs_down_while_decoding_and_stays_close():
    from capfilt.images.batches import BatchPreprocessor, ShardImages
    from capfilt.models.tiny import image_processor

    processor = image_processor(64)
    data = [jpeg_bytes(scene) for scene in _scenes()]
    drafted = [decode_image(d, draft_size=(64, 64)).image for d in data]
    assert [img.size for img in drafted] == [(64, 64), (64, 64), (150, 100)]
    assert all(img.mode == "RGB" for img in drafted)
    png = io_bytes(_scenes()[0], "PNG")  # not a JPEG: decoded in full
    assert decode_image(png, draft_size=(64, 64)).image.size == (256, 256)

    rows = ShardImages(["a", "b", "c"], data)
    exact = BatchPreprocessor(rows, processor)([0, 1, 2]).pixel_values
    fast = BatchPreprocessor(rows, processor, fast_decode=True)([0, 1, 2]).pixel_values
    assert fast.shape == exact.shape == (3, 3, 64, 64)
    assert not torch.equal(fast, exact)
    difference = (fast - exact).abs()
    assert difference.mean() < 0.03 and difference.max() < 0.6  # normalised units (std ≈ 1)


def io_bytes(img, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_image_batches_from_threads_and_from_worker_processes_are_the_same():
    from capfilt.images.batches import ShardImages, image_batches
    from capfilt.models.tiny import image_processor

    processor = image_processor(64)
    data = [jpeg_bytes(scene) for scene in _scenes()] + [b"not an image", None]
    rows = ShardImages([str(i) for i in range(len(data))], data, extra={"n": list(range(5))})
    runs = [
        list(image_batches(rows, processor, 2, num_workers=0, decode_threads=threads))
        for threads in (0, 2)
    ] + [list(image_batches(rows, processor, 2, num_workers=1))]
    for batches in runs:
        assert [b.keys for b in batches] == [["0", "1"], ["2", "3"], ["4"]]
        assert [b.extra["n"] for b in batches] == [[0, 1], [2, 3], [4]]
        assert batches[1].pixel_index == [0, None] and batches[2].pixel_values is None
        assert batches[2].errors == ["no image bytes"]
    for batches in runs[1:]:
        for got, want in zip(batches[:2], runs[0][:2], strict=True):
            assert torch.equal(got.pixel_values, want.pixel_values)


def test_ordered_map_keeps_the_order_and_raises_at_the_failing_item():
    import time

    from capfilt.core.ahead import ordered_map

    def square(i):
        time.sleep(0.01 * (3 - i % 3))  # later items finish first
        if i == 7:
            raise ValueError("seven")
        return i * i

    got = []
    with pytest.raises(ValueError, match="seven"):
        for value in ordered_map(square, range(10), threads=2):
            got.append(value)
    assert got == [i * i for i in range(7)]
    assert list(ordered_map(square, range(5), threads=0)) == [0, 1, 4, 9, 16]
    stopped = ordered_map(square, range(100), threads=2)
    assert next(stopped) == 0
    stopped.close()  # stopping early cancels what has not started


@pytest.mark.parametrize("size", [64, 97])
def test_eight_bit_pixels_normalised_later_equal_the_processor(size):
    """Worker processes send resized uint8 pixels (a quarter of float32's bytes); normalising
    them afterwards (on the GPU in a real run) gives the processor's own values."""
    from capfilt.images.pixels import can_defer_normalization, normalize_pixels, resize_pixels
    from capfilt.models.tiny import image_processor

    processor = image_processor(size)
    assert can_defer_normalization(processor)  # the PIL processor here; torchvision's on GPUs
    rng = random.Random(2)
    images = [
        decode_image(jpeg_bytes(draw_scene("red", "circle", rng.choice([40, 130, 300])))).image
        for _ in range(5)
    ]
    resized = resize_pixels(processor, images)
    assert resized.dtype == torch.uint8 and resized.shape == (5, 3, size, size)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(normalize_pixels(processor, resized), expected, atol=1e-6)


def test_device_decoding_needs_torchvision_or_says_so():
    from capfilt.core.errors import CapfiltError
    from capfilt.images.batches import ShardImages, image_batches
    from capfilt.models.tiny import image_processor

    try:
        import torchvision  # noqa: F401
    except ImportError:
        rows = ShardImages(["a"], [jpeg_bytes(draw_scene("red", "circle", 32))])
        with pytest.raises(CapfiltError, match="--gpu-decode needs torchvision"):
            list(image_batches(rows, image_processor(32), 4, device_decode=True))
    else:
        pytest.skip("torchvision is installed: the device path runs instead")


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decoding_gives_every_row_as_the_cpu_path_does(workers):
    """--gpu-decode on the CPU device: plain JPEGs decode through torchvision exactly as PIL
    decodes them; every hostile file still ends as pixels or the same error row."""
    pytest.importorskip("torchvision")
    from _hostile import corpus

    from capfilt.images.batches import ShardImages, image_batches
    from capfilt.images.device import jpeg_for_device
    from capfilt.models.tiny import image_processor

    rng = random.Random(3)
    blobs = [jpeg_bytes(draw_scene(rng.choice(["red", "blue"]), "square", s)) for s in (30, 64, 90)]
    grey = io.BytesIO()
    draw_scene("green", "circle", 50).convert("L").save(grey, format="JPEG", progressive=True)
    blobs.append(grey.getvalue())
    # A JPEG whose header is fine but whose data stops: the device decoder refuses it.
    blobs.append(blobs[2][: len(blobs[2]) // 2])
    blobs += [h.data for h in corpus()]
    keys = [f"k{i:02d}" for i in range(len(blobs))]
    assert [jpeg_for_device(b, 10**8) for b in blobs[:4]] == [True] * 4
    rows = ShardImages(keys, blobs)
    processor = image_processor(32)
    expected = list(image_batches(rows, processor, 7, num_workers=0))
    got = list(image_batches(rows, processor, 7, workers, device_decode=True))
    assert [b.keys for b in got] == [b.keys for b in expected]
    for a, b in zip(expected, got, strict=True):
        assert b.pixel_index == a.pixel_index
        assert [e is None for e in b.errors] == [e is None for e in a.errors]
        assert torch.allclose(b.pixel_values, a.pixel_values, atol=1e-6)


def test_default_decoding_workers_follow_the_device_and_the_cores(monkeypatch):
    import os

    from capfilt.images.batches import resolve_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_workers(None, cpu) == 0  # threads: processes measured slower on the CPU
    assert resolve_workers(3, cuda) == 3 and resolve_workers(0, cpu) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers(None, cuda) == 14
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPUs share the 16 cores
    assert resolve_workers(None, cuda) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers(None, cuda) == 16
