"""A registry of hostile inputs, generated in code (no binaries in the repository).

Seven categories: image files, web captions, URL lists, Parquet shards placed in a dataset,
capfilt.json manifests, data manifests (data_manifests/*.toml) and pipeline files. Each kind
says how it is built, what capfilt must make of it, and the stages it goes through
(`REGISTRY`). The tests of each stage loop over `through(category, stage)` and call
`exercised(...)` with the kinds they checked, so the registry's count of kind × stage pairs
is what the tests did.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conftest import images_schema

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


def _with_segment(jpg: bytes, segment: bytes) -> bytes:
    """`jpg` with one more marker segment right after its SOI marker."""
    return jpg[:2] + segment + jpg[2:]


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def progressive_jpeg() -> bytes:
    return _save(_red_left_half(), "JPEG", quality=95, progressive=True)


def corrupt_exif_jpeg() -> bytes:
    """An EXIF segment whose first IFD claims 65,535 entries in 40 bytes (PIL warns)."""
    ifd = b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\xff" + b"\x13" * 40
    return _with_segment(jpeg(), _app1(b"Exif\x00\x00" + ifd))


def huge_exif_jpeg() -> bytes:
    """EXIF filling most of its 64 KiB segment: a 60,000-character user comment."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x9286] = "x" * 60_000  # UserComment
    exif[0x010E] = "d" * 3_000  # ImageDescription
    return _save(_red_left_half(), "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk_crc_flipped(kind: bytes) -> bytes:
    """A PNG of the red-left image whose `kind` chunk has a wrong CRC."""
    png = _save(_red_left_half(), "PNG")
    at = png.find(kind)
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc = at + 4 + length
    return png[:crc] + bytes(b ^ 0xFF for b in png[crc : crc + 4]) + png[crc + 4 :]


def tiff16_gray() -> bytes:
    from PIL import Image

    return _save(Image.new("I;16", (24, 24), 32768), "TIFF")


def tiff_multipage() -> bytes:
    """Two pages, red then blue: the first page is the image."""
    from PIL import Image

    pages = [Image.new("RGB", (30, 30), colour) for colour in (RED, (30, 30, 220))]
    return _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def icon() -> bytes:
    """An ICO holding 16×16 and 32×32: PIL opens the largest."""
    from PIL import Image

    return _save(Image.new("RGBA", (32, 32), (*RED, 255)), "ICO", sizes=[(16, 16), (32, 32)])


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
    b'<rect width="20" height="20" fill="red"/><script>alert(1)</script></svg>'
)


