"""The toy web: synthetic image-text pairs whose true captions are known, served over HTTP.

Each image is a rendered scene (one or two coloured shapes on a light or dark background)
described in a vocabulary of about a dozen words, so a tiny model learns it in minutes on a
CPU. A set fraction of the captions is wrong the way web alt-text is wrong, and the truth is
kept beside the caption (`true_caption`, `caption_is_wrong`, `wrong_kind`) so that every
later stage can be checked against it.

`ToyWebServer` serves a written toy web on 127.0.0.1, plus the broken pages a real crawl
meets (404, a page that is not an image, a truncated JPEG, an opt-out header, a redirect).
"""

from __future__ import annotations

import csv
import http.server
import io
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (235, 205, 30),
}
COLOR_ORDER = {color: i for i, color in enumerate(COLORS)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (25, 25, 25)}

# The ways a web caption is wrong, as BLIP's paper motivates CapFilt.
WRONG_KINDS = ("other_image", "file_name", "boilerplate", "wrong_color", "wrong_shape")
FILE_NAMES = (
    "DSC_{n:04d}.jpg",
    "IMG_{n:04d}.JPG",
    "image_{n}.png",
    "photo-{n}.jpeg",
    "P{n:07d}.jpg",
)
BOILERPLATE = (
    "click here to download",
    "stock photo",
    "image may contain: text",
    "no description available",
    "thumbnail",
    "free shipping on orders over $50",
)

URL_LIST_COLUMNS = ("url", "caption", "true_caption", "caption_is_wrong", "wrong_kind")
IMAGES_DIR = "images"
URL_LIST = "urls.csv"


@dataclass(frozen=True)
class Scene:
    """What an image shows: (colour, shape) objects, left to right, on a background.

    The caption names the objects in a fixed order (by colour, then shape), not left to
    right: a horizontally flipped image, as training's augmentation makes, keeps its caption.
    """

    objects: tuple[tuple[str, str], ...]
    background: str

    @property
    def caption(self) -> str:
        named = sorted(self.objects, key=lambda obj: (COLOR_ORDER[obj[0]], SHAPES.index(obj[1])))
        things = " and ".join(f"a {color} {shape}" for color, shape in named)
        return f"{things} on a {self.background} background"


@dataclass(frozen=True)
class ToyPair:
    """One image-text pair of the toy web, with the truth beside the web caption."""

    name: str  # file name under images/
    scene: Scene
    caption: str  # the caption the "web" shows (alt-text)
    caption_is_wrong: bool
    wrong_kind: str | None
    jpg: bytes

    @property
    def true_caption(self) -> str:
        return self.scene.caption


