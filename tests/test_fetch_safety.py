"""capfilt fetch downloads safely: http(s) only, no private or metadata addresses (also after a
redirect or a DNS answer), a size cap and a deadline per image, in this process and in workers.
"""

from __future__ import annotations

import socket
import time

import pytest
from _hostile import drip_body, drip_headers, hostile_server, jpeg
from _web import read_images, write_list
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.sources import safe_fetch
from capfilt.stages.fetch import FetchOptions, fetch, options_from_manifest

IMAGE = jpeg((40, 20))
BIG = 300_000
FAST = dict(image_size=16, threads=4, timeout=5, shard_size=50)


def _fetch(tmp_path, urls: list[str], **options) -> dict[str, dict]:
    rows = [{"url": url, "caption": f"row {i}"} for i, url in enumerate(urls)]
    url_list = write_list(rows, tmp_path / "urls.csv", "csv")
    result = fetch(str(url_list), str(tmp_path / "ds"), FetchOptions(**{**FAST, **options}))
    assert result.complete and result.rows_in_images == len(urls)
    return {row["url"]: row for row in read_images(tmp_path / "ds")}


# --- addresses -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "site-local"),
        ("64:ff9b:1::808:808", "private"),  # local-use NAT64 (RFC 8215) is not routed globally
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public"),
        ("224.0.0.1", "multicast"),
    ],
)
def test_private_addresses_are_refused_unless_allowed(address, kind):
    assert kind in safe_fetch.refusal_for_address(address, allow_private=False)
    assert safe_fetch.refusal_for_address(address, allow_private=True) is None


# Teredo (2001::/32) carries its client's IPv4 with every bit inverted, in the last 32 bits.
TEREDO_LOOPBACK = "2001:0:4136:e378:8000:63bf:80ff:fffe"  # client 127.0.0.1
TEREDO_METADATA = "2001:0:4136:e378:8000:63bf:5601:5601"  # client 169.254.169.254


@pytest.mark.parametrize(
    "address, inside, kind",
    [
        ("::7f00:1", "127.0.0.1", "loopback"),  # IPv4-compatible (::/96, deprecated)
        ("::a00:1", "10.0.0.1", "private"),
        ("::ffff:0:7f00:1", "127.0.0.1", "loopback"),  # IPv4-translated (::ffff:0:0:0/96)
        ("64:ff9b::7f00:1", "127.0.0.1", "loopback"),  # NAT64 (64:ff9b::/96)
        ("64:ff9b::c0a8:101", "192.168.1.1", "private"),
        ("2002:7f00:1::", "127.0.0.1", "loopback"),  # 6to4 (2002::/16)
        ("2002:a00:1:5::1", "10.0.0.1", "private"),
        (TEREDO_LOOPBACK, "127.0.0.1", "loopback"),
    ],
)
def test_ipv6_forms_carrying_an_ipv4_address_are_judged_by_it(address, inside, kind):
    reason = safe_fetch.refusal_for_address(address, allow_private=False)
    assert reason is not None and inside in reason and kind in reason, reason
    assert safe_fetch.refusal_for_address(address, allow_private=True) is None


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "151.101.1.69",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 for 8.8.8.8
        "2002:808:808::1",  # 6to4 for 8.8.8.8
    ],
)
def test_public_addresses_are_allowed(address):
    assert safe_fetch.refusal_for_address(address, allow_private=False) is None


@pytest.mark.parametrize(
    "address, named",
    [
        ("169.254.169.254", "169.254.169.254"),
        ("fd00:ec2::254", "fd00:ec2::254"),  # AWS instance metadata over IPv6
        ("fd00:ec2::23", "fd00:ec2::23"),  # AWS EKS Pod Identity over IPv6
        ("169.254.170.2", "169.254.170.2"),  # AWS ECS task credentials
        ("169.254.170.23", "169.254.170.23"),  # AWS EKS Pod Identity
        ("fd20:ce::254", "fd20:ce::254"),  # GCP over IPv6
        ("100.100.100.200", "100.100.100.200"),  # Alibaba Cloud
        ("168.63.129.16", "168.63.129.16"),  # Azure WireServer
        ("192.0.0.192", "192.0.0.192"),  # Oracle Cloud
        ("::ffff:169.254.169.254", "169.254.169.254"),
        ("::a9fe:a9fe", "169.254.169.254"),
        ("::ffff:0:a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::a83f:8110", "168.63.129.16"),
        ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),  # local-use NAT64 with a /96 prefix
        ("64:ff9b:1:a9fe:a9:fe00::", "169.254.169.254"),  # … with a /48 prefix
        ("2002:a9fe:a9fe::", "169.254.169.254"),
        (TEREDO_METADATA, "169.254.169.254"),
    ],
)
def test_metadata_addresses_are_refused_even_when_private_ones_are_allowed(address, named):
    for allow in (False, True):
        reason = safe_fetch.refusal_for_address(address, allow_private=allow)
        assert reason is not None and "metadata" in reason and named in reason, reason