def gray_jpeg() -> bytes:
    """Greyscale: the left half dark grey (76, the luma of RED), the right half white."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (40, 20), 255)
    ImageDraw.Draw(img).rectangle((0, 0, 19, 19), fill=76)
    return _save(img, "JPEG", quality=95)


def tall_png(height: int = 4000) -> bytes:
    """1 pixel wide and 4,000 high, 102 bytes: resized with keep_ratio to 384 it would be
    384 × 1,536,000 pixels (1.7 GB)."""
    from PIL import Image

    return _save(Image.new("RGB", (1, height), RED), "PNG")


def polyglot_zip() -> bytes:
    """A JPEG that is also a ZIP archive (ZIP reads from the end) holding a path-traversing
    member: only the picture may come of it, never a file."""
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../capfilt-polyglot-escaped.txt", "written outside")
    return jpeg() + archive.getvalue()


def bogus_orientation_jpeg() -> bytes:
    """EXIF orientation 9 (valid values are 1 to 8): left as it is."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 9
    return _save(_red_left_half(), "JPEG", quality=95, exif=exif.tobytes())


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
        Hostile("progressive_jpeg", progressive_jpeg(), True, (40, 20), (5, 10, RED)),
        Hostile("corrupt_exif", corrupt_exif_jpeg(), True, (40, 20), (5, 10, RED)),
        Hostile("huge_exif", huge_exif_jpeg(), True, (40, 20), (5, 10, RED)),
        Hostile("exif_orientation_9", bogus_orientation_jpeg(), True, (40, 20), (5, 10, RED)),
        # PIL checks the CRC of the header chunk, not of the pixel data (as browsers): the
        # same picture comes out of every stage, as all of them decode with PIL.
        Hostile("png_bad_header_crc", _png_chunk_crc_flipped(b"IHDR"), False),
        Hostile("png_bad_data_crc", _png_chunk_crc_flipped(b"IDAT"), True, (40, 20), (5, 10, RED)),
        Hostile("tiff16_gray", tiff16_gray(), True, (24, 24), (5, 5, (128, 128, 128))),
        Hostile("tiff_multipage", tiff_multipage(), True, (30, 30), (15, 15, RED)),
        Hostile("bmp", _save(_red_left_half(), "BMP"), True, (40, 20), (5, 10, RED)),
        Hostile("ico", icon(), True, (32, 32), (16, 16, RED)),
        Hostile("jpeg2000", _save(_red_left_half(), "JPEG2000"), True, (40, 20), (5, 10, RED)),
        Hostile("svg_text", SVG, False),
        Hostile(
            "webp_lossless",
            _save(_red_left_half(), "WEBP", lossless=True),
            True,
            (40, 20),
            (5, 10, RED),
        ),
        Hostile("gray_jpeg", gray_jpeg(), True, (40, 20), (5, 10, (76, 76, 76))),
        Hostile("tall_1x4000", tall_png(), True, (1, 4000), (0, 2000, RED)),
        Hostile(
            "trailing_garbage",
            jpeg() + b"\x00<html>garbage</html>" * 600,
            True,
            (40, 20),
            (5, 10, RED),
        ),
        Hostile("polyglot_zip", polyglot_zip(), True, (40, 20), (5, 10, RED)),
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


# --- web captions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostileCaption:
    """A web caption as raw bytes in a csv field, and the caption images/ must hold."""

    name: str
    raw: bytes
    expected: str | None


LONG_CAPTION = "a red circle on a white background " * 286  # 10,010 characters
HUGE_CAPTION = "a red circle " * 7700  # 100,100 characters
CONTROL_CAPTION = "a\x00b\x01c\x07d\x1b[31me\x7f\x9bf"
RTL_CAPTION = "cat \u202egpj.exe\u202c \u200f\u2067isolate\u2069"
MARKUP_CAPTION = "[red]hi[/red] [link=http://evil]click[/link] :x: [/]"
NEWLINE_CAPTION = "\n" * 50 + "line\r\n" * 20 + "end"
SQL_CAPTION = "'; DROP TABLE images; -- \" OR 1=1"
HTML_CAPTION = '<img src=x onerror="alert(1)"><script>alert(2)</script>&amp;'
CAPTIONS = (
    HostileCaption("caption_empty", b"", None),  # an empty csv field is a missing caption
    HostileCaption("caption_whitespace", b"  \t  ", "  \t  "),
    HostileCaption("caption_latin1", "café au lait".encode("latin-1"), "caf\ufffd au lait"),
    # A UTF-16 surrogate encoded in UTF-8 is invalid UTF-8: each of its 3 bytes becomes U+FFFD.
    HostileCaption(
        "caption_lone_surrogate", b"bad \xed\xa0\x80 here", "bad \ufffd\ufffd\ufffd here"
    ),
    HostileCaption("caption_long", LONG_CAPTION.encode(), LONG_CAPTION),
    HostileCaption("caption_100k", HUGE_CAPTION.encode(), HUGE_CAPTION),
    HostileCaption("caption_emoji", "🐱🐶🎉👍🏽".encode(), "🐱🐶🎉👍🏽"),
    HostileCaption("caption_control", CONTROL_CAPTION.encode(), CONTROL_CAPTION),
    HostileCaption("caption_rtl_override", RTL_CAPTION.encode(), RTL_CAPTION),
    HostileCaption("caption_markup", MARKUP_CAPTION.encode(), MARKUP_CAPTION),
    HostileCaption("caption_newlines", NEWLINE_CAPTION.encode(), NEWLINE_CAPTION),
    HostileCaption("caption_sql", SQL_CAPTION.encode(), SQL_CAPTION),
    HostileCaption("caption_html", HTML_CAPTION.encode(), HTML_CAPTION),
)
INVALID_UTF8_CAPTIONS = 2  # caption_latin1 and caption_lone_surrogate


