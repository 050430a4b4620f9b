"""Image decoding and batching for every stage.

JPEG bytes from an images/ shard become RGB PIL images (errors are values, not exceptions),
then batches of `pixel_values` through the checkpoint's own image processor. A torch
DataLoader runs decoding and preprocessing, in worker processes when asked."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from capfilt.core.ahead import ordered_map
from capfilt.core.distributed import available_cores
from capfilt.images.decode import MAX_IMAGE_PIXELS, decode_image
from capfilt.images.device import jpeg_for_device
from capfilt.images.pixels import (
    can_defer_normalization,
    normalize_pixels,
    preprocess,
    processor_size,
    resize_pixels,
)

# Threads decoding ahead of the model when there are no worker processes (`image_batches`).
DECODE_THREADS = 2


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
    normalized: bool = True  # False: uint8 resized pixels that `normalize_pixels` finishes
    # --gpu-decode: (pixel row, JPEG bytes) left for the device, and the pixel rows that
    # `pixel_values` holds (device_decode.finish_on_device puts them together).
    deferred: list[tuple[int, bytes]] = field(default_factory=list)
    cpu_rows: list[int] = field(default_factory=list)
    # The same decoded images through each extra image processor (a CLIP or SigLIP scorer's):
    # name → float32 (N_ok, 3, H', W'), rows as `pixel_values`'.
    more_pixels: dict[str, object] = field(default_factory=dict)

    @property
    def ok_keys(self) -> list[str]:
        return [k for k, i in zip(self.keys, self.pixel_index, strict=True) if i is not None]

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: list[ImageBatch], device=None) -> ImageBatch:
        """One batch from consecutive chunks; pixel values end up on `device` when given."""
        import torch

        if len(parts) == 1 and device is None:
            return parts[0]
        keys, pixel_index, errors, pixels = [], [], [], []
        extra: dict[str, list] = {name: [] for name in parts[0].extra}
        more: dict[str, list] = {name: [] for name in parts[0].more_pixels}
        decoded = 0
        for part in parts:
            keys += part.keys
            errors += part.errors
            pixel_index += [None if i is None else decoded + i for i in part.pixel_index]
            for name, values in part.extra.items():
                extra[name] += values
            if isinstance(part.pixel_values, list):  # decoded images (a VLM's processor)
                pixels.append(part.pixel_values)
                decoded += len(part.pixel_values)
            elif part.pixel_values is not None:
                values = part.pixel_values
                if device is not None:
                    values = values.to(device, non_blocking=True)
                pixels.append(values)
                decoded += values.shape[0]
            for name, values in part.more_pixels.items():
                more[name].append(
                    values if device is None else values.to(device, non_blocking=True)
                )
        pixel_values = None
        if pixels and isinstance(pixels[0], list):
            pixel_values = [image for images in pixels for image in images]
        elif pixels:
            pixel_values = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
        normalized = all(part.normalized for part in parts)
        batch = ImageBatch(keys, pixel_values, pixel_index, errors, extra, normalized)
        batch.more_pixels = {name: torch.cat(values) for name, values in more.items() if values}
        return batch

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader (pin_memory=True) so the copy to the GPU can overlap."""
        if self.pixel_values is not None and not isinstance(self.pixel_values, list):
            self.pixel_values = self.pixel_values.pin_memory()
        self.more_pixels = {name: v.pin_memory() for name, v in self.more_pixels.items()}
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
    """Collate function: decode a list of row indices and run the image processor on the batch.

    `fast_decode`: JPEGs are decoded straight at a reduced scale no smaller than the model's
    input (`decode_image`'s `draft_size`); approximate, off by default. `more_processors`
    (name → image processor): each decoded image also goes through these, into the batch's
    `more_pixels` (decoded once for every model; such batches are decoded on the CPU).
    """

    def __init__(
        self,
        rows: ShardImages,
        image_processor,
        max_pixels: int = MAX_IMAGE_PIXELS,
        fast_decode: bool = False,
        resize_only: bool = False,
        device_decode: bool = False,
        more_processors: dict | None = None,
    ):
        self.rows = rows
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.more_processors = more_processors or {}
        # A reduced-scale decode must still be large enough for every model's input.
        sizes = [processor_size(p) for p in [image_processor, *self.more_processors.values()]]
        self.draft_size = _largest(sizes) if fast_decode else None
        # Resized 8-bit pixels (a quarter of the bytes of float32 to pass between processes
        # and copy to the GPU), normalised later by `normalize_pixels` (ImageBatch.normalized).
        self.resize_only = resize_only and can_defer_normalization(image_processor)
        # Plain JPEGs are only checked here and decoded on the model's device (--gpu-decode).
        self.device_decode = device_decode and self.resize_only

    def __call__(self, indices: list[int]) -> ImageBatch:
        keys, pixel_index, errors, ok_images = [], [], [], []
        deferred, cpu_rows = [], []
        for i in indices:
            data = self.rows.images[i]
            keys.append(self.rows.keys[i])
            row = len(ok_images) + len(deferred)
            if self.device_decode and jpeg_for_device(data, self.max_pixels):
                pixel_index.append(row)
                errors.append(None)
                deferred.append((row, data))
                continue
            decoded = decode_image(data, self.max_pixels, self.draft_size)
            if decoded.ok:
                pixel_index.append(row)
                errors.append(None)
                ok_images.append(decoded.image)
                cpu_rows.append(row)
            else:
                pixel_index.append(None)
                errors.append(decoded.error)
        pixel_values = None
        if ok_images:
            if self.resize_only:
                pixel_values = resize_pixels(self.image_processor, ok_images)
            else:
                pixel_values = preprocess(self.image_processor, ok_images)
        extra = {name: [values[i] for i in indices] for name, values in self.rows.extra.items()}
        batch = ImageBatch(keys, pixel_values, pixel_index, errors, extra)
        batch.normalized = not self.resize_only
        batch.deferred, batch.cpu_rows = deferred, cpu_rows
        if ok_images:
            batch.more_pixels = {
                name: preprocess(processor, ok_images)
                for name, processor in self.more_processors.items()
            }
        return batch