@pytest.mark.parametrize(
    "address",
    [
        "169.254.1.1",
        "169.254.0.23",
        "169.254.255.254",
        "fe80::1%eth0",
        "fe80::a9fe:a9fe",
        "::ffff:169.254.1.1",
        "64:ff9b::a9fe:101",
        "2002:a9fe:101::",
    ],
)
def test_link_local_is_refused_even_when_private_addresses_are_allowed(address):
    """Cloud credential services sit on link-local addresses, not only the known ones."""
    for allow in (False, True):
        reason = safe_fetch.refusal_for_address(address, allow_private=allow)
        assert reason is not None and "link-local" in reason, reason
        assert "refused even with --allow-private-addresses" in reason


def test_refused_by_default_allowed_with_the_flag(tmp_path):
    with hostile_server("127.0.0.1", {"/a.jpg": lambda p: p.body(IMAGE)}) as (base, pages):
        url = base + "/a.jpg"
        secure = url.replace("http://", "https://").replace("127.0.0.1", "localhost")
        rows = _fetch(tmp_path / "default", [url, secure])
        for listed in (url, secure):
            assert rows[listed]["status"] == "failed_to_download"
            message = rows[listed]["error_message"]
            assert "is a loopback address" in message  # localhost may be ::1 first
            assert "--allow-private-addresses" in message
        assert pages.requests == []  # refused before a connection was made

        rows = _fetch(tmp_path / "allowed", [url], allow_private_addresses=True)
        assert rows[url]["status"] == "success" and pages.requests == ["/a.jpg"]


def test_only_http_and_https_and_never_metadata(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(IMAGE)
    urls = {
        f"file://{secret}": "only http and https",
        "ftp://ftp.example.com/a.jpg": "only http and https",
        "data:image/jpeg;base64,/9j/4AAQ": "only http and https",
        "javascript:alert(1)": "only http and https",
        "not a url at all": "only http and https",
        "http://169.254.169.254/latest/meta-data/iam/": "cloud metadata",
        "http://[fd00:ec2::254]/latest/meta-data/": "cloud metadata",
        "http://metadata.google.internal/computeMetadata/v1/": "cloud metadata",
    }
    rows = _fetch(tmp_path, list(urls), allow_private_addresses=True, timeout=2)
    for url, reason in urls.items():
        assert rows[url]["status"] == "failed_to_download", url
        assert reason in rows[url]["error_message"], (url, rows[url]["error_message"])
        assert "--allow-private-addresses" not in rows[url]["error_message"]


def fake_dns(monkeypatch, dns: dict) -> None:
    """The names of `dns` resolve to its address (or tuple of addresses); others as usual."""
    real_resolve = safe_fetch._resolve

    def resolve(host, port):
        if host not in dns:
            return real_resolve(host, port)
        answers = dns[host] if isinstance(dns[host], tuple) else (dns[host],)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers
        ]

    monkeypatch.setattr(safe_fetch, "_resolve", resolve)