def caption_csv(rows: list[tuple[str, bytes]], first: str) -> bytes:
    """A csv (as bytes, so a caption may hold any bytes) with columns `first`, caption."""
    lines = [f"{first},caption".encode()]
    for value, caption in rows:
        quoted = b'"' + caption.replace(b'"', b'""') + b'"' if caption else b""
        lines.append(value.encode() + b"," + quoted)
    return b"\n".join(lines) + b"\n"


# --- URL lists ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostileList:
    """A URL list served images by the hostile server at `base` (its paths /0.jpg … /9.jpg and
    LONG_PATH serve a JPEG). `rows`: what each row of the list must become in images/, in list
    order: (the end of its url, status, a part of error_message or None). `refused`: a part of
    the one-line error when the whole list is refused before anything is written."""

    name: str
    suffix: str
    build: Callable[[str], bytes]
    rows: tuple[tuple[str, str, str | None], ...] = ()
    refused: str | None = None
    captions: tuple[str | None, ...] | None = None  # the caption each row must hold


LONG_PATH = "/long-" + "x" * 10_000 + ".jpg"
NOT_HTTP = "only http and https URLs are fetched"
OK = "success"
FAILED = "failed_to_download"


def _lines(*lines: str, end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode()


URL_LISTS = (
    HostileList(
        "list_bom_csv",
        "csv",
        lambda b: b"\xef\xbb\xbf" + _lines("url,caption", f"{b}/0.jpg,a", f"{b}/1.jpg,b"),
        (("/0.jpg", OK, None), ("/1.jpg", OK, None)),
        captions=("a", "b"),
    ),
    HostileList(
        "list_bom_txt",
        "txt",
        lambda b: b"\xef\xbb\xbf" + _lines(f"{b}/0.jpg", f"{b}/1.jpg"),
        (("/0.jpg", OK, None), ("/1.jpg", OK, None)),
    ),
    HostileList(
        "list_bom_jsonl",
        "jsonl",
        lambda b: (
            b"\xef\xbb\xbf"
            + _lines(f'{{"url": "{b}/0.jpg", "caption": "a"}}', f'{{"url": "{b}/1.jpg"}}')
        ),
        (("/0.jpg", OK, None), ("/1.jpg", OK, None)),
        captions=("a", None),
    ),
    HostileList(
        "list_crlf",
        "csv",
        lambda b: _lines("url,caption", f"{b}/0.jpg,a", f'{b}/1.jpg,"b\r\nc"', end="\r\n"),
        (("/0.jpg", OK, None), ("/1.jpg", OK, None)),
        captions=("a", "b\r\nc"),  # a line end inside quotes is the caption's own
    ),
    HostileList(
        "list_nul_bytes",
        "csv",
        lambda b: _lines("url,caption", f"{b}/0.jpg,a\x00b", f"{b}/1.jpg\x00,c"),
        (("/0.jpg", OK, None), ("/1.jpg\x00", FAILED, "control characters")),
        captions=("a\x00b", "c"),
    ),
    HostileList(
        "list_duplicate_urls",
        "csv",
        lambda b: _lines("url,caption", *[f"{b}/0.jpg,same"] * 3, f"{b}/0.jpg,other"),
        (("/0.jpg", OK, None),) * 4,
        captions=("same", "same", "same", "other"),
    ),
    HostileList(
        "list_10k_url",
        "csv",
        lambda b: _lines("url,caption", f"{b}{LONG_PATH},long", f"{b}/1.jpg,short"),
        ((LONG_PATH, OK, None), ("/1.jpg", OK, None)),
    ),
    HostileList(
        "list_relative_urls",
        "csv",
        lambda b: _lines(
            "url,caption", "/0.jpg,a", "images/1.jpg,b", f"//{b.split('//')[1]}/2.jpg,c"
        ),
        (
            ("/0.jpg", FAILED, NOT_HTTP),
            ("images/1.jpg", FAILED, NOT_HTTP),
            ("/2.jpg", FAILED, NOT_HTTP),
        ),
    ),
    HostileList(
        "list_other_schemes",
        "csv",
        lambda b: _lines(
            "url,caption",
            "javascript:alert(document.cookie),a",
            '"data:image/png;base64,iVBORw0KGgo=",b',
            "file:///etc/passwd,c",
            "ftp://127.0.0.1/x.jpg,d",
            f"{b}/3.jpg,e",
        ),
        (
            ("alert(document.cookie)", FAILED, "refused: javascript URL"),
            ("iVBORw0KGgo=", FAILED, "refused: data URL"),
            ("/etc/passwd", FAILED, "refused: file URL"),
            ("/x.jpg", FAILED, "refused: ftp URL"),
            ("/3.jpg", OK, None),
        ),
    ),
    HostileList(
        "list_empty_url",
        "csv",
        lambda b: _lines("url,caption", ",no url", f"{b}/1.jpg,b"),
        (("", FAILED, NOT_HTTP), ("/1.jpg", OK, None)),
    ),
    HostileList(
        "list_no_caption_column",
        "csv",
        lambda b: _lines("url", f"{b}/0.jpg", f"{b}/1.jpg"),
        (("/0.jpg", OK, None), ("/1.jpg", OK, None)),
        captions=(None, None),
    ),
    HostileList(
        "list_reserved_columns",
        "csv",
        lambda b: _lines(
            "url,caption,key,status,error_message,jpg,width,sha256,note",
            f"{b}/0.jpg,a,EVIL,failed,forged,JPG,1,SHA,n0",
            f"{b}/1.jpg,b,EVIL,failed,forged,JPG,1,SHA,n1",
        ),
        (("/0.jpg", OK, None), ("/1.jpg", OK, None)),
        captions=("a", "b"),
    ),
    HostileList(
        "list_non_utf8_header",
        "csv",
        lambda b: "url,caption,légende\n".encode("latin-1") + _lines(f"{b}/0.jpg,a,b"),
        refused="not valid UTF-8",
    ),
    HostileList(
        "list_non_utf8_txt",
        "txt",
        lambda b: _lines(f"{b}/0.jpg") + f"{b}/caf\xe9.jpg\n".encode("latin-1"),
        refused="can't decode",
    ),
    HostileList(
        "list_lone_surrogate_json",
        "json",
        lambda b: f'[{{"url": "{b}/0.jpg", "caption": "bad \\ud800"}}]'.encode(),
        refused="surrogates not allowed",
    ),
    HostileList("list_header_only", "csv", lambda b: _lines("url,caption"), refused="no rows"),
)


# --- Parquet shards placed in a dataset --------------------------------------------------------
def images_row(key, caption="a red circle", status="success", jpg: bytes | None = None) -> dict:
    """One row of img2dataset's images/ schema."""
    return dict(
        key=key,
        url=f"http://example.com/{key}.jpg",
        caption=caption,
        status=status,
        error_message=None,
        width=40,
        height=20,
        original_width=40,
        original_height=20,
        exif="{}",
        sha256=None,
        jpg=jpeg() if jpg is None and status == "success" else jpg,
    )


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=images_schema())


