"""Hostile images and captions through every door: decoding, the resize of fetch and ingest,
fetch, ingest, caption, filter, query, report and export-data. A broken file is an error row
with a reason; an odd but valid one (CMYK, 16-bit, alpha, palette, animated, EXIF-rotated,
progressive, TIFF, BMP, ICO, JPEG 2000, WebP, greyscale, 1×4000, with trailing bytes or a ZIP
behind it) decodes upright and in RGB; a decompression bomb is refused with bounded memory;
odd captions are kept as written, scored without a crash, printed and exported as written and
escaped in the HTML report. The kinds and their stages are the registry's (tests/_hostile.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
from _hostile import (
    CAPTIONS,
    HTML_CAPTION,
    INVALID_UTF8_CAPTIONS,
    Hostile,
    caption_csv,
    close,
    corpus,
    decompression_bomb,
    exercised,
    hostile_server,
    images_row,
    images_schema,
    jpeg,
    names_through,
)
from _web import read_images

from capfilt.core.layout import Dataset
from capfilt.core.text import printable
from capfilt.images.decode import decode_image

HOSTILE = corpus()
GOOD = jpeg()
BOMB = Hostile("decompression_bomb", b"", False)  # bytes made on demand: ~1 MB, 0.6 s
IMAGES = (*HOSTILE, BOMB)
IMAGE_ERRORS = {
    "zero_bytes": "no image bytes",
    "truncated_jpeg": "cannot decode image",
    "html_as_jpg": "cannot decode image",
    "png_bad_header_crc": "cannot decode image",
    "svg_text": "cannot decode image",
    "decompression_bomb": "image too large",
}
ESCAPED = "capfilt-polyglot-escaped.txt"  # what the ZIP behind polyglot_zip would write


def _bytes(entry: Hostile) -> bytes:
    return decompression_bomb() if entry is BOMB else entry.data


def _decoded_jpg(jpg: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(jpg)).convert("RGB")


def _check_image_rows(rows: dict[str, dict]) -> None:
    """Rows named by hostile file: decodable ones upright RGB at their size, the rest errors."""
    for entry in IMAGES:
        row = rows[entry.name]
        if entry.decodes:
            assert row["status"] == "success", row
            assert (row["width"], row["height"]) == entry.size, entry.name
            assert (row["original_width"], row["original_height"]) == entry.size, entry.name
            x, y, colour = entry.probe
            got = _decoded_jpg(row["jpg"]).getpixel((x, y))
            assert close(got, colour), (entry.name, got, colour)
        else:
            assert row["status"] == "failed_to_resize", row
            assert IMAGE_ERRORS[entry.name] in row["error_message"], row
            assert row["jpg"] is None


def _check_caption_rows(rows: dict[str, dict]) -> None:
    for caption in CAPTIONS:
        assert rows[caption.name]["status"] == "success"
        assert rows[caption.name]["caption"] == caption.expected, caption.name


def _rows_by_name(dataset: Path) -> dict[str, dict]:
    """Rows of images/ by kind: an image kind is its caption, a caption kind its URL's name."""
    rows = Dataset(str(dataset)).read_stage("images").to_pylist()
    named = {r["caption"]: r for r in rows if r["caption"] in {e.name for e in IMAGES}}
    by_url = {r["url"].rsplit("/", 1)[-1].split(".")[0]: r for r in rows}
    named.update({c.name: by_url[c.name] for c in CAPTIONS})
    assert len(rows) == len(IMAGES) + len(CAPTIONS)  # every row once
    return named


def _nothing_escaped(*folders: Path) -> None:
    """The ZIP inside polyglot_zip was never unpacked: no file it holds exists anywhere near."""
    for folder in folders:
        for parent in (folder, *list(folder.parents)[:3]):
            assert not (parent / ESCAPED).exists(), parent


# --- decoding for caption and filter ---------------------------------------------------------
@pytest.mark.parametrize("entry", HOSTILE, ids=[e.name for e in HOSTILE])
def test_decode_image(entry):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = decode_image(entry.data)
    assert not caught, [str(w.message) for w in caught]  # nothing for the screen
    assert decoded.ok is entry.decodes, decoded.error
    if entry.decodes:
        assert decoded.image.mode == "RGB" and decoded.image.size == entry.size
        x, y, colour = entry.probe
        assert close(decoded.image.getpixel((x, y)), colour)
    else:
        assert decoded.error and decoded.image is None
        assert IMAGE_ERRORS[entry.name] in decoded.error


