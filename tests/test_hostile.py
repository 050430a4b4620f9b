"""Hostile images and captions through every door: fetch, ingest, and the decoding of caption
and filter. A broken file is an error row with a reason; an odd but valid one (CMYK, 16-bit,
alpha, palette, animated, EXIF-rotated, 1×1) decodes upright and in RGB; a decompression bomb
is refused with bounded memory; odd captions are kept, and scored without a crash.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _hostile import Hostile, close, corpus, decompression_bomb, hostile_server, jpeg
from _web import read_images

from capfilt.core.layout import Dataset
from capfilt.images.decode import decode_image

HOSTILE = corpus()
GOOD = jpeg()
BOMB = Hostile("decompression_bomb", b"", False)  # bytes made on demand: ~1 MB, 0.6 s
LONG_CAPTION = "a red circle on a white background " * 286  # 10,010 characters
# (name, raw caption bytes in the csv, caption expected in images/)
CAPTIONS = [
    ("caption_empty", b"", None),  # an empty csv field is a missing caption
    ("caption_latin1", "café au lait".encode("latin-1"), "caf\ufffd au lait"),
    ("caption_long", LONG_CAPTION.encode(), LONG_CAPTION),
    ("caption_emoji", "🐱🐶🎉".encode(), "🐱🐶🎉"),
]
IMAGE_ERRORS = {
    "zero_bytes": "no image bytes",
    "truncated_jpeg": "cannot decode image",
    "html_as_jpg": "cannot decode image",
    "decompression_bomb": "image too large",
}


def _bytes(entry: Hostile) -> bytes:
    return decompression_bomb() if entry is BOMB else entry.data


def _decoded_jpg(jpg: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(jpg)).convert("RGB")


def _check_image_rows(rows: dict[str, dict]) -> None:
    """Rows named by hostile file: decodable ones upright RGB at their size, the rest errors."""
    for entry in (*HOSTILE, BOMB):
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
    for name, _, expected in CAPTIONS:
        assert rows[name]["status"] == "success"
        assert rows[name]["caption"] == expected, name


def _csv(rows: list[tuple[str, bytes]], first: str) -> bytes:
    """A csv (as bytes, so a caption may hold any bytes) with columns `first`, caption."""
    lines = [f"{first},caption".encode()]
    for value, caption in rows:
        quoted = b'"' + caption.replace(b'"', b'""') + b'"' if caption else b""
        lines.append(value.encode() + b"," + quoted)
    return b"\n".join(lines) + b"\n"


def _rows_by_caption(dataset: Path) -> dict[str, dict]:
    table = Dataset(str(dataset)).read_stage("images")
    rows = table.to_pylist()
    named = {r["caption"]: r for r in rows if r["caption"] in {e.name for e in (*HOSTILE, BOMB)}}
    by_url = {r["url"].rsplit("/", 1)[-1].split(".")[0]: r for r in rows}
    named.update({name: by_url[name] for name, _, _ in CAPTIONS})
    return named


# --- decoding for caption and filter ---------------------------------------------------------
@pytest.mark.parametrize("entry", HOSTILE, ids=[e.name for e in HOSTILE])
def test_decode_image(entry):
    decoded = decode_image(entry.data)
    assert decoded.ok is entry.decodes, decoded.error
    if entry.decodes:
        assert decoded.image.mode == "RGB" and decoded.image.size == entry.size
        x, y, colour = entry.probe
        assert close(decoded.image.getpixel((x, y)), colour)
    else:
        assert decoded.error and decoded.image is None


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


# --- fetch -----------------------------------------------------------------------------------
def test_fetch_turns_hostile_images_into_rows(tmp_path):
    from capfilt.stages.fetch import FetchOptions, fetch

    routes = {f"/{e.name}.jpg": (lambda p, e=e: p.body(_bytes(e))) for e in (*HOSTILE, BOMB)}
    routes.update({f"/{name}.jpg": lambda p: p.body(GOOD) for name, _, _ in CAPTIONS})
    with hostile_server("127.0.0.1", routes) as (base, _):
        listed = [(f"{base}/{e.name}.jpg", e.name.encode()) for e in (*HOSTILE, BOMB)]
        listed += [(f"{base}/{name}.jpg", raw) for name, raw, _ in CAPTIONS]
        url_list = tmp_path / "urls.csv"
        url_list.write_bytes(_csv(listed, "url"))
        options = FetchOptions(resize_mode="no", threads=4, allow_private_addresses=True)
        result = fetch(str(url_list), str(tmp_path / "ds"), options)
    assert result.complete and result.rows_in_images == len(listed)
    rows = _rows_by_caption(tmp_path / "ds")
    _check_image_rows(rows)
    _check_caption_rows(rows)
    source = Dataset(str(tmp_path / "ds")).read_manifest()["source"]
    assert source["invalid_utf8_values"] == 1
    assert len(read_images(tmp_path / "ds")) == len(listed)  # nothing dropped


# --- ingest ----------------------------------------------------------------------------------
def test_ingest_turns_hostile_files_into_rows(tmp_path):
    from capfilt.stages.ingest import IngestOptions, ingest

    folder = tmp_path / "src"
    folder.mkdir()
    listed = []
    for entry in (*HOSTILE, BOMB):
        (folder / f"{entry.name}.img").write_bytes(_bytes(entry))
        listed.append((f"{entry.name}.img", entry.name.encode()))
    for name, raw, _ in CAPTIONS:
        (folder / f"{name}.jpg").write_bytes(GOOD)
        listed.append((f"{name}.jpg", raw))
    (folder / "captions.csv").write_bytes(_csv(listed, "file_name"))
    result = ingest(str(folder), str(tmp_path / "ds"), IngestOptions(resize_mode="no"))
    assert result.rows == len(listed) and result.counts["count"] == len(listed)
    rows = _rows_by_caption(tmp_path / "ds")
    _check_image_rows(rows)
    _check_caption_rows(rows)
    assert Dataset(str(tmp_path / "ds")).read_manifest()["source"]["invalid_utf8_values"] == 1


# --- caption and filter ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_dataset(tmp_path_factory):
    """images/ whose rows all say success but hold hostile bytes, with hostile web captions
    (as if another tool had written them)."""
    import pyarrow as pa

    entries = [(e.name, e.data, e.name) for e in HOSTILE]
    entries += [(name, GOOD, expected) for name, _, expected in CAPTIONS]
    entries.append(("caption_blank", GOOD, ""))
    rows = [
        dict(
            key=f"{i:09d}",
            url=f"http://example.com/{name}",
            caption=caption,
            status="success",
            error_message=None,
            jpg=data,
        )
        for i, (name, data, caption) in enumerate(entries)
    ]
    root = tmp_path_factory.mktemp("hostile") / "ds"
    Dataset(str(root)).write_shard("images", 0, pa.Table.from_pylist(rows))
    return root, {r["key"]: name for r, (name, _, _) in zip(rows, entries, strict=True)}


def test_caption_gives_undecodable_images_an_error_row(hostile_dataset, tiny_captioner):
    from capfilt.stages.caption import CaptionOptions, caption_dataset

    root, names = hostile_dataset
    config = CaptionOptions(
        model=str(tiny_captioner), device="cpu", num_workers=0, batch_size=8, max_length=8
    )
    caption_dataset(str(root), config, progress=False)
    rows = Dataset(str(root)).read_stage("captions").to_pylist()
    by_name = {names[r["key"]]: r for r in rows}
    assert set(by_name) == set(names.values())  # one row per image, none dropped
    for entry in HOSTILE:
        row = by_name[entry.name]
        if entry.decodes:
            assert row["status"] == "success" and isinstance(row["text"], str), row
        else:
            assert row["status"] == "error" and row["text"] is None and row["error_message"]


def test_filter_scores_odd_captions_and_skips_undecodable_images(hostile_dataset, tiny_filter):
    from capfilt.stages.filter import FilterOptions, filter_dataset

    root, names = hostile_dataset
    config = FilterOptions(
        threshold=0.0, model=str(tiny_filter), device="cpu", num_workers=0, batch_size=8
    )
    filter_dataset(str(root), config, progress=False)
    scores = Dataset(str(root)).read_stage("scores").to_pylist()
    web = {names[r["key"]]: r for r in scores if r["source"] == "web"}
    assert set(web) == set(names.values())
    for entry in HOSTILE:
        assert (web[entry.name]["itm_score"] is None) is (not entry.decodes), entry.name
    # A 10,000-character caption is cut to BLIP's text length, not a crash; emoji, U+FFFD and
    # a blank caption are scored like any text; a missing caption gets no score.
    for name in ("caption_long", "caption_emoji", "caption_latin1", "caption_blank"):
        assert 0.0 <= web[name]["itm_score"] <= 1.0, web[name]
    assert web["caption_long"]["text"] == LONG_CAPTION
    assert web["caption_empty"]["itm_score"] is None


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