def _largest(sizes: list[tuple[int, int] | None]) -> tuple[int, int] | None:
    """The (width, height) no smaller than any of `sizes`; None when one has no fixed size."""
    if not sizes or any(size is None for size in sizes):
        return None
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def image_batches(
    rows: ShardImages,
    image_processor,
    batch_size: int,
    num_workers: int = 0,
    max_pixels: int = MAX_IMAGE_PIXELS,
    device=None,
    fast_decode: bool = False,
    decode_threads: int | None = DECODE_THREADS,
    device_decode: bool = False,
    more_processors: dict | None = None,
    split_batches: bool | None = None,
):
    """Iterate over `ImageBatch`es of `rows` in order, decoded ahead of the caller.

    `num_workers` > 0: a DataLoader decodes in that many processes. For a GPU (or
    `split_batches`) each batch as `num_workers` chunks in parallel (a whole batch per worker
    would leave the model waiting for one process to decode it), as 8-bit pixels normalised on
    `device`, put together again there (each chunk's copy starts as it arrives); for the CPU
    each worker makes whole, normalised batches (no copy in this process). 0: `decode_threads`
    threads of this process decode the next batches while the caller runs the model (PIL
    decodes and resizes without the GIL; no process start-up or pickling per shard). For a CUDA
    `device` each batch or chunk is page-locked so its copy to the GPU is async.
    `decode_threads` None: the first batch is decoded inline and the threads of the rest chosen
    by `decode_ahead` (the caller must use each batch before it asks for the next, as the time
    between is the model's). `device_decode` (--gpu-decode): plain JPEGs are decoded and
    resized on `device` (capfilt/device_decode.py); not with `more_processors`.
    `more_processors` (name → image processor): each batch also carries the same decoded
    images through these (`ImageBatch.more_pixels`), for other models' vision encoders.
    """
    import torch

    pin_memory = device is not None and torch.device(device).type == "cuda"
    device_decode = device_decode and not more_processors  # they need the PIL image
    if device_decode:
        from capfilt.images.device import check_device_decode

        check_device_decode(image_processor)
    if num_workers == 0 and not device_decode:
        collate = BatchPreprocessor(
            rows,
            image_processor,
            max_pixels,
            fast_decode=fast_decode,
            more_processors=more_processors,
        )
        index_batches = (
            list(range(start, min(len(rows), start + batch_size)))
            for start in range(0, len(rows), batch_size)
        )

        def prepare(indices):
            batch = collate(indices)
            return batch.pin_memory() if pin_memory else batch

        if decode_threads is None:  # measured on the first batch (`CpuShare`, on a CPU)
            first = next(index_batches, None)
            if first is None:
                return
            started = time.perf_counter()
            batch = prepare(first)
            decoding = time.perf_counter() - started
            yield batch
            decode_threads = decode_ahead(decoding, time.perf_counter() - started - decoding)
        yield from ordered_map(prepare, index_batches, decode_threads)
        return

    from torch.utils.data import DataLoader

    batches = [
        list(range(s, min(len(rows), s + batch_size))) for s in range(0, len(rows), batch_size)
    ]
    # For a GPU each batch is split among the workers, so the model waits for no one process;
    # for the CPU a worker makes whole batches (putting float32 chunks together is a copy).
    split = pin_memory if split_batches is None else split_batches
    parts = max(1, min(num_workers, batch_size // MIN_CHUNK)) if split else 1
    chunks, chunks_per_batch = [], []
    for indices in batches:
        size = -(-len(indices) // parts)  # ceil
        pieces = [indices[i : i + size] for i in range(0, len(indices), size)]
        chunks.extend(pieces)
        chunks_per_batch.append(len(pieces))
    loader = DataLoader(
        rows,
        batch_sampler=chunks,
        num_workers=num_workers,
        collate_fn=BatchPreprocessor(
            rows,
            image_processor,
            max_pixels,
            fast_decode=fast_decode,
            # For a GPU, 8-bit pixels (a quarter of float32's bytes through shared memory and
            # to the device), normalised there in place; for the CPU the workers normalise,
            # which in the main process cost 1.2 ms an image at 384 px.
            resize_only=pin_memory or device_decode,
            device_decode=device_decode,
            more_processors=more_processors,
        ),
        # Workers prefetch a couple of chunks each so the model does not wait for decoding.
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    decoded = iter(loader)

    def finished(chunk: ImageBatch) -> ImageBatch:
        if not chunk.deferred:
            return chunk
        from capfilt.images.device import finish_on_device

        return finish_on_device(chunk, image_processor, device or "cpu", _decode_to_tensor)

    for count in chunks_per_batch:
        batch = ImageBatch.concat([finished(next(decoded)) for _ in range(count)], device)
        if not batch.normalized:
            if batch.pixel_values is not None:
                batch.pixel_values = normalize_pixels(image_processor, batch.pixel_values)
            batch.normalized = True
        yield batch


def _decode_to_tensor(data: bytes):
    """(uint8 (3, H, W) tensor, None) of an image decoded by PIL, or (None, error)."""
    import numpy as np
    import torch

    decoded = decode_image(data)
    if not decoded.ok:
        return None, decoded.error
    return torch.from_numpy(np.array(decoded.image)).permute(2, 0, 1), None


# A worker decodes at least this many images at a time (fewer chunks for small batches).
MIN_CHUNK = 16


def resolve_workers(num_workers: int | None, device) -> int:
    """Decoding processes: as asked; by default 0 (threads) on the CPU and on a GPU most of
    this process's share of the CPU cores (at least 2, at most 16).

    On the CPU the model and the decoding share the same cores: worker processes cost their
    start-up and the copies of every batch, and measured slower than threads (README, bench).
    On a GPU decoding is the bottleneck: on an H200 with 16 cores one process decoded and
    resized 393 images/s and 14 workers 853 images/s (README).
    """
    if num_workers is not None:
        return num_workers
    if device.type != "cuda":
        return 0
    import os

    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by accelerate/torchrun
    return max(2, min(16, available_cores() // max(1, processes) - 2))


@dataclass(frozen=True)
class CpuShare:
    """How a caption or filter stage splits this process's cores on a CPU: `decode` threads
    decode JPEGs ahead of the model while torch computes with `torch` threads; `decode` None:
    decided by measuring the first batch (`decode_ahead`)."""

    torch: int
    decode: int | None


def cpu_share(device, num_workers: int | None, threads: int | None) -> CpuShare | None:
    """On a CPU, the cores the model gets and the threads that decode (None on a GPU).

    Decoding threads and torch's threads fight for the cores when both want all of them (a
    small BLIP captioned at 0.72x the plain recipe end to end on two cores so). By default the
    first batch is decoded inline and timed, then `decode_ahead` decides. With worker processes
    torch keeps the cores they leave; `threads` (--threads) sets torch's share, with one
    decoding thread beside it.
    """
    if device.type != "cpu":
        return None
    cores = available_cores()
    if num_workers:
        return CpuShare(torch=threads or max(1, cores - num_workers), decode=0)
    if threads:
        return CpuShare(torch=threads, decode=_decoding_threads(cores))
    return CpuShare(torch=cores, decode=None)


def _decoding_threads(cores: int) -> int:
    return 1 if cores < 8 else 2


# Decoding inline is the faster plan while it costs less than this fraction of the model's time
# (the model then has every core): measured on two cores (README, speed), a caption batch took
# decoding 0.27 of the model's time and ran 1.2-1.5x faster inline, a filter batch of the tiny
# model 2 and ran 1.4x faster with a decoding thread beside one torch thread.
INLINE_DECODING = 0.5


def decode_ahead(decoding: float, model: float) -> int:
    """The decoding threads for the rest of a shard, from the first batch's seconds of
    decoding and of the model (which had every core): 0 (inline, torch keeps every core) when
    decoding is cheap beside the model, else threads that decode ahead, torch getting the
    other cores."""
    import torch

    if decoding < INLINE_DECODING * model:
        return 0
    cores = available_cores()
    threads = _decoding_threads(cores)
    torch.set_num_threads(max(1, cores - threads))
    return threads


@contextlib.contextmanager
def sharing_cores(share: CpuShare | None):
    """torch computes with `share.torch` threads inside the block (then as before)."""
    if share is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(share.torch)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stage_batches(
    rows: ShardImages,
    model,
    config,
    share: CpuShare | None = None,
    more_processors: dict | None = None,
):
    """`image_batches` for a caption or filter stage: the model's image processor and device,
    the config's batch size, decoding workers and decoding options; `more_processors`: the
    image processors of other models fed from the same decoded images (filter's CLIP/SigLIP)."""
    if share is None:
        share = cpu_share(model.device, config.num_workers, config.threads)
    return image_batches(
        rows,
        model.image_processor,
        config.batch_size,
        resolve_workers(config.num_workers, model.device),
        device=model.device,
        fast_decode=config.fast_decode,
        decode_threads=share.decode if share else DECODE_THREADS,  # None: measured
        device_decode=config.gpu_decode,
        more_processors=more_processors,
    )