def _two_rows():
    return _table([images_row("000000000"), images_row("000000001", "a blue square")])


def _replaced(table, name: str, values):
    import pyarrow as pa

    return table.set_column(table.schema.get_field_index(name), name, pa.array(values))


def _nested(table):
    import pyarrow as pa

    meta = pa.array([{"tags": ["a", "b"], "box": {"x": 1.5}}, None])
    return table.append_column("meta", meta)


def _large_binary(table):
    import pyarrow as pa

    schema = table.schema.set(
        table.schema.get_field_index("jpg"), pa.field("jpg", pa.large_binary())
    )
    return table.cast(schema)


@dataclass(frozen=True)
class HostileShard:
    """images/00000.parquet of a dataset, as another tool might have written it.

    `bug`: None when capfilt handles it (every stage gives correct output or a one-line error
    naming the file); else why the stages `bug_stages` do not yet (a strict xfail)."""

    name: str
    build: Callable[[], object]  # -> pyarrow.Table
    bug: str | None = None
    bug_stages: tuple[str, ...] = ()


SHARDS = (
    HostileShard("shard_zero_rows", lambda: _table([])),
    HostileShard("shard_jpg_as_string", lambda: _replaced(_two_rows(), "jpg", ["abc", "def"])),
    HostileShard("shard_jpg_large_binary", lambda: _large_binary(_two_rows())),
    HostileShard("shard_nested_column", lambda: _nested(_two_rows())),
    HostileShard(
        "shard_null_keys",
        lambda: _table([images_row(None), images_row("000000001"), images_row(None, "other")]),
    ),
    HostileShard(
        "shard_duplicate_keys",
        lambda: _table([images_row("000000001"), images_row("000000001", "a blue square")]),
    ),
    HostileShard(
        "shard_status_int",
        lambda: _replaced(_two_rows(), "status", [1, 1]),
    ),
    HostileShard(
        "shard_key_int",
        lambda: _replaced(_two_rows(), "key", [1, 2]),
    ),
    HostileShard(
        "shard_caption_int",
        lambda: _replaced(_two_rows(), "caption", [1, 2]),
    ),
    HostileShard(
        "shard_minimal_columns",
        lambda: _two_rows().select(["key", "url", "caption", "status", "error_message", "jpg"]),
    ),
)


