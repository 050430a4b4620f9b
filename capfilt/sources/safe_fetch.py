"""Safe downloading for `capfilt fetch`: which addresses, how many bytes, how long, which images.

img2dataset downloads with `urllib.request.urlopen`, which follows file://, ftp:// and data:
URLs, connects to any address a name resolves to (127.0.0.1, the cloud metadata service at
169.254.169.254, a private network), reads a body of any size and lets a server that drips one
byte a second hold a thread for ever. capfilt replaces img2dataset's one download function
with `download_image` below, for the time a shard is downloaded, in whichever process does it:

- only http and https, also after a redirect;
- the connection goes to an address vetted after DNS resolution (and checked again once
  connected), so neither a name nor a redirect nor a DNS answer that changes between look-ups
  reaches a loopback, private, link-local or metadata address, unless
  `allow_private_addresses`; cloud metadata endpoints and all link-local addresses
  (169.254.0.0/16, fe80::/10, where credential services live) are refused even then. An IPv6
  address that carries an IPv4 one (IPv4-mapped, -compatible or -translated, NAT64, 6to4,
  Teredo) is judged by that IPv4 address as well;
- at most `max_image_bytes` are read, and the whole transfer (connect, TLS, headers, body,
  redirects) ends at `image_deadline` seconds: a watchdog shuts the socket down;
- `SafeResizer` refuses decompression bombs from the image header before a pixel is decoded,
  and hands OpenCV images it would get wrong (EXIF-rotated, 16-bit, CMYK, alpha, palette,
  animated) as upright 8-bit RGB (see `capfilt.data.prepare_for_resize`).

`SafeDownloader` (img2dataset's Downloader with a policy) installs the function around each
shard it downloads, so the guard holds in img2dataset's worker processes and Spark executors,
which receive the downloader pickled.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import http.client
import io
import ipaddress
import itertools
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from capfilt.core.errors import CapfiltError
from capfilt.images.decode import MAX_IMAGE_PIXELS, image_size, prepare_for_resize

DEFAULT_MAX_IMAGE_BYTES = 32 * 2**20
DEFAULT_IMAGE_DEADLINE = 60.0
ALLOWED_SCHEMES = ("http", "https")
# Cloud metadata services hand out credentials: never fetched, whatever the flag says.
METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, …
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS Pod Identity
        "fd20:ce::254",  # GCP over IPv6
        "168.63.129.16",  # Azure WireServer (host agent)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
# AWS's instance services over IPv6: metadata ::254, EKS Pod Identity ::23, DNS, NTP.
METADATA_NETWORKS = (ipaddress.ip_network("fd00:ec2::/64"),)
PRIVATE_FLAG = "--allow-private-addresses"
_READ_CHUNK = 64 * 1024
JPEG_MAX_SIDE = 65_500  # what libjpeg (OpenCV's encoder) writes at most, in pixels a side


@dataclass(frozen=True)
class DownloadPolicy:
    """What a download may reach and how much of it; travels pickled to worker processes."""

    allow_private_addresses: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_deadline: float = DEFAULT_IMAGE_DEADLINE
    max_image_pixels: int = MAX_IMAGE_PIXELS


class RefusedDownload(OSError):
    """A download capfilt will not make; its message is the row's error_message.

    An OSError so that urllib passes it on (wrapped in a URLError) like a connection error.
    """


# --- addresses -------------------------------------------------------------------------------
def refusal_for_address(address: str, allow_private: bool) -> str | None:
    """Why an IP address may not be fetched from, or None when it may.

    Metadata and link-local addresses are refused whatever `allow_private` says, also when
    an IPv6 address carries them (64:ff9b::a9fe:a9fe is NAT64 for 169.254.169.254).
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    # (reason, refused even with allow_private, certain): an IPv4 address inside comes first
    judged = []
    for inner, form, certain in [*_carried(ip), (ip, "", True)]:
        verdict = _verdict(inner)
        if verdict is not None:
            what, always = verdict
            judged.append((f"{ip} is {form + ', ' if form else ''}{what}", always, certain))
    for reason, always, _ in judged:
        if always:
            return reason
    if allow_private:
        return None
    # An uncertain reading (local-use NAT64) only ever adds refusals that hold with the flag;
    # such an address is refused as private anyway.
    return next((reason for reason, _, certain in judged if certain), None)


