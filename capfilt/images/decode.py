"""Image bytes to upright RGB PIL images; failures are values, not exceptions."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

_EXIF_ORIENTATION = 0x0112
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


def decode_image(
    data: bytes | None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode image bytes to an upright RGB PIL image; failures come back as `error`.

    `draft_size` (width, height): let the JPEG decoder scale the image down by 1/2, 1/4 or 1/8
    in the DCT domain, as far as it stays at least that size on both sides. Much cheaper than
    a full decode, but the pixels differ slightly from a full decode resized (so it is opt-in:
    `--fast-decode`). Other formats ignore it.
    """
    from PIL import Image

    if not data:
        return DecodedImage(None, "no image bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with _open_image(data, max_pixels) as img:
            if draft_size is not None and img.format == "JPEG":
                # Either side may end up as the width once EXIF orientation turns the image.
                side = max(draft_size)
                img.draft("RGB", (side, side))
            return DecodedImage(upright_rgb(img))
    except _ImageRefused as e:
        return DecodedImage(None, str(e))
    except Exception as e:  # noqa: BLE001 - any decoder failure is this row's error, not the run's
        return DecodedImage(None, _decode_error(e))


def prepare_for_resize(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Bytes that OpenCV (img2dataset's resizer) decodes to the right upright RGB picture.

    OpenCV ignores EXIF orientation, turns 16-bit images white when it writes them as JPEG,
    and decodes an image of any size: so the size is checked from the header first (a
    decompression bomb is refused before a pixel is decoded), a plain RGB or greyscale JPEG
    passes through untouched (the common case, no extra cost), and anything else is decoded by
    PIL (first frame, upright, alpha on white, 8-bit RGB) and handed on as an uncompressed BMP.
    Returns (bytes, None) or (None, the reason it cannot be used).
    """
    if not data:
        return None, "no image bytes"
    try:
        with _open_image(data, max_pixels) as img:
            orientation = img.getexif().get(_EXIF_ORIENTATION) if img.format == "JPEG" else None
            if img.format == "JPEG" and img.mode in ("RGB", "L") and orientation in (None, 1):
                return data, None
            out = io.BytesIO()
            upright_rgb(img).save(out, "BMP")
            return out.getvalue(), None
    except _ImageRefused as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is this row's error
        return None, _decode_error(e)


def image_size(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """(width, height) from an image's header, quietly; None when it cannot be read."""
    try:
        with _open_image(data, max_pixels) as img:
            return img.size
    except Exception:  # noqa: BLE001 - unreadable: the caller's decoder says why
        return None


class _ImageRefused(Exception):
    """An image capfilt will not decode (too many pixels)."""


@contextlib.contextmanager
def _open_image(data: bytes, max_pixels: int):
    """PIL's lazy open (header only), refusing images above `max_pixels` before decoding.

    The image reads from the bytes in memory, so nothing needs closing: it is not closed on
    the way out (closing would free the pixels of an image decoded inside the block).
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice that, and raises above: capfilt's own
            # check below decides, so neither may escape as a warning or a traceback.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _quiet_about_damage()
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _ImageRefused(f"image too large: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise _ImageRefused(
            f"image too large: {width}x{height} pixels is more than the limit of "
            f"{max_pixels:,} (a decompression bomb?)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _quiet_about_damage()
        yield img


def _quiet_about_damage() -> None:
    """Inside a catch_warnings block: PIL's warnings about a damaged file ("Corrupt EXIF
    data", found by the hostile corpus) do not reach the screen; what can be decoded is, and
    what cannot is the row's error."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def _decode_error(e: Exception) -> str:
    from PIL import Image

    if isinstance(e, Image.UnidentifiedImageError):
        return "cannot decode image: not an image format PIL recognises"
    return f"cannot decode image: {type(e).__name__}: {e}"


def upright_rgb(img):
    """The first frame of a PIL image as 8-bit RGB, turned upright by its EXIF orientation.

    Transparency becomes white (web images with alpha are drawn on white pages); 16-bit
    greyscale is scaled to 8 bits rather than clipped, which would turn it white.
    """
    from PIL import Image, ImageOps

    # exif_transpose copies the image even when there is nothing to turn: ask first.
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        levels = np.asarray(img).astype(np.uint32) >> 8
        img = Image.fromarray(levels.clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA", "RGBA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode == "RGB":
        img.load()  # decode now (errors belong to this image), without convert()'s copy
        return img
    rgb = img.convert("RGB")
    rgb.load()
    return rgb