# --- capfilt.json ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostileManifest:
    name: str
    data: bytes
    message: str  # a part of the one-line error


MANIFESTS = (
    HostileManifest(
        "manifest_truncated", b'{"format": 1, "runs": [{"stage": "fe', "not valid JSON"
    ),
    HostileManifest("manifest_json_array", b'[{"format": 1, "runs": []}]', "JSON object"),
    HostileManifest("manifest_runs_string", b'{"format": 1, "runs": "fetch"}', "'runs' must be"),
    HostileManifest(
        "manifest_source_list", b'{"format": 1, "runs": [], "source": [1]}', "'source'"
    ),
)


# --- data manifests (data_manifests/*.toml) ----------------------------------------------------
@dataclass(frozen=True)
class HostileDataManifest:
    name: str
    text: str
    message: str  # a part of the one-line error of `capfilt fetch --manifest`


DATA_MANIFESTS = (
    HostileDataManifest("data_manifest_not_toml", "[fetch\nimage_size = 3", "cannot read"),
    HostileDataManifest("data_manifest_fetch_string", 'fetch = "fast"\n', "no [fetch] table"),
    HostileDataManifest(
        "data_manifest_wrong_type", '[fetch]\nimage_size = "big"\n', "must be a whole number"
    ),
    HostileDataManifest(
        "data_manifest_negative_size", "[fetch]\nimage_size = -5\n", "at least 1, got -5"
    ),
    HostileDataManifest("data_manifest_nan_deadline", "[fetch]\nimage_deadline = nan\n", "nan"),
    HostileDataManifest(
        "data_manifest_shell_choice", '[fetch]\nresize_mode = "no; rm -rf ~"\n', "must be one of"
    ),
    HostileDataManifest(
        "data_manifest_shell_url_col", '[fetch]\nurl_col = "url; rm -rf ~"\n', "has no column"
    ),
    HostileDataManifest(
        "data_manifest_source_string", 'source = "cc3m"\n[fetch]\n', "[source] must be a table"
    ),
    HostileDataManifest(
        "data_manifest_nested_deeply", "a = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"
    ),
)