def test_the_decode_tests_cover_the_registry():
    exercised("image", "decode", [e.name for e in HOSTILE] + ["decompression_bomb"])


def test_decompression_bomb_is_refused_with_bounded_memory():
    """Decoding the 30,000² bomb would take 900 MB; refusing it must not grow the process."""
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _hostile import decompression_bomb
from capfilt.images.decode import decode_image, prepare_for_resize
import PIL.PngImagePlugin
bomb = decompression_bomb()
decode_image(b"x")  # warm up PIL's plugins before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = decode_image(bomb)
prepared, error = prepare_for_resize(bomb)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(grew_kib=after - before, decode=decoded.error, resize=error,
                      size=len(bomb))))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["size"] < 2_000_000
    for error in (got["decode"], got["resize"]):
        assert "image too large" in error
    assert got["grew_kib"] < 32 * 1024, got  # peak RSS grew by less than 32 MiB


# --- the resize of fetch and ingest, with the default mode --------------------------------------
def _resize_params() -> list:
    params = []
    for entry in IMAGES:
        params.append(pytest.param(entry, id=entry.name))
    return params


@pytest.fixture(scope="module")
def small_resizer():
    """img2dataset's resizer behind capfilt's guard, as fetch and ingest build it (keep_ratio:
    the smaller side becomes 32)."""
    from capfilt.sources.safe_fetch import SafeResizer

    return SafeResizer.wrapping(
        image_size=32, resize_mode="keep_ratio", resize_only_if_bigger=False, encode_quality=95
    )


