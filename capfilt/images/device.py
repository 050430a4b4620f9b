"""JPEG decoding on the model's device (`--gpu-decode`): torchvision's nvJPEG path on a GPU.

On a GPU machine the CPU cores decoding and resizing JPEGs are what limits captioning and
filtering end to end (README). With `--gpu-decode` the decoding processes only read each
image's header; plain baseline/progressive RGB or greyscale JPEGs without an EXIF rotation go
to the device as bytes and are decoded there in one batched call, then resized by the image
processor on the device. Everything else (PNG, WebP, CMYK JPEGs, rotated photos, a JPEG the
device decoder refuses) takes the usual PIL path, so every image still gets pixels or an error
row. On the CPU torchvision decodes exactly as PIL does (the tests compare them); nvJPEG's
inverse DCT can differ from libjpeg-turbo's by a level here and there.
"""

from __future__ import annotations

from capfilt.core.errors import CapfiltError

# PIL modes of JPEGs that decode_jpeg(mode=RGB) turns into the same RGB as PIL's convert().
DEVICE_MODES = ("RGB", "L")
_ORIENTATION = 0x0112


def check_device_decode(image_processor) -> None:
    """A clear error when device decoding cannot run with this install and processor."""
    try:
        import torchvision.io  # noqa: F401
    except ImportError as error:
        raise CapfiltError(
            "--gpu-decode needs torchvision (pip install torchvision matching your torch)"
        ) from error
    if not hasattr(image_processor, "rescale_and_normalize"):
        raise CapfiltError(
            f"--gpu-decode needs transformers' torchvision image processor, not "
            f"{type(image_processor).__name__}"
        )


def jpeg_for_device(data: bytes | None, max_pixels: int) -> bool:
    """True when `data` is a JPEG the device may decode: read from its header only."""
    import io

    from PIL import Image

    if not data or data[:2] != b"\xff\xd8":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: the header, not the pixels
            width, height = img.size
            if img.format != "JPEG" or img.mode not in DEVICE_MODES:
                return False
            if width * height > max_pixels:
                return False  # the PIL path turns it into an error row
            return img.getexif().get(_ORIENTATION, 1) == 1
    except Exception:  # noqa: BLE001 - anything odd goes the PIL way, which reports it
        return False


def finish_on_device(chunk, image_processor, device, decode_on_cpu):
    """Decode `chunk.deferred` JPEGs on `device`, resize them there, and put them with the
    chunk's PIL-decoded pixels: returns the chunk with uint8 `pixel_values` (N, 3, H, W) on
    `device` in pixel-row order. `decode_on_cpu(bytes) -> (uint8 (3, H, W) | None, error)`
    is the fallback for a JPEG the device decoder refuses.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    rows = [row for row, _ in chunk.deferred]
    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for _, blob in chunk.deferred]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad image fails the batch: retry one by one
        images = []
        for tensor in data:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    failed = {}
    for i, image in enumerate(images):
        if image is None:
            pixels, error = decode_on_cpu(chunk.deferred[i][1])
            if pixels is None:
                failed[rows[i]] = error
            else:
                images[i] = pixels.to(device)
    kept = [(row, image) for row, image in zip(rows, images, strict=True) if row not in failed]
    resized = None
    if kept:
        resized = image_processor(
            images=[image for _, image in kept],
            do_rescale=False,
            do_normalize=False,
            return_tensors="pt",
            device=device,
        )["pixel_values"]
    return _assemble(chunk, kept, resized, failed, device)


def _assemble(chunk, kept, resized, failed: dict, device):
    """The chunk with one uint8 pixel tensor on `device`; rows that failed become errors."""
    import torch

    old_total = len(chunk.cpu_rows) + len(chunk.deferred)
    renumber, new = {}, 0
    for row in range(old_total):
        if row not in failed:
            renumber[row] = new
            new += 1
    pixel_index, errors = [], []
    for index, error in zip(chunk.pixel_index, chunk.errors, strict=True):
        if index is not None and index in failed:
            pixel_index.append(None)
            errors.append(failed[index])
        else:
            pixel_index.append(None if index is None else renumber[index])
            errors.append(error)
    sample = resized if resized is not None else chunk.pixel_values
    pixel_values = None
    if new and sample is not None:
        pixel_values = torch.empty((new, *sample.shape[1:]), dtype=torch.uint8, device=device)
        if chunk.pixel_values is not None and chunk.cpu_rows:
            at = torch.tensor([renumber[r] for r in chunk.cpu_rows], device=device)
            pixel_values[at] = chunk.pixel_values.to(device, non_blocking=True)
        if resized is not None:
            at = torch.tensor([renumber[r] for r, _ in kept], device=device)
            pixel_values[at] = resized
    chunk.pixel_values = pixel_values
    chunk.pixel_index = pixel_index
    chunk.errors = errors
    chunk.deferred = []
    chunk.cpu_rows = list(range(new))
    return chunk
