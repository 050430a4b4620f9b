"""Image decoding and batching for every stage.

JPEG bytes from an images/ shard become RGB PIL images (errors are values, not exceptions),
then batches of `pixel_values` through the checkpoint's own image processor. A torch
DataLoader runs decoding and preprocessing, in worker processes when asked.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

# A web image larger than this many pixels is a decompression bomb, or at least not worth
# decoding for a 384 px model: it becomes an error row instead of eating the machine's memory.
MAX_IMAGE_PIXELS = 100_000_000


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image, or the reason it could not be decoded."""

    image: object | None  # PIL.Image.Image in RGB
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def decode_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode image bytes to an upright RGB PIL image; failures come back as `error`."""
    from PIL import Image, ImageOps

    if not data:
        return DecodedImage(None, "no image bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between max_pixels and twice that; any bomb should be a row error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img = ImageOps.exif_transpose(img)
                # Palette and alpha images go through RGBA so transparency becomes a colour
                # rather than a palette index; CMYK, L, I;16 … convert directly.
                if img.mode in ("P", "PA", "LA") or (img.mode == "RGBA"):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                rgb = img.convert("RGB")
                rgb.load()
        return DecodedImage(rgb)
    except Image.UnidentifiedImageError:
        return DecodedImage(None, "cannot decode image: not an image format PIL recognises")
    except Image.DecompressionBombError as e:
        return DecodedImage(None, f"image too large: {e}")
    except Image.DecompressionBombWarning as e:
        return DecodedImage(None, f"image too large: {e}")
    except Exception as e:  # noqa: BLE001 - any decoder failure is this row's error, not the run's
        return DecodedImage(None, f"cannot decode image: {type(e).__name__}: {e}")


def successful_images(table):
    """The rows of an images/ table that were downloaded (all rows if it has no status column)."""
    import pyarrow.compute as pc

    if "status" not in table.column_names:
        return table
    return table.filter(pc.equal(table["status"], "success"))


def count_successful(dataset, shards: list[int]) -> int:
    """How many downloaded images the images/ shards `shards` of `dataset` hold."""
    total = 0
    for shard in shards:
        try:
            table = dataset.read_shard("images", shard, columns=["status"])
        except (KeyError, ValueError):  # no status column (ArrowInvalid): every row counts
            table = dataset.read_shard("images", shard, columns=["key"])
        total += successful_images(table).num_rows
    return total


@dataclass
class ImageBatch:
    """A batch of images of one shard: the decodable ones as `pixel_values`, the others as errors.

    `keys[i]` has pixel row `pixel_index[i]`, or None when it failed (then `errors[i]` says why).
    """

    keys: list[str]
    pixel_values: object | None  # torch.Tensor (N_ok, 3, H, W) or None if nothing decoded
    pixel_index: list[int | None]
    errors: list[str | None]
    extra: dict[str, list] = field(default_factory=dict)

    @property
    def ok_keys(self) -> list[str]:
        return [k for k, i in zip(self.keys, self.pixel_index, strict=True) if i is not None]

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader (pin_memory=True) so the copy to the GPU can overlap."""
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


class ShardImages:
    """Map-style dataset over the rows of one shard: (key, jpg bytes, extra columns)."""

    def __init__(
        self, keys: list[str], images: list[bytes | None], extra: dict[str, list] | None = None
    ):
        if len(keys) != len(images):
            raise ValueError("keys and images must have the same length")
        self.keys = keys
        self.images = images
        self.extra = extra or {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        return index


class BatchPreprocessor:
    """Collate function: decode a list of row indices and run the image processor on the batch."""

    def __init__(self, rows: ShardImages, image_processor, max_pixels: int = MAX_IMAGE_PIXELS):
        self.rows = rows
        self.image_processor = image_processor
        self.max_pixels = max_pixels

    def __call__(self, indices: list[int]) -> ImageBatch:
        keys, pixel_index, errors, ok_images = [], [], [], []
        for i in indices:
            decoded = decode_image(self.rows.images[i], self.max_pixels)
            keys.append(self.rows.keys[i])
            if decoded.ok:
                pixel_index.append(len(ok_images))
                errors.append(None)
                ok_images.append(decoded.image)
            else:
                pixel_index.append(None)
                errors.append(decoded.error)
        pixel_values = preprocess(self.image_processor, ok_images) if ok_images else None
        extra = {name: [values[i] for i in indices] for name, values in self.rows.extra.items()}
        return ImageBatch(keys, pixel_values, pixel_index, errors, extra)


def preprocess(image_processor, images: list) -> object:
    """Resize and normalise a list of RGB PIL images into a float32 tensor (N, 3, H, W)."""
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def image_batches(
    rows: ShardImages,
    image_processor,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int = MAX_IMAGE_PIXELS,
    pin_memory: bool = False,
):
    """Iterate over `ImageBatch`es of `rows` in order; decoding runs in `num_workers` processes.

    `pin_memory` (for a CUDA model) page-locks each batch so its copy to the GPU is async.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=BatchPreprocessor(rows, image_processor, max_pixels),
        # Workers prefetch a couple of batches so the accelerator does not wait for JPEG decoding.
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    yield from loader


def image_progress(total: int, description: str, enabled: bool = True):
    """A rich progress bar over images, with the rate in images/s and the time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return _ImageProgress(
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
            transient=False,
        ),
        total,
        description,
    )


class _ImageProgress:
    def __init__(self, progress, total: int, description: str):
        self.progress = progress
        self.task = progress.add_task(description, total=total, rate="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, images: int) -> None:
        self.progress.advance(self.task, images)
        speed = self.progress.tasks[self.task].speed
        self.progress.update(self.task, rate=f"{speed:,.1f}" if speed else "-")
