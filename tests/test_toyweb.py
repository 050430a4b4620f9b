"""The toy web: pairs with known truth, wrong captions like web alt-text, and its server."""

from __future__ import annotations

import csv
import io
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.demo import toyweb


def test_generate_makes_the_set_fraction_wrong_with_the_truth_beside():
    pairs = toyweb.generate(40, wrong_fraction=0.3, seed=1, image_size=32)
    wrong = [p for p in pairs if p.caption_is_wrong]
    assert len(wrong) == 12
    assert set(p.wrong_kind for p in wrong) == set(toyweb.WRONG_KINDS)
    for p in pairs:
        if p.caption_is_wrong:
            assert p.caption != p.true_caption and p.wrong_kind in toyweb.WRONG_KINDS
        else:
            assert p.caption == p.true_caption and p.wrong_kind is None
    assert len({p.name for p in pairs}) == 40
    # The same seed gives the same web; another seed another one.
    again = toyweb.generate(40, wrong_fraction=0.3, seed=1, image_size=32)
    assert [(p.caption, p.jpg) for p in again] == [(p.caption, p.jpg) for p in pairs]
    assert [p.caption for p in toyweb.generate(40, 0.3, seed=2)] != [p.caption for p in pairs]


def test_true_captions_use_a_small_vocabulary():
    pairs = toyweb.generate(300, wrong_fraction=0.0, seed=0, image_size=16)
    words = {w for p in pairs for w in p.true_caption.split()}
    assert len(words) <= 15
    assert words >= set(toyweb.COLORS) | set(toyweb.SHAPES)
    assert any(" and " in p.true_caption for p in pairs)  # some images show two objects


@pytest.mark.parametrize("kind", toyweb.WRONG_KINDS)
def test_each_kind_of_wrong_caption(kind):
    import random

    scene = toyweb.Scene((("red", "circle"), ("blue", "square")), "white")
    other = toyweb.Scene((("green", "triangle"),), "black")
    caption = toyweb.wrong_caption(kind, scene, other, random.Random(0))
    assert caption != scene.caption
    if kind == "other_image":
        assert caption == other.caption
    elif kind == "file_name":
        assert caption.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png")
    elif kind == "boilerplate":
        assert caption in toyweb.BOILERPLATE
    else:  # partly wrong: the same scene with one colour or one shape changed
        assert len(caption.split()) == len(scene.caption.split())
        changed = [a for a, b in zip(caption.split(), scene.caption.split(), strict=True) if a != b]
        vocabulary = toyweb.COLORS if kind == "wrong_color" else toyweb.SHAPES
        assert len(changed) == 1 and changed[0] in vocabulary


def test_rendered_scene_shows_its_colour():
    from PIL import Image

    scene = toyweb.Scene((("blue", "square"),), "white")
    pair_img = toyweb.render(scene, 64, __import__("random").Random(0))
    img = Image.open(io.BytesIO(toyweb.jpeg_bytes(pair_img)))
    assert img.size == (64, 64)
    colors = img.convert("RGB").getcolors(64 * 64)
    dominant = [c for _, c in sorted(colors, reverse=True)[:2]]
    assert any(abs(c[2] - 220) < 40 and c[0] < 90 for c in dominant)  # blue
    assert any(min(c) > 220 for c in dominant)  # white background


def _get(url: str):
    return urllib.request.urlopen(url, timeout=5)


def test_server_serves_images_and_broken_pages(tmp_path):
    pairs = toyweb.generate(3, 0.0, seed=0, image_size=32)
    toyweb.write_images(pairs, tmp_path)
    with toyweb.ToyWebServer(tmp_path) as web:
        assert web.base_url.startswith("http://127.0.0.1:")
        rows = toyweb.url_rows(pairs, web.base_url)
        assert _get(rows[0]["url"]).read() == pairs[0].jpg
        pages = toyweb.BROKEN_PAGES
        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(web.base_url + pages["missing"].path)
        assert missing.value.code == 404
        with pytest.raises(urllib.error.HTTPError):
            _get(web.base_url + "/images/../urls.csv")
        assert _get(web.base_url + pages["not_an_image"].path).read().startswith(b"<html>")
        truncated = _get(web.base_url + pages["truncated"].path).read()
        assert truncated[:2] == b"\xff\xd8" and not truncated.endswith(b"\xff\xd9")
        opt_out = _get(web.base_url + pages["opt_out"].path)
        assert "noai" in opt_out.headers["X-Robots-Tag"]
        redirected = _get(web.base_url + pages["redirect"].path)
        assert redirected.url.endswith("/broken/redirect-target.jpg")
        assert redirected.read()[:2] == b"\xff\xd8"
        assert (
            pages["missing"].path,
            "Python-urllib/3." + __import__("sys").version.split(".")[1],
        ) in [(p, a) for p, a in web.requests]
        base = web.base_url
    with pytest.raises(urllib.error.URLError):
        _get(base + "/images/000000.jpg")


def test_server_stops_by_itself(tmp_path):
    web = toyweb.ToyWebServer(tmp_path, lifetime_s=0.2).start()
    base = web.base_url
    deadline = time.monotonic() + 5
    while web._server is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # `_server` is cleared just before the socket closes
    with pytest.raises(OSError):  # refused, or reset while it closed
        _get(base + "/")
    web.stop()  # stopping twice is harmless


def test_cli_writes_images_and_url_list(tmp_path):
    out = tmp_path / "toy"
    result = CliRunner().invoke(
        app, ["toyweb", str(out), "--images", "10", "--wrong-fraction", "0.5", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "5 with a wrong caption" in result.output
    with open(out / "urls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r for r in rows[0]] == list(toyweb.URL_LIST_COLUMNS)
    assert len(rows) == 10 and sum(r["caption_is_wrong"] == "True" for r in rows) == 5
    assert all(r["url"].startswith("http://127.0.0.1:8000/images/") for r in rows)
    assert all((out / "images" / r["url"].rsplit("/", 1)[-1]).is_file() for r in rows)
    assert {r["wrong_kind"] for r in rows if r["caption_is_wrong"] == "False"} == {""}


def test_cli_rejects_a_bad_fraction(tmp_path):
    result = CliRunner().invoke(app, ["toyweb", str(tmp_path), "--wrong-fraction", "1.5"])
    assert result.exit_code == 2 and "between 0 and 1" in result.output
    assert "Traceback" not in result.output
