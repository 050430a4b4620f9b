"""A corpus of hostile image files, generated in code (no binaries in the repository).

Each entry says what capfilt must make of it: decoded (upright RGB, with the size and a colour
check) or an error row.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RED = (220, 30, 30)


@dataclass(frozen=True)
class Hostile:
    """One hostile file: its bytes and what decoding it must give."""

    name: str
    data: bytes
    decodes: bool
    size: tuple[int, int] | None = None  # upright (width, height) when it decodes
    # (x, y, colour) after decoding at the original size: checks orientation and colour handling
    probe: tuple[int, int, tuple[int, int, int]] | None = None


def _save(img, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def _red_left_half(mode_size=(40, 20)):
    """An RGB image whose left half is red and right half white (tells orientation apart)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", mode_size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle((0, 0, mode_size[0] // 2 - 1, mode_size[1] - 1), fill=RED)
    return img


def jpeg(size=(40, 20)) -> bytes:
    return _save(_red_left_half(size), "JPEG", quality=95)


def exif_rotated_jpeg() -> bytes:
    """Stored 40×20 with the red half on the left, EXIF orientation 6 (rotate 90° clockwise):
    upright it is 20×40 with the red half on top."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_red_left_half((40, 20)), "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return _save(_red_left_half().convert("CMYK"), "JPEG", quality=95)


def png16_gray() -> bytes:
    """16-bit greyscale PNG: mid grey (32768 of 65535) must become ~128, not white."""
    from PIL import Image

    img = Image.new("I;16", (24, 24), 32768)
    return _save(img, "PNG")


def png16_rgb() -> bytes:
    """A 48-bit RGB PNG written by hand (PIL cannot write one): all pixels (0xDC00, 0x1E00, …)."""
    width, height = 8, 8
    pixel = struct.pack(">HHH", RED[0] << 8, RED[1] << 8, RED[2] << 8)
    raw = b"".join(b"\x00" + pixel * width for _ in range(height))
    return _png(width, height, bit_depth=16, colour_type=2, idat=zlib.compress(raw))


def png_alpha() -> bytes:
    """RGBA: the left half red and opaque, the right half fully transparent (becomes white)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((0, 0, 19, 19), fill=(*RED, 255))
    return _save(img, "PNG")


def palette_png() -> bytes:
    img = _red_left_half().convert("P", palette=1, colors=4)
    return _save(img, "PNG")


def _animated(fmt: str) -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (30, 30), colour) for colour in (RED, (30, 30, 220), (30, 220, 30))]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def tiny() -> bytes:
    from PIL import Image

    return _save(Image.new("RGB", (1, 1), RED), "PNG")


def _png(width, height, bit_depth, colour_type, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@cache
def decompression_bomb(side: int = 30_000) -> bytes:
    """A side×side 8-bit greyscale PNG of zeros: about 1 MB on disk, side² bytes decoded.

    Built in a fraction of a second: after a full flush deflate forgets its history, so one
    compressed block of rows repeats byte for byte; the checksum of n zero bytes has a closed form.
    """
    rows_per_block = 1000
    assert side % rows_per_block == 0
    block = (b"\x00" * (side + 1)) * rows_per_block  # a filter byte + one byte a pixel per row
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed = raw.compress(block) + raw.flush(zlib.Z_FULL_FLUSH)
    # Adler-32 of n zero bytes: the byte sum stays 1, the running sum of sums is n.
    checksum = ((side * (side + 1)) % 65521) << 16 | 1
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    idat = b"\x78\xda" + compressed * (side // rows_per_block) + end
    idat += struct.pack(">I", checksum)
    return _png(side, side, bit_depth=8, colour_type=0, idat=idat)


@cache
def corpus() -> tuple[Hostile, ...]:
    """Every hostile file but the bomb (which gets its own, memory-measured, tests)."""
    good = jpeg()
    return (
        Hostile("zero_bytes", b"", False),
        Hostile("truncated_jpeg", good[: len(good) // 3], False),
        Hostile("html_as_jpg", b"<!doctype html><html><body>404 Not Found</body></html>", False),
        Hostile("cmyk_jpeg", cmyk_jpeg(), True, (40, 20), (5, 10, RED)),
        Hostile("png16_gray", png16_gray(), True, (24, 24), (5, 5, (128, 128, 128))),
        Hostile("png16_rgb", png16_rgb(), True, (8, 8), (4, 4, RED)),
        Hostile("png_alpha", png_alpha(), True, (40, 20), (30, 10, (255, 255, 255))),
        Hostile("palette_png", palette_png(), True, (40, 20), (5, 10, RED)),
        Hostile("animated_gif", _animated("GIF"), True, (30, 30), (15, 15, RED)),
        Hostile("animated_webp", _animated("WEBP"), True, (30, 30), (15, 15, RED)),
        Hostile("exif_rotated", exif_rotated_jpeg(), True, (20, 40), (10, 5, RED)),
        Hostile("tiny_1x1", tiny(), True, (1, 1), (0, 0, RED)),
    )


def close(colour, expected, tolerance: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(colour, expected, strict=True))


# --- a hostile web server ---------------------------------------------------------------
class _Pages(BaseHTTPRequestHandler):
    """Pages of a hostile web: redirects elsewhere, slow drips, oversized bodies."""

    routes: dict = {}
    requests: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        route = type(self).routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        try:
            route(self)
        except OSError:  # the client hung up (the deadline or the size cap did it)
            pass

    def body(self, data: bytes, length: bool = True):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if length:
            self.send_header("Content-Length", str(len(data)))
        else:
            self.close_connection = True  # the body ends when the connection does
        self.end_headers()
        self.wfile.write(data)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def drip_body(page: _Pages):
    page.send_response(200)
    page.send_header("Content-Length", "1000")
    page.end_headers()
    for _ in range(100):  # a byte every 0.1 s: each read is quick, the whole is not
        page.wfile.write(b"\xff")
        page.wfile.flush()
        time.sleep(0.1)


def drip_headers(page: _Pages):
    page.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(100):
        page.wfile.write(b"z")
        page.wfile.flush()
        time.sleep(0.1)


@contextmanager
def hostile_server(host: str = "127.0.0.2", routes: dict | None = None) -> Iterator[str]:
    handler = type("Pages", (_Pages,), {"routes": dict(routes or {}), "requests": []})
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