# --- pipeline files ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HostilePipeline:
    """A pipeline file (`text` with {dataset} and {marker} filled by the test: an existing
    dataset and a file no stage may create). `message`: a part of the one-line error; at
    load (`at_load`: before any stage runs, naming the file) or when the stage comes. None:
    the pipeline runs and one of its stages fails on its own."""

    name: str
    text: str
    message: str | None
    at_load: bool = True
    bug: str | None = None


_STATUS = '[pipeline]\ndataset = "{dataset}"\n[[stage]]\ncommand = "status"\n'
PIPELINES = (
    HostilePipeline("pipeline_invalid_toml", "[[stage]\ncommand = ", "is not valid TOML"),
    HostilePipeline("pipeline_not_utf8", "[[stage]]\ncommand = '\udcff'\n", "is not valid TOML"),
    HostilePipeline(
        "pipeline_unknown_command",
        _STATUS + '[[stage]]\ncommand = "rm"\nargs = ["-rf", "{marker}"]\n',
        "stage 2 (rm)",
    ),
    HostilePipeline(
        "pipeline_unknown_option",
        _STATUS + '[[stage]]\ncommand = "status"\nexec = "touch {marker}"\n',
        "--exec",
        at_load=False,
    ),
    HostilePipeline(
        "pipeline_bad_option_value",
        _STATUS + '[[stage]]\ncommand = "query"\nargs = ["{{dataset}}", "select 1"]\n'
        'format = "csv; touch {marker}"\n',
        "--format",
        at_load=False,
    ),
    HostilePipeline(
        "pipeline_shell_injection",
        '[pipeline]\ndataset = "{dataset}"\nevil = "placeholder"\n'
        '[[stage]]\ncommand = "query"\nformat = "csv"\nargs = ["{{dataset}}", '
        "\"select '$(touch {marker})' as a, '`touch {marker}`' as b, '{{evil}}' as c\"]\n"
        '[[stage]]\ncommand = "status"\nargs = ["{{dataset}}; touch {marker}"]\n',
        None,
    ),
    HostilePipeline(
        "pipeline_unknown_variable",
        '[[stage]]\ncommand = "status"\nargs = ["{{nowhere}}"]\n',
        "uses {nowhere}",
    ),
    HostilePipeline(
        "pipeline_variable_recursion",
        '[pipeline]\na = "{{b}}"\nb = "{{a}}"\n[[stage]]\ncommand = "status"\nargs = ["{{a}}"]\n',
        None,
    ),
    HostilePipeline(
        "pipeline_format_attribute",
        '[pipeline]\ndataset = "{dataset}"\n[[stage]]\ncommand = "status"\n'
        'args = ["{{dataset.__class__.__mro__}}"]\n',
        "{dataset.__class__.__mro__}",
    ),
    HostilePipeline(
        "pipeline_format_index", '[[stage]]\ncommand = "status"\nargs = ["{{0}}"]\n', "{0}"
    ),
    HostilePipeline(
        "pipeline_unbalanced_brace",
        '[pipeline]\ndataset = "{dataset}"\n[[stage]]\ncommand = "status"\nargs = ["{{dataset"]\n',
        "brace",
    ),
    HostilePipeline("pipeline_stage_not_table", "stage = [1, 2]\n", "stage 1"),
)