def _verdict(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, bool] | None:
    """(what ip is, whether it is refused even with allow_private), or None for a public one."""
    if ip in METADATA_ADDRESSES or any(ip in network for network in METADATA_NETWORKS):
        return "a cloud metadata address, which capfilt never fetches from", True
    if ip.is_link_local:
        return (
            "a link-local address (cloud credential services live there); refused even with "
            f"{PRIVATE_FLAG}",
            True,
        )
    for kind, test in (
        ("unspecified", ip.is_unspecified),  # 0.0.0.0 reaches this machine
        ("loopback", ip.is_loopback),
        ("multicast", ip.is_multicast),
        ("site-local", ip.version == 6 and ip.is_site_local),  # fec0::/10, deprecated
        ("private", ip.is_private or ip in _LOCAL_NAT64),
    ):
        if test:
            return f"a {kind} address", False
    if not ip.is_global:
        return "not a public address", False
    return None


_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated (RFC 4291): ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix (RFC 6052)
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # local-use prefixes (RFC 8215)


def _carried(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[tuple[ipaddress.IPv4Address, str, bool]]:
    """The IPv4 addresses an IPv6 address carries: (address, how, whether certainly)."""
    if ip.version != 6:
        return []
    last = ipaddress.IPv4Address(ip.packed[12:])
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are IPv6's own
        return [(last, f"an IPv4-compatible address for {last}", True)]
    if ip in _IPV4_TRANSLATED:
        return [(last, f"an IPv4-translated address for {last}", True)]
    if ip in _NAT64:
        return [(last, f"a NAT64 address for {last}", True)]
    if ip in _LOCAL_NAT64:
        # A local-use NAT64 prefix may be /48, /56, /64 or /96 long; each length puts the
        # IPv4 address elsewhere, skipping bits 64-71 (RFC 6052). Every reading is checked.
        squeezed = ip.packed[:8] + ip.packed[9:]
        readings = dict.fromkeys(
            [last] + [ipaddress.IPv4Address(squeezed[at : at + 4]) for at in (6, 7, 8)]
        )
        return [(v4, f"perhaps a local-use NAT64 address for {v4}", False) for v4 in readings]
    if ip.sixtofour is not None:
        return [(ip.sixtofour, f"a 6to4 address for {ip.sixtofour}", True)]
    if ip.teredo is not None:
        server, client = ip.teredo
        return [
            (client, f"a Teredo address for {client}", True),
            (server, f"a Teredo address through server {server}", True),
        ]
    return []


def _resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo for TCP (a module function so that tests can stand in for DNS)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _is_metadata_host(host: str) -> bool:
    return host.lower().rstrip(".") in METADATA_HOSTS


# --- the deadline ----------------------------------------------------------------------------
class _Transfer:
    """One image's download: its deadline, and whether the watchdog ended it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.done = False

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError(self.message())
        return left

    def message(self) -> str:
        return f"image deadline of {self.seconds:g} s exceeded (the server sent too slowly)"


class _Watchdog:
    """One thread per process that shuts down the sockets of transfers past their deadline.

    Shutting a socket down wakes a thread blocked in recv (plain or TLS), so no server can
    hold a download thread longer than the deadline, however it drips its bytes.
    """

    def __init__(self):
        self._wake = threading.Condition()
        self._heap: list[tuple[float, int, _Transfer, socket.socket]] = []
        self._count = itertools.count()
        self._pid = None

    def watch(self, transfer: _Transfer, sock: socket.socket) -> None:
        with self._wake:
            if self._pid != os.getpid():  # first use in this process (or a forked child)
                self._pid = os.getpid()
                self._heap = []
                threading.Thread(target=self._run, daemon=True, name="capfilt-deadline").start()
            heapq.heappush(self._heap, (transfer.deadline, next(self._count), transfer, sock))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][0] <= time.monotonic():
                    _, _, transfer, sock = heapq.heappop(self._heap)
                    if not transfer.done:
                        transfer.expired = True
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                self._wake.wait(wait)


_WATCHDOG = _Watchdog()


# --- connections -----------------------------------------------------------------------------
def _guarded_connect(policy: DownloadPolicy, transfer: _Transfer):
    """A stand-in for socket.create_connection that only connects to vetted addresses."""

    def create_connection(address, timeout=None, source_address=None, **_):
        host, port = address
        if _is_metadata_host(host):
            raise RefusedDownload(
                f"refused: {host} is a cloud metadata service, which capfilt never fetches from"
            )
        if not isinstance(timeout, int | float):  # None, or socket's "global default" marker
            timeout = transfer.remaining()
        timeout = min(timeout, transfer.remaining())
        refusals, error = [], None
        for family, kind, proto, _, sockaddr in _resolve(host, port):
            reason = refusal_for_address(sockaddr[0], policy.allow_private_addresses)
            if reason is not None:
                # refused even with the flag (metadata, link-local): the flag is no remedy
                refusals.append((reason, refusal_for_address(sockaddr[0], True) is not None))
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(min(timeout, transfer.remaining()))
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                # The address connected to is the one vetted; checked again, cheaply, in case
                # the resolver handed back something connect() treats differently.
                peer = refusal_for_address(sock.getpeername()[0], policy.allow_private_addresses)
                if peer is not None:
                    raise RefusedDownload(f"refused: {host} connected to {peer}")
                _WATCHDOG.watch(transfer, sock)
                return sock
            except BaseException as e:
                sock.close()
                if isinstance(e, RefusedDownload) or not isinstance(e, OSError):
                    raise
                error = e
        if error is not None:
            raise error
        if refusals:
            always = [reason for reason, held in refusals if held]
            if always:
                raise RefusedDownload(f"refused: {host} resolves to {always[0]}")
            raise RefusedDownload(
                f"refused: {host} resolves to {refusals[0][0]}; pass {PRIVATE_FLAG} to fetch "
                "from private networks"
            )
        raise OSError(f"{host} has no address")

    return create_connection


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: DownloadPolicy, transfer: _Transfer, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connect(policy, transfer)


class _HTTPSConnection(http.client.HTTPSConnection):
    # HTTPSConnection.connect() opens the TCP connection through _create_connection, then
    # wraps it in TLS for the host name: the certificate is checked for the name, not the IP.
    def __init__(self, *args, policy: DownloadPolicy, transfer: _Transfer, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connect(policy, transfer)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: DownloadPolicy, transfer: _Transfer):
        super().__init__()
        self._connection = functools.partial(_HTTPConnection, policy=policy, transfer=transfer)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: DownloadPolicy, transfer: _Transfer):
        super().__init__()
        self._connection = functools.partial(_HTTPSConnection, policy=policy, transfer=transfer)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise RefusedDownload(
                f"refused: redirect to a non-http URL ({newurl[:60]}); only http and https "
                "URLs are fetched"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(policy: DownloadPolicy, transfer: _Transfer) -> urllib.request.OpenerDirector:
    """An opener for http and https only: no file, ftp or data handler, no proxy."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _HTTPHandler(policy, transfer),
        _HTTPSHandler(policy, transfer),
        _RedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


# --- the download ----------------------------------------------------------------------------
def _user_agent(token: str | None) -> str:
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if token:
        agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return agent


def _read_capped(response, limit: int) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise RefusedDownload(
            f"image of {int(length):,} bytes is larger than --max-image-bytes {limit:,}"
        )
    body = io.BytesIO()
    while chunk := response.read(_READ_CHUNK):
        body.write(chunk)
        if body.tell() > limit:
            raise RefusedDownload(f"image is larger than --max-image-bytes {limit:,}")
    return body.getvalue()


def download_image(row, timeout, user_agent_token, disallowed_header_directives, *, policy):
    """img2dataset's download_image, guarded: (key, BytesIO or None, error message or None)."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    transfer = _Transfer(policy.image_deadline)
    try:
        scheme = urllib.parse.urlsplit(url or "").scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise RefusedDownload(
                f"refused: {scheme + ' URL' if scheme else 'not a URL'}; only http and https "
                "URLs are fetched"
            )
        request = urllib.request.Request(url, headers={"User-Agent": _user_agent(user_agent_token)})
        with _opener(policy, transfer).open(request, timeout=timeout) as response:
            if disallowed_header_directives and is_disallowed(
                response.headers, user_agent_token, disallowed_header_directives
            ):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            data = _read_capped(response, policy.max_image_bytes)
        if transfer.expired:  # the watchdog cut the body short
            return key, None, transfer.message()
        return key, io.BytesIO(data), None
    except Exception as err:  # noqa: BLE001 - every failure is this row's error_message
        if transfer.expired:
            return key, None, transfer.message()
        if isinstance(err, urllib.error.URLError) and isinstance(err.reason, OSError):
            if isinstance(err.reason, RefusedDownload | TimeoutError):
                return key, None, str(err.reason)
        return key, None, str(err) or type(err).__name__
    finally:
        transfer.done = True


@contextlib.contextmanager
def guarded_downloads(policy: DownloadPolicy):
    """Make img2dataset download through `download_image` with `policy` inside the block."""
    import img2dataset.downloader as downloader

    if not callable(getattr(downloader, "download_image", None)) or not callable(
        getattr(downloader, "download_image_with_retry", None)
    ):
        # Fail closed: without the hook, downloads would be unguarded.
        raise CapfiltError(
            "this img2dataset version has no download_image function for capfilt's download "
            "guard; install the img2dataset version pinned in capfilt's pyproject.toml"
        )
    original = downloader.download_image
    downloader.download_image = functools.partial(download_image, policy=policy)
    try:
        yield
    finally:
        downloader.download_image = original


class SafeDownloader:
    """img2dataset's Downloader, downloading every shard under a DownloadPolicy.

    A wrapper rather than a subclass, so that importing this module does not import
    img2dataset; it pickles (to worker processes) with the downloader inside.
    """

    def __init__(self, downloader, policy: DownloadPolicy):
        self.downloader = downloader
        self.policy = policy

    @classmethod
    def wrapping(cls, policy: DownloadPolicy, **downloader_args) -> SafeDownloader:
        """Build img2dataset's Downloader from its keyword arguments, and wrap it."""
        from img2dataset.downloader import Downloader

        return cls(Downloader(**downloader_args), policy)

    def __call__(self, row):
        with guarded_downloads(self.policy):
            return self.downloader(row)


class SafeResizer:
    """img2dataset's Resizer behind a check that refuses decompression bombs and turns what
    OpenCV misreads into upright 8-bit RGB first."""

    def __init__(self, resizer, max_pixels: int = MAX_IMAGE_PIXELS):
        self.resizer = resizer
        self.max_pixels = max_pixels

    @classmethod
    def wrapping(cls, max_pixels: int = MAX_IMAGE_PIXELS, **resizer_args) -> SafeResizer:
        """Build img2dataset's Resizer from its keyword arguments, and wrap it."""
        from img2dataset.resizer import Resizer

        return cls(Resizer(**resizer_args), max_pixels)

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        prepared, error = prepare_for_resize(img_stream.read(), self.max_pixels)
        if error is None:
            error = self.refusal_of_output(prepared)
        if error is not None:
            return None, None, None, None, None, error
        return self.resizer(io.BytesIO(prepared), blurring_bbox_list)

    def refusal_of_output(self, prepared: bytes) -> str | None:
        """Why the resized picture would be too large (a 1 × 4000 strip at keep_ratio 384 is
        384 × 1,536,000 pixels, 1.7 GB), from the header alone; None when it is fine."""
        size = image_size(prepared, self.max_pixels)
        if size is None:
            return None  # OpenCV's decoder gives the row its error
        width, height = size
        out_width, out_height = self.output_size(width, height)
        if out_width * out_height > self.max_pixels or max(out_width, out_height) > JPEG_MAX_SIDE:
            return (
                f"image too large once resized: {width}×{height} at {self.resize_mode} "
                f"{self.resizer.image_size} would be {out_width}×{out_height} pixels "
                f"(at most {self.max_pixels:,} pixels, {JPEG_MAX_SIDE:,} a side)"
            )
        return None

    @property
    def resize_mode(self) -> str:
        """The resizer's mode by name: keep_ratio, center_crop, border, …"""
        return getattr(self.resizer.resize_mode, "name", str(self.resizer.resize_mode))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The largest picture img2dataset's resizer makes of a width × height image."""
        size, mode = self.resizer.image_size, self.resize_mode
        only_bigger = self.resizer.resize_only_if_bigger
        if mode in ("keep_ratio", "center_crop"):  # the smaller side becomes `size` (then crop)
            if only_bigger and min(width, height) <= size:
                return width, height
            scale = size / max(1, min(width, height))
        elif mode in ("keep_ratio_largest", "border"):  # the larger side becomes `size`
            if only_bigger and max(width, height) <= size:
                return width, height
            scale = size / max(1, max(width, height))
        else:  # "no"
            return width, height
        out = (max(1, round(width * scale)), max(1, round(height * scale)))
        return (max(out[0], size), max(out[1], size)) if mode == "border" else out


@contextlib.contextmanager
def guarded_img2dataset(policy: DownloadPolicy):
    """Inside the block, `img2dataset.download()` builds SafeDownloader and SafeResizer, and
    its Parquet shards carry a write id (sources/writers.py)."""
    import sys

    import img2dataset.main  # noqa: F401 - the package's `main` attribute is a function

    from capfilt.sources.writers import WriteIdParquetSampleWriter

    main = sys.modules["img2dataset.main"]
    saved = main.Downloader, main.Resizer, main.ParquetSampleWriter
    main.Downloader = functools.partial(SafeDownloader.wrapping, policy)
    main.Resizer = functools.partial(SafeResizer.wrapping, policy.max_image_pixels)
    main.ParquetSampleWriter = WriteIdParquetSampleWriter
    try:
        yield
    finally:
        main.Downloader, main.Resizer, main.ParquetSampleWriter = saved


__all__ = [
    "DEFAULT_IMAGE_DEADLINE",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DownloadPolicy",
    "RefusedDownload",
    "SafeDownloader",
    "SafeResizer",
    "download_image",
    "guarded_downloads",
    "guarded_img2dataset",
    "refusal_for_address",
]