def test_redirects_and_dns_answers_cannot_reach_loopback(tmp_path, monkeypatch):
    """127.0.0.2 stands in for a public server; names resolve through a patched resolver."""
    real_refusal = safe_fetch.refusal_for_address
    monkeypatch.setattr(
        safe_fetch,
        "refusal_for_address",
        lambda address, allow: None if address == "127.0.0.2" else real_refusal(address, allow),
    )
    fake_dns(monkeypatch, {"cdn.example.test": "127.0.0.2", "rebind.example.test": "127.0.0.1"})
    with hostile_server("127.0.0.1", {"/inside.jpg": lambda p: p.body(IMAGE)}) as (inside, seen):
        port = inside.rsplit(":", 1)[1]
        routes = {
            "/ok.jpg": lambda p: p.body(IMAGE),
            "/to-localhost": lambda p: p.redirect(f"http://localhost:{port}/inside.jpg"),
            "/to-loopback-ip": lambda p: p.redirect(f"{inside}/inside.jpg"),
            "/to-file": lambda p: p.redirect("file:///etc/passwd"),
            "/to-ftp": lambda p: p.redirect("ftp://ftp.example.test/a.jpg"),
            "/to-metadata": lambda p: p.redirect("http://169.254.169.254/latest/"),
        }
        with hostile_server("127.0.0.2", routes) as (outside, _):
            public = outside.replace("127.0.0.2", "cdn.example.test")
            expected = {
                public + "/ok.jpg": ("success", None),
                public + "/to-localhost": ("failed_to_download", "localhost resolves to 127.0"),
                public + "/to-loopback-ip": ("failed_to_download", "127.0.0.1 is a loopback"),
                # urllib refuses file: itself; capfilt refuses the schemes urllib allows.
                public + "/to-file": ("failed_to_download", "'file:///etc/passwd' is not allowed"),
                public + "/to-ftp": ("failed_to_download", "redirect to a non-http URL (ftp:"),
                public + "/to-metadata": ("failed_to_download", "cloud metadata"),
                outside.replace("127.0.0.2", "rebind.example.test") + "/ok.jpg": (
                    "failed_to_download",
                    "rebind.example.test resolves to 127.0.0.1 is a loopback address",
                ),
            }
            rows = _fetch(tmp_path, list(expected))
        assert seen.requests == []  # nothing reached the loopback server
    for url, (status, reason) in expected.items():
        assert rows[url]["status"] == status, rows[url]
        if reason:
            assert reason in rows[url]["error_message"], rows[url]


def test_disguised_and_link_local_addresses_are_refused_after_dns_and_redirects(
    tmp_path, monkeypatch
):
    """The connection path vets what DNS and redirects hand it with refusal_for_address."""
    dns = {
        "nat64.example.test": "64:ff9b::7f00:1",
        "sixtofour.example.test": "2002:7f00:1::",
        "eks.example.test": "169.254.170.23",
        "eks6.example.test": "fd00:ec2::23",
        "wire.example.test": "168.63.129.16",
        "linklocal.example.test": "169.254.7.7",
        "mixed.example.test": ("10.0.0.1", "64:ff9b::a9fe:a9fe"),
    }
    fake_dns(monkeypatch, dns)
    # Without the flag: a loopback address in IPv6 dress is loopback, and the flag is offered;
    # when one of a name's addresses is refused whatever the flag, that one is reported.
    expected = {
        "http://nat64.example.test/a.jpg": "64:ff9b::7f00:1 is a NAT64 address for 127.0.0.1",
        "http://sixtofour.example.test/a.jpg": "is a 6to4 address for 127.0.0.1",
        "http://[::7f00:1]/a.jpg": "for 127.0.0.1, a loopback address",
        "http://mixed.example.test/a.jpg": "169.254.169.254, a cloud metadata address",
    }
    rows = _fetch(tmp_path / "default", list(expected), timeout=2)
    for url, reason in expected.items():
        assert rows[url]["status"] == "failed_to_download", rows[url]
        assert reason in rows[url]["error_message"], rows[url]["error_message"]
        offered = "--allow-private-addresses" in rows[url]["error_message"]
        assert offered == ("mixed" not in url), rows[url]["error_message"]

    # With the flag: credential endpoints stay refused, named directly, through DNS or by a
    # redirect from an allowed server (127.0.0.2).
    redirects = {
        "/to-nat64": "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
        "/to-6to4": "http://[2002:a9fe:a9fe::1]/latest/meta-data/",
        "/to-teredo": f"http://[{TEREDO_METADATA}]/latest/meta-data/",
        "/to-compat": "http://[::a9fe:a9fe]/latest/meta-data/",
        "/to-wireserver": "http://168.63.129.16/machine/?comp=goalstate",
        "/to-eks": "http://eks.example.test/v1/credentials",
        "/to-link-local": "http://169.254.42.42/",
    }
    routes = {
        path: (lambda target: lambda p: p.redirect(target))(t) for path, t in redirects.items()
    }
    with hostile_server("127.0.0.2", routes) as (base, pages):
        expected = {base + path: "cloud metadata" for path in redirects}
        expected[base + "/to-link-local"] = "169.254.42.42 is a link-local address"
        expected.update(
            {
                "http://eks.example.test/a.jpg": "169.254.170.23 is a cloud metadata address",
                "http://eks6.example.test/a.jpg": "fd00:ec2::23 is a cloud metadata address",
                "http://wire.example.test/a.jpg": "168.63.129.16 is a cloud metadata address",
                "http://[fd00:ec2::254]/latest/": "cloud metadata",
                "http://linklocal.example.test/a.jpg": "refused even with --allow-private",
                "http://[fe80::1]/a.jpg": "fe80::1 is a link-local address",
            }
        )
        rows = _fetch(tmp_path / "allowed", list(expected), allow_private_addresses=True, timeout=2)
    assert sorted(pages.requests) == sorted(redirects)  # each redirect was followed, no further
    for url, reason in expected.items():
        assert rows[url]["status"] == "failed_to_download", rows[url]
        message = rows[url]["error_message"]
        assert reason in message, (url, message)
        assert "pass --allow-private-addresses" not in message, message