def random_scene(rng: random.Random, two_objects_p: float = 0.3) -> Scene:
    n_objects = 2 if rng.random() < two_objects_p else 1
    objects = tuple((rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(n_objects))
    return Scene(objects, rng.choice(list(BACKGROUNDS)))


def render(scene: Scene, size: int, rng: random.Random):
    """A PIL image of `scene`; object size and position jitter so no two images are alike."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    n = len(scene.objects)
    for i, (color, shape) in enumerate(scene.objects):
        # Each object gets its own vertical strip, so two objects never hide each other.
        slot = size / n
        extent = slot * rng.uniform(0.45, 0.7) if n > 1 else size * rng.uniform(0.4, 0.65)
        extent = min(extent, size * 0.65)
        cx = slot * (i + 0.5) + rng.uniform(-0.08, 0.08) * slot
        cy = size / 2 + rng.uniform(-0.12, 0.12) * size
        box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


def jpeg_bytes(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def wrong_caption(kind: str, scene: Scene, other: Scene, rng: random.Random) -> str:
    """A caption of `kind` that does not describe `scene` (`other` is another image's scene)."""
    if kind == "other_image":
        return other.caption
    if kind == "file_name":
        return rng.choice(FILE_NAMES).format(n=rng.randrange(1, 10_000))
    if kind == "boilerplate":
        return rng.choice(BOILERPLATE)
    i = rng.randrange(len(scene.objects))
    color, shape = scene.objects[i]
    if kind == "wrong_color":
        swapped = (rng.choice([c for c in COLORS if c != color]), shape)
    elif kind == "wrong_shape":
        swapped = (color, rng.choice([s for s in SHAPES if s != shape]))
    else:
        raise ValueError(f"unknown wrong caption kind {kind!r}; choose from {WRONG_KINDS}")
    objects = scene.objects[:i] + (swapped,) + scene.objects[i + 1 :]
    return replace(scene, objects=objects).caption


def generate(
    n: int, wrong_fraction: float = 0.3, seed: int = 0, image_size: int = 96
) -> list[ToyPair]:
    """`n` toy pairs; exactly round(n * wrong_fraction) of them carry a wrong caption."""
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be between 0 and 1, got {wrong_fraction}")
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    wrong = set(rng.sample(range(n), round(n * wrong_fraction)))
    pairs = []
    for i, scene in enumerate(scenes):
        kind = None
        caption = scene.caption
        if i in wrong:
            kind = WRONG_KINDS[i % len(WRONG_KINDS)] if n > 1 else rng.choice(WRONG_KINDS[1:])
            other = scenes[(i + 1 + rng.randrange(max(n - 1, 1))) % n]
            caption = wrong_caption(kind, scene, other, rng)
            if caption == scene.caption:  # another image can show the same scene
                kind, caption = "boilerplate", rng.choice(BOILERPLATE)
        img = render(scene, image_size, rng)
        pairs.append(
            ToyPair(f"{i:06d}.jpg", scene, caption, kind is not None, kind, jpeg_bytes(img))
        )
    return pairs


def write_if_changed(path: Path, data: bytes) -> None:
    """Write `data` unless `path` holds it already: a file written again with the same bytes
    would still be newer, and `capfilt ingest` reads a newer file as another source."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    path.write_bytes(data)


def write_images(pairs: list[ToyPair], out_dir: str | os.PathLike) -> Path:
    """Write every pair's JPEG to OUT_DIR/images/ and return that folder."""
    folder = Path(out_dir) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        write_if_changed(folder / pair.name, pair.jpg)
    return folder


def url_rows(pairs: list[ToyPair], base_url: str) -> list[dict]:
    base = base_url.rstrip("/")
    return [
        {
            "url": f"{base}/{IMAGES_DIR}/{p.name}",
            "caption": p.caption,
            "true_caption": p.true_caption,
            "caption_is_wrong": p.caption_is_wrong,
            "wrong_kind": p.wrong_kind,
        }
        for p in pairs
    ]


def write_url_list(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write URL-list rows as CSV (a missing value is an empty field)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(c for row in rows for c in row)) or list(URL_LIST_COLUMNS)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_if_changed(path, text.getvalue().encode("utf-8"))
    return path


def write_toyweb(
    out_dir: str | os.PathLike,
    n: int,
    wrong_fraction: float = 0.3,
    seed: int = 0,
    base_url: str = "http://127.0.0.1:8000",
    image_size: int = 96,
    broken: bool = False,
) -> tuple[list[ToyPair], Path]:
    """Write OUT_DIR/images/*.jpg and OUT_DIR/urls.csv; return the pairs and the list's path.

    With `broken`, the list also names the broken pages that `ToyWebServer` serves.
    """
    pairs = generate(n, wrong_fraction, seed, image_size)
    write_images(pairs, out_dir)
    rows = url_rows(pairs, base_url)
    if broken:
        rows += broken_rows(base_url)
    return pairs, write_url_list(rows, Path(out_dir) / URL_LIST)


# --- the server ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokenPage:
    """A page of the toy web that a download must record as a failure (or follow)."""

    path: str
    status: str  # the `status` img2dataset gives the row
    error: str | None  # a substring of its `error_message`


BROKEN_PAGES = {
    "missing": BrokenPage("/broken/missing.jpg", "failed_to_download", "404"),
    "not_an_image": BrokenPage("/broken/not-an-image.jpg", "failed_to_resize", "decod"),
    "truncated": BrokenPage("/broken/truncated.jpg", "failed_to_resize", "decod"),
    "opt_out": BrokenPage("/broken/opt-out.jpg", "failed_to_download", "X-Robots-Tag"),
    "redirect": BrokenPage("/broken/redirect.jpg", "success", None),
}


def broken_rows(base_url: str) -> list[dict]:
    """URL-list rows for every broken page; their truth columns say what the page is."""
    base = base_url.rstrip("/")
    return [
        {
            "url": base + page.path,
            "caption": f"broken page: {name.replace('_', ' ')}",
            "true_caption": None,
            "caption_is_wrong": None,
            "wrong_kind": None,
        }
        for name, page in BROKEN_PAGES.items()
    ]


def _sample_jpeg() -> bytes:
    scene = Scene((("red", "circle"),), "white")
    return jpeg_bytes(render(scene, 64, random.Random(0)))


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _ToyHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def _send(self, code: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        self.server.requests.append((path, self.headers.get("User-Agent", "")))
        sample = self.server.sample_jpeg
        if path == BROKEN_PAGES["not_an_image"].path:
            self._send(200, b"<html><body>Not an image</body></html>", "image/jpeg")
        elif path == BROKEN_PAGES["truncated"].path:
            self._send(200, sample[: len(sample) // 2], "image/jpeg")
        elif path == BROKEN_PAGES["opt_out"].path:
            self._send(200, sample, "image/jpeg", {"X-Robots-Tag": "noai, noimageai"})
        elif path == BROKEN_PAGES["redirect"].path:
            self._send(302, b"", "text/plain", {"Location": "/broken/redirect-target.jpg"})
        elif path == "/broken/redirect-target.jpg":
            self._send(200, sample, "image/jpeg")
        elif path.startswith(f"/{IMAGES_DIR}/") and self.server.root is not None:
            name = path[len(IMAGES_DIR) + 2 :]
            file = self.server.root / IMAGES_DIR / name
            if "/" not in name and file.is_file():
                self._send(200, file.read_bytes(), "image/jpeg")
            else:
                self._send(404, b"not found", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")


class _ToyHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: Path | None
    requests: list[tuple[str, str]]
    sample_jpeg: bytes


class ToyWebServer:
    """Serve a toy web folder and the broken pages on 127.0.0.1 at an ephemeral port.

    Use as a context manager; it also stops by itself after `lifetime_s` seconds so that a
    forgotten server never outlives its purpose. `requests` records (path, User-Agent).

        with ToyWebServer(out_dir) as web:
            rows = url_rows(pairs, web.base_url) + broken_rows(web.base_url)
    """

    def __init__(
        self, root: str | os.PathLike | None = None, lifetime_s: float = 900.0, port: int = 0
    ):
        """`port`: the port to listen on when it is free (else an ephemeral one)."""
        self.root = Path(root) if root is not None else None
        self.lifetime_s = lifetime_s
        self.port = port
        self._server: _ToyHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the toy web server is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self._server.requests if self._server is not None else []

    def start(self) -> ToyWebServer:
        try:
            server = _ToyHTTPServer(("127.0.0.1", self.port), _Handler)
        except OSError:  # taken: any free port
            server = _ToyHTTPServer(("127.0.0.1", 0), _Handler)
        server.root, server.requests, server.sample_jpeg = self.root, [], _sample_jpeg()
        self._server = server
        serve = threading.Thread(target=server.serve_forever, daemon=True, name="toyweb")
        watchdog = threading.Thread(target=self._stop_after_lifetime, daemon=True)
        self._threads = [serve, watchdog]
        for thread in self._threads:
            thread.start()
        return self

    def _stop_after_lifetime(self) -> None:
        if not self._stop.wait(self.lifetime_s):
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> ToyWebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_served(url: str, timeout_s: float = 5.0) -> None:
    """Block until `url` answers (any HTTP status), so a fetch never races the server's start."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