@pytest.mark.parametrize("entry", _resize_params())
def test_default_resize_gives_a_picture_or_a_reason(entry, small_resizer):
    jpg, width, height, original_width, original_height, error = small_resizer(
        io.BytesIO(_bytes(entry))
    )
    if not entry.decodes:
        assert jpg is None and IMAGE_ERRORS[entry.name] in error
        return
    if entry.name == "tall_1x4000":  # 32 × 128,000 cannot be a JPEG: it must say why
        assert jpg is None and "too large" in error, error
        return
    assert error is None and (original_width, original_height) == entry.size
    assert min(width, height) == 32  # keep_ratio: the smaller side is the target
    assert abs(width / height - entry.size[0] / entry.size[1]) < 0.1  # upright, same shape
    x, y, colour = entry.probe
    scaled = (x * width // entry.size[0], y * height // entry.size[1])
    assert close(_decoded_jpg(jpg).getpixel(scaled), colour), entry.name


def test_the_resize_tests_cover_the_registry():
    exercised("image", "resize", [e.name for e in IMAGES])


def test_resize_refuses_what_would_grow_into_a_bomb():
    """A 102-byte 1×4000 PNG with fetch's defaults (keep_ratio, 384), and a 40×20 JPEG with
    --image-size 100000 (a data manifest may set it): both must be refused as too large
    without OpenCV allocating the picture (1.7 GB and 60 GB). Measured under an address-space
    limit, so that today's allocation fails instead of taking the machine's memory."""
    code = f"""
import io, json, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _hostile import jpeg, tall_png
from capfilt.sources.safe_fetch import SafeResizer
def resizer(size):
    return SafeResizer.wrapping(image_size=size, resize_mode="keep_ratio",
                                resize_only_if_bigger=False, encode_quality=95)
default, huge = resizer(384), resizer(100_000)
size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + 512 * 2**20, resource.RLIM_INFINITY))
print(json.dumps([default(io.BytesIO(tall_png()))[-1], huge(io.BytesIO(jpeg()))[-1]]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for error in errors:
        assert error and "too large" in error, errors


# --- fetch -----------------------------------------------------------------------------------
def test_fetch_turns_hostile_images_into_rows(tmp_path):
    from capfilt.stages.fetch import FetchOptions, fetch

    routes = {f"/{e.name}.jpg": (lambda p, e=e: p.body(_bytes(e))) for e in IMAGES}
    routes.update({f"/{c.name}.jpg": lambda p: p.body(GOOD) for c in CAPTIONS})
    with hostile_server("127.0.0.1", routes) as (base, _):
        listed = [(f"{base}/{e.name}.jpg", e.name.encode()) for e in IMAGES]
        listed += [(f"{base}/{c.name}.jpg", c.raw) for c in CAPTIONS]
        url_list = tmp_path / "urls.csv"
        url_list.write_bytes(caption_csv(listed, "url"))
        options = FetchOptions(resize_mode="no", threads=4, allow_private_addresses=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fetch(str(url_list), str(tmp_path / "ds"), options)
    assert not [str(w.message) for w in caught if _ours(w)]
    assert result.complete and result.rows_in_images == len(listed)
    rows = _rows_by_name(tmp_path / "ds")
    _check_image_rows(rows)
    _check_caption_rows(rows)
    source = Dataset(str(tmp_path / "ds")).read_manifest()["source"]
    assert source["invalid_utf8_values"] == INVALID_UTF8_CAPTIONS
    assert len(read_images(tmp_path / "ds")) == len(listed)  # nothing dropped
    _nothing_escaped(tmp_path, Path.cwd())
    exercised("image", "fetch", [e.name for e in IMAGES])
    exercised("caption", "fetch", [c.name for c in CAPTIONS])


# --- ingest ----------------------------------------------------------------------------------
def test_ingest_turns_hostile_files_into_rows(tmp_path):
    from capfilt.stages.ingest import IngestOptions, ingest

    folder = tmp_path / "src"
    folder.mkdir()
    listed = []
    for entry in IMAGES:
        (folder / f"{entry.name}.img").write_bytes(_bytes(entry))
        listed.append((f"{entry.name}.img", entry.name.encode()))
    for caption in CAPTIONS:
        (folder / f"{caption.name}.jpg").write_bytes(GOOD)
        listed.append((f"{caption.name}.jpg", caption.raw))
    (folder / "captions.csv").write_bytes(caption_csv(listed, "file_name"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ingest(str(folder), str(tmp_path / "ds"), IngestOptions(resize_mode="no"))
    assert not [str(w.message) for w in caught if _ours(w)]
    assert result.rows == len(listed) and result.counts["count"] == len(listed)
    rows = _rows_by_name(tmp_path / "ds")
    _check_image_rows(rows)
    _check_caption_rows(rows)
    manifest = Dataset(str(tmp_path / "ds")).read_manifest()
    assert manifest["source"]["invalid_utf8_values"] == INVALID_UTF8_CAPTIONS
    _nothing_escaped(tmp_path, Path.cwd())
    exercised("image", "ingest", [e.name for e in IMAGES])
    exercised("caption", "ingest", [c.name for c in CAPTIONS])


# --- caption, filter, query, report and export-data over one dataset ---------------------------
def _invoke(*args: str):
    from typer.testing import CliRunner

    from capfilt.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "2000"})
    assert result.exit_code == 0, (args[0], result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def hostile_dataset(tmp_path_factory, tiny_captioner, tiny_filter):
    """images/ whose rows all say success but hold hostile bytes (the bomb too), with hostile
    web captions (as if another tool had written them); then caption, filter at threshold 0
    (every scored pair is kept), report, export-data and query, each run once over it."""
    import pyarrow as pa

    from capfilt.stages.caption import CaptionOptions, caption_dataset
    from capfilt.stages.filter import FilterOptions, filter_dataset

    entries = [(e.name, _bytes(e), e.name) for e in IMAGES]
    entries += [(c.name, GOOD, c.expected) for c in CAPTIONS]
    entries.append(("caption_blank", GOOD, ""))
    rows = [
        images_row(f"{i:09d}", caption, jpg=data) for i, (_, data, caption) in enumerate(entries)
    ]
    root = tmp_path_factory.mktemp("hostile") / "ds"
    Dataset(str(root)).write_shard("images", 0, pa.Table.from_pylist(rows, schema=images_schema()))
    names = {r["key"]: name for r, (name, _, _) in zip(rows, entries, strict=True)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caption_dataset(
            str(root),
            CaptionOptions(
                model=str(tiny_captioner), device="cpu", num_workers=0, batch_size=8, max_length=8
            ),
            progress=False,
        )
        filter_dataset(
            str(root),
            FilterOptions(
                threshold=0.0, model=str(tiny_filter), device="cpu", num_workers=0, batch_size=8
            ),
            progress=False,
        )
    out = root.parent / "wds"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        report = _invoke("report", str(root), "--examples", "200", "--threshold", "0")
    outputs = {
        "model_warnings": [str(w.message) for w in caught if _ours(w)],
        "report_warnings": [str(w.message) for w in shown if _ours(w)],
        "report": report,
        "export": _invoke("export-data", str(root), "--format", "webdataset", "--out", str(out)),
        "query": _invoke(
            "query", str(root), "select key, caption, status from images", "-f", "json"
        ),
    }
    return root, names, out, outputs


def _ours(warning) -> bool:
    """A warning about the images (PIL's), not about the libraries' versions."""
    return "PIL" in warning.filename


def _by_name(root: Path, names: dict, stage: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in Dataset(str(root)).read_stage(stage).to_pylist():
        found.setdefault(names[row["key"]], []).append(row)
    return found


def test_caption_gives_undecodable_images_an_error_row(hostile_dataset):
    root, names, _, outputs = hostile_dataset
    assert not outputs["model_warnings"]  # a damaged file is a row, not a warning on screen
    by_name = _by_name(root, names, "captions")
    assert set(by_name) == set(names.values())  # one row per image, none dropped
    assert all(len(rows) == 1 for rows in by_name.values())
    for entry in IMAGES:
        row = by_name[entry.name][0]
        if entry.decodes:
            assert row["status"] == "success" and isinstance(row["text"], str), row
        else:
            assert row["status"] == "error" and row["text"] is None, row
            assert IMAGE_ERRORS[entry.name] in row["error_message"]
    exercised("image", "caption", [e.name for e in IMAGES])


def test_filter_scores_odd_captions_and_skips_undecodable_images(hostile_dataset):
    root, names, _, _ = hostile_dataset
    scores = _by_name(root, names, "scores")
    web = {name: [r for r in rows if r["source"] == "web"] for name, rows in scores.items()}
    assert set(web) == set(names.values()) and all(len(r) == 1 for r in web.values())
    web = {name: rows[0] for name, rows in web.items()}
    for entry in IMAGES:
        assert (web[entry.name]["itm_score"] is None) is (not entry.decodes), entry.name
        synthetic = [r for r in scores[entry.name] if r["source"] == "synthetic"]
        assert len(synthetic) == (1 if entry.decodes else 0), entry.name
    # A 100,000-character caption is cut to BLIP's text window, not a crash, and kept whole in
    # scores/; emoji, U+FFFD, controls, RTL overrides, markup, newlines and a blank caption
    # are scored like any text; a missing caption gets no score.
    for caption in CAPTIONS:
        row = web[caption.name]
        assert row["text"] == caption.expected, caption.name
        if caption.expected is None:
            assert row["itm_score"] is None
        else:
            assert 0.0 <= row["itm_score"] <= 1.0, row
    assert 0.0 <= web["caption_blank"]["itm_score"] <= 1.0
    exercised("image", "filter", [e.name for e in IMAGES])
    exercised("caption", "filter", [c.name for c in CAPTIONS])


def test_query_returns_every_row_once_as_written(hostile_dataset):
    root, names, _, outputs = hostile_dataset
    rows = [json.loads(line) for line in outputs["query"].output.splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(names)  # every row, once
    by_name = {names[r["key"]]: r for r in rows}
    for entry in IMAGES:
        assert by_name[entry.name]["caption"] == entry.name
    for caption in CAPTIONS:
        assert by_name[caption.name]["caption"] == caption.expected, caption.name
    # A caption that reads as SQL is data: the table it names is still there.
    count = _invoke("query", str(root), "select count(*) as n from images", "-f", "csv")
    assert count.output.split() == ["n", str(len(names))]
    exercised("image", "query", [e.name for e in IMAGES])
    exercised("caption", "query", [c.name for c in CAPTIONS])


def _report_examples(page: str) -> dict[str, list[str | None]]:
    """The report's examples: alt text (the web caption, unescaped) → thumbnails (data URIs)."""
    found: dict[str, list[str | None]] = {}
    for match in re.finditer(r'<img src="(data:image/jpeg;base64,[^"]*)" alt="([^"]*)"', page):
        found.setdefault(html.unescape(match.group(2)), []).append(match.group(1))
    return found


def _thumbnail(uri: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def test_report_escapes_captions_and_shows_each_image(hostile_dataset):
    root, names, _, outputs = hostile_dataset
    assert "Traceback" not in outputs["report"].output
    page = next(root.glob("reports/gen-*/report.html")).read_bytes().decode()
    summary = json.loads(next(root.glob("reports/gen-*/summary.json")).read_text())
    assert summary["stages"]["images"]["rows"] == len(names)
    # Markup in a caption is text: the page holds no element a caption brought in.
    assert "<script" not in page and "<img src=x" not in page
    assert html.escape(HTML_CAPTION, quote=True) in page
    examples = _report_examples(page)
    for caption in CAPTIONS:
        if caption.expected and len(caption.expected) < 1000:
            # as written, control characters shown as \xNN (core/text.py), as in the terminal
            shown = html.escape(printable(caption.expected), quote=True)
            assert shown in page, caption.name
    for entry in IMAGES:  # a kept web pair of each decodable image, with its thumbnail
        if entry.decodes:
            assert examples.get(entry.name), entry.name
        else:
            assert entry.name not in examples  # never scored, so never an example
    exercised("image", "report", [e.name for e in IMAGES])
    exercised("caption", "report", [c.name for c in CAPTIONS])


def test_report_html_holds_no_control_characters(hostile_dataset):
    root, _, _, _ = hostile_dataset
    page = next(root.glob("reports/gen-*/report.html")).read_bytes().decode()
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", page)


def test_report_thumbnails_show_what_the_model_saw(hostile_dataset):
    root, _, _, outputs = hostile_dataset
    assert not outputs["report_warnings"]
    examples = _report_examples(next(root.glob("reports/gen-*/report.html")).read_bytes().decode())
    wrong = []
    for entry in HOSTILE:
        if not entry.decodes:
            continue
        thumbnail = _thumbnail(examples[entry.name][0])
        width, height = thumbnail.size
        x, y, colour = entry.probe
        upright = (width >= height) == (entry.size[0] >= entry.size[1])
        got = thumbnail.getpixel((x * width // entry.size[0], y * height // entry.size[1]))
        if not (upright and close(got, colour, 60)):
            wrong.append((entry.name, thumbnail.size, got))
    assert not wrong


def test_export_data_writes_each_kept_pair_as_written(hostile_dataset):
    root, names, out, _ = hostile_dataset
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                stem, ext = member.name.rsplit(".", 1)
                samples.setdefault(stem, {})[ext] = tar.extractfile(member).read()
    web = {names[stem.split("_")[0]]: s for stem, s in samples.items() if stem.endswith("_0")}
    for entry in IMAGES:
        if entry.decodes:
            assert web[entry.name]["jpg"] == entry.data  # the bytes as fetched, untouched
            assert web[entry.name]["txt"] == entry.name.encode()
        else:
            assert entry.name not in web
    for caption in CAPTIONS:
        if caption.expected is None:
            assert caption.name not in web
        else:
            assert web[caption.name]["txt"] == caption.expected.encode(), caption.name
            assert json.loads(web[caption.name]["json"])["text"] == caption.expected
    _nothing_escaped(out, root)
    exercised("image", "export-data", [e.name for e in IMAGES])
    exercised("caption", "export-data", [c.name for c in CAPTIONS])


def test_the_caption_kinds_cover_the_registry():
    assert names_through("caption", "fetch") == {c.name for c in CAPTIONS}


# --- model checkpoints -----------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def pickled_checkpoint(tmp_path, tiny_captioner):
    """The tiny captioner with its safetensors replaced by a pickle that would run code."""
    import pickle
    import shutil

    marker = tmp_path / "pickle-ran"
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_captioner, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return folder, marker


def test_every_command_that_loads_weights_refuses_pickles(pickled_checkpoint, tmp_path):
    from conftest import write_images_dataset
    from typer.testing import CliRunner

    from capfilt.cli import app

    folder, marker = pickled_checkpoint
    ds = tmp_path / "ds"
    write_images_dataset(ds, n_shards=1, per_shard=3)
    runner = CliRunner()
    for args in (
        ["caption", str(ds), "--model", str(folder)],
        ["filter", str(ds), "--threshold", "0.5", "--model", str(folder)],
        ["pretrain", str(ds), "--out", str(tmp_path / "run"), "--init", str(folder)],
        ["finetune", str(ds), "--out", str(tmp_path / "ft"), "--init", str(folder)],
    ):
        result = runner.invoke(app, [*args, "--num-workers", "0"] if "train" in args[0] else args)
        assert result.exit_code == 2, (args[0], result.output, result.exception)
        assert "only pickled weights" in result.output and "safetensors" in result.output
        assert "Traceback" not in result.output
    assert not marker.exists()


def test_remote_code_in_a_checkpoint_is_never_run(tmp_path, tiny_captioner):
    import shutil

    from conftest import write_images_dataset
    from typer.testing import CliRunner

    from capfilt.cli import app

    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "remote"
    shutil.copytree(tiny_captioner, folder)
    (folder / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BlipForConditionalGeneration as EvilBlip\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoModel": "modeling_evil.EvilBlip",
        "AutoModelForVision2Seq": "modeling_evil.EvilBlip",
    }
    (folder / "config.json").write_text(json.dumps(config))
    ds = tmp_path / "ds"
    write_images_dataset(ds, n_shards=1, per_shard=2)
    result = CliRunner().invoke(
        app, ["caption", str(ds), "--model", str(folder), "--workers", "0", "--max-length", "6"]
    )
    assert result.exit_code == 0, result.output
    assert not marker.exists()
