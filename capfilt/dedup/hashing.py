"""What dedup knows of each image, computed once per image (hashes/ shards).

- `sha256`: of the image bytes — the same file, byte for byte;
- `pixel_sha256`: of the decoded pixels (upright 8-bit RGB, as the models see them, with the
  size) — the same picture in another file: re-saved PNG, stripped EXIF, another container;
- `phash`: imagehash's 64-bit perceptual hash (DCT of the 32 × 32 grey image, low 8 × 8
  frequencies against their median; first bit the highest), as a signed int64 —
  re-encoded, resized, lightly edited copies stay within a few bits of each other;
- `pixel_std`: the spread of grey levels of that 32 × 32 image: near 0 for a blank or flat
  placeholder;
- `mean_color`: the mean colour, 0xRRGGBB: pHash sees grey levels only, so the same shape in
  another colour (a product photographed in red and in blue) has the same pHash; a
  perceptual match must also have nearly the same mean colour;
- `domain`: where the URL points (for placeholders: one image behind many sites).

Decoding is most of the cost; `HashPool` spreads it over worker processes
(`python -m capfilt.dedup.bench --images N` measures both).
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from capfilt.core.distributed import available_cores
from capfilt.images.decode import decode_image

# What the hashes are; a change here makes every hashes/ shard stale (its provenance option).
HASH_VERSION = "sha256 bytes, sha256 RGB pixels, imagehash phash 8x8, grey std, mean colour (1)"
PHASH_SIDE = 32  # imagehash.phash: hash_size 8 × highfreq_factor 4
_CHUNK = 32  # images a worker hashes per task


def hash_image(data: bytes | None) -> dict:
    """The hashes of one image's bytes (see the module docstring); `error` when it cannot be
    decoded (then only `sha256` is set, or nothing without bytes)."""
    row = dict(
        sha256=None,
        pixel_sha256=None,
        phash=None,
        width=None,
        height=None,
        pixel_std=None,
        mean_color=None,
        error=None,
    )
    if not data:
        row["error"] = "no image bytes"
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    decoded = decode_image(data)
    if not decoded.ok:
        row["error"] = decoded.error
        return row
    image = decoded.image
    width, height = image.size
    pixels = hashlib.sha256(f"RGB {width} {height}\n".encode())
    pixels.update(image.tobytes())
    thumbnail = small_thumbnail(image)
    grey = thumbnail.convert("L")
    row.update(
        pixel_sha256=pixels.hexdigest(),
        phash=phash_of_grey(grey),
        width=width,
        height=height,
        pixel_std=float(_std(grey)),
        mean_color=_mean_color(thumbnail),
    )
    return row


def hash_images(images: list[bytes | None]) -> list[dict]:
    """`hash_image` of each; what a worker process runs on one chunk of a shard."""
    return [hash_image(data) for data in images]


def small_thumbnail(image):
    """The 32 × 32 image whose grey levels imagehash's pHash reads, resized with its filter
    (Lanczos) after a box reduction to at most twice that size (reducing_gap 2): 3–4 times
    cheaper than the direct resize, grey levels within a few of it."""
    from PIL import Image

    return image.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)


def phash_of_grey(grey) -> int:
    """imagehash.phash of a 32 × 32 grey image, as a signed 64-bit integer (first bit high)."""
    import imagehash
    import numpy as np

    bits = imagehash.phash(grey).hash.ravel()  # 64 booleans, the first the highest bit
    return to_signed64(int.from_bytes(np.packbits(bits).tobytes(), "big"))


def to_signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _mean_color(thumbnail) -> int:
    import numpy as np

    red, green, blue = np.asarray(thumbnail, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return (round(red) << 16) | (round(green) << 8) | round(blue)


def _std(grey) -> float:
    import numpy as np

    return np.asarray(grey, dtype=np.float32).std()


def url_domain(url: str | None) -> str | None:
    """The site an image URL points to, for counting distinct sites: the host without `www.`,
    cut to its last two labels (three under a two-letter country code's second level:
    `example.co.uk`). None for a local path or a URL without a host."""
    if not url or "://" not in url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    host = host.lower().rstrip(".")
    labels = host.split(".")
    if all(label.isdigit() for label in labels) or ":" in host:
        return host  # an IP address is its own site
    keep = 2
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        keep = 3  # co.uk, com.au, ac.jp ...
    return ".".join(labels[-keep:])


class HashPool:
    """Hashes images in worker processes (0 workers: in this process), in order."""

    def __init__(self, workers: int | None = None):
        self.workers = available_cores() if workers is None else workers
        self._executor = None

    def __enter__(self) -> HashPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hash(self, images: list, on_done=None) -> list[dict]:
        """`hash_image` of each of `images` (bytes or None); `on_done(n)` as chunks finish."""
        chunks = [images[i : i + _CHUNK] for i in range(0, len(images), _CHUNK)]
        if self.workers <= 1 or len(chunks) <= 1:
            done = (hash_images(chunk) for chunk in chunks)
        else:
            done = self._pool().map(hash_images, chunks)
        rows = []
        for part in done:
            rows += part
            if on_done is not None:
                on_done(len(part))
        return rows

    def _pool(self):
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the workers import PIL and imagehash only, whatever this process holds.
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