# --- size and time ---------------------------------------------------------------------------
def test_slow_drip_hits_the_deadline_and_big_images_the_cap(tmp_path):
    routes = {
        "/ok.jpg": lambda p: p.body(IMAGE),
        "/drip-body.jpg": drip_body,
        "/drip-headers.jpg": drip_headers,
        "/big.jpg": lambda p: p.body(b"\xff" * BIG),
        "/big-unannounced.jpg": lambda p: p.body(b"\xff" * BIG, length=False),
    }
    with hostile_server("127.0.0.2", routes) as (base, _):
        start = time.monotonic()
        rows = _fetch(
            tmp_path,
            [base + path for path in routes],
            allow_private_addresses=True,
            image_deadline=1.0,
            max_image_bytes=100_000,
        )
        elapsed = time.monotonic() - start
    assert rows[base + "/ok.jpg"]["status"] == "success"
    for path in ("/drip-body.jpg", "/drip-headers.jpg"):
        assert rows[base + path]["status"] == "failed_to_download"
        assert "image deadline of 1 s exceeded" in rows[base + path]["error_message"]
    assert (
        "300,000 bytes is larger than --max-image-bytes 100,000"
        in (rows[base + "/big.jpg"]["error_message"])
    )
    assert (
        "larger than --max-image-bytes 100,000"
        in (rows[base + "/big-unannounced.jpg"]["error_message"])
    )
    # Each drip would take 10 s; the per-read timeout (5 s) never fires on a drip.
    assert elapsed < 6, elapsed


def test_the_guard_holds_in_worker_processes(tmp_path):
    """img2dataset.download() with spawned worker processes: the policy travels with them.

    One run only: each spawned process imports img2dataset again (about 10 s here).
    """
    with hostile_server("127.0.0.1", {"/ok.jpg": lambda p: p.body(IMAGE)}) as (base, pages):
        urls = [base + "/ok.jpg", "file:///etc/passwd"]
        rows = _fetch(tmp_path, urls, processes=2)
    assert pages.requests == []
    assert "127.0.0.1 is a loopback address" in rows[urls[0]]["error_message"]
    assert "only http and https" in rows[urls[1]]["error_message"]


# --- options ---------------------------------------------------------------------------------
def test_cli_options_and_their_errors(tmp_path):
    with hostile_server("127.0.0.1", {"/a.jpg": lambda p: p.body(IMAGE)}) as (base, _):
        url_list = write_list([{"url": base + "/a.jpg"}], tmp_path / "u.csv", "csv")
        runner = CliRunner()
        refused = runner.invoke(app, ["fetch", str(url_list), str(tmp_path / "a")])
        assert refused.exit_code == 0, refused.output
        assert "loopback" in refused.output and "--allow-private-addresses" in refused.output
        allowed = runner.invoke(
            app,
            ["fetch", str(url_list), str(tmp_path / "b"), "--allow-private-addresses"]
            + ["--max-image-bytes", "1000000", "--image-deadline", "5"],
        )
        assert allowed.exit_code == 0 and "1 ok" in allowed.output, allowed.output
    for option, value in (("--max-image-bytes", "0"), ("--image-deadline", "0")):
        bad = runner.invoke(app, ["fetch", str(url_list), str(tmp_path / "c"), option, value])
        assert bad.exit_code == 2 and option in bad.output and "Traceback" not in bad.output


def test_a_data_manifest_cannot_allow_private_addresses(tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text('[source]\nname = "m"\n[fetch]\nallow_private_addresses = true\n')
    options, _ = options_from_manifest(manifest)
    assert options.allow_private_addresses is False
    options, _ = options_from_manifest(manifest, allow_private_addresses=True)
    assert options.allow_private_addresses is True