# --- the registry ------------------------------------------------------------------------------
IMAGE_STAGES = (
    "decode",
    "resize",
    "fetch",
    "ingest",
    "caption",
    "filter",
    "query",
    "report",
    "export-data",
)
STAGES_OF = {
    "image": IMAGE_STAGES,
    "caption": ("fetch", "ingest", "filter", "query", "report", "export-data"),
    "url_list": ("fetch",),
    "shard": ("caption", "filter", "query", "report", "status", "export-data"),
    "manifest": ("status", "fetch", "run", "caption", "filter", "export-data"),
    "data_manifest": ("fetch --manifest",),
    "pipeline": ("run --dry-run", "run"),
}


@dataclass(frozen=True)
class Kind:
    """One hostile kind: its category, the stages it goes through, what must come of it."""

    name: str
    category: str
    stages: tuple[str, ...]
    expect: str
    bugs: tuple[tuple[str, str], ...] = ()  # (stage, known bug): that test is a strict xfail

    @property
    def bug_stages(self) -> set[str]:
        return {stage for stage, _ in self.bugs}


def _image_expectation(entry: Hostile) -> str:
    if entry.decodes:
        return f"upright 8-bit RGB {entry.size[0]}x{entry.size[1]} in every stage"
    return "an error row (status and error_message) in every stage"


# (stage, bug, the image kinds it shows with): none known
IMAGE_BUGS: tuple = ()


@cache
def registry() -> tuple[Kind, ...]:
    kinds = [
        Kind(
            e.name,
            "image",
            STAGES_OF["image"],
            _image_expectation(e),
            tuple((stage, bug) for stage, bug, names in IMAGE_BUGS if e.name in names),
        )
        for e in corpus()
    ]
    kinds.append(
        Kind(
            "decompression_bomb",
            "image",
            STAGES_OF["image"],
            "refused from its header ('image too large') with bounded memory",
        )
    )
    kinds += [
        Kind(
            c.name,
            "caption",
            STAGES_OF["caption"],
            f"kept as {c.expected!r:.40}, scored or an error",
        )
        for c in CAPTIONS
    ]
    for listed in URL_LISTS:
        expect = (
            f"refused in one line ({listed.refused}) before anything is written"
            if listed.refused
            else f"{len(listed.rows)} rows of images/, each with its status"
        )
        kinds.append(Kind(listed.name, "url_list", STAGES_OF["url_list"], expect))
    kinds += [
        Kind(
            s.name,
            "shard",
            STAGES_OF["shard"],
            "correct output (rows once) or a one-line error naming the file",
            tuple((stage, s.bug) for stage in s.bug_stages),
        )
        for s in SHARDS
    ]
    kinds += [
        Kind(
            m.name,
            "manifest",
            STAGES_OF["manifest"],
            f"a one-line error ({m.message}) naming capfilt.json, before anything is written",
        )
        for m in MANIFESTS
    ]
    kinds += [
        Kind(d.name, "data_manifest", STAGES_OF["data_manifest"], f"one-line error: {d.message}")
        for d in DATA_MANIFESTS
    ]
    kinds += [
        Kind(
            p.name,
            "pipeline",
            STAGES_OF["pipeline"],
            f"one-line error: {p.message}" if p.message else "runs its stages literally, no shell",
            (("run", p.bug),) if p.bug else (),
        )
        for p in PIPELINES
    ]
    names = [k.name for k in kinds]
    assert len(names) == len(set(names)), "kind names must be unique"
    assert all(k.bug_stages <= set(k.stages) for k in kinds)
    return tuple(kinds)


def through(category: str, stage: str) -> tuple[Kind, ...]:
    """The kinds of `category` that go through `stage`."""
    return tuple(k for k in registry() if k.category == category and stage in k.stages)


def names_through(category: str, stage: str) -> set[str]:
    return {k.name for k in through(category, stage)}


def exercised(category: str, stage: str, names) -> None:
    """A test of `stage` checked exactly the registry's kinds of `category` through it."""
    assert set(names) == names_through(category, stage), (category, stage)
