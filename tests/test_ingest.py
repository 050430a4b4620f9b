"""capfilt ingest: image folders with captions files, COCO and BLIP annotation JSON."""

from __future__ import annotations

import json

import pytest
from _web import read_images
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.layout import Dataset
from capfilt.demo import toyweb
from capfilt.stages.ingest import IngestOptions, ingest


@pytest.fixture
def folder(tmp_path):
    """Four toy images (48 px), one file that is not an image, one named but missing."""
    pairs = toyweb.generate(4, 0.0, seed=5, image_size=48)
    images = toyweb.write_images(pairs, tmp_path / "src")
    (images / "broken.jpg").write_bytes(b"GIF89a not really")
    return images, pairs


def _by_url(rows):
    return {r["url"].rsplit("/", 1)[-1]: r for r in rows}


def test_folder_with_captions_file(folder, tmp_path):
    images, pairs = folder
    lines = ["file_name,caption,source_id"]
    lines += [f"{p.name},{p.true_caption},{i}" for i, p in enumerate(pairs)]
    lines += ["broken.jpg,a broken file,10", "gone.jpg,a missing file,11"]
    (images / "captions.csv").write_text("\n".join(lines) + "\n")
    result = ingest(str(images), str(tmp_path / "ds"), IngestOptions(image_size=32))
    assert result.kind == "captions_file" and result.rows == 6
    assert result.counts == {
        "count": 6,
        "successes": 4,
        "failed_to_download": 1,
        "failed_to_resize": 1,
    }
    rows = _by_url(read_images(tmp_path / "ds"))
    for i, p in enumerate(pairs):
        row = rows[p.name]
        assert row["status"] == "success" and row["caption"] == p.true_caption
        assert (row["width"], row["height"], row["original_width"]) == (32, 32, 48)
        assert row["source_id"] == i and len(row["sha256"]) == 64
    assert rows["broken.jpg"]["status"] == "failed_to_resize"
    assert "decod" in rows["broken.jpg"]["error_message"]
    assert rows["gone.jpg"]["status"] == "failed_to_download"
    assert "cannot read file" in rows["gone.jpg"]["error_message"]
    jpg = Dataset(str(tmp_path / "ds")).read_stage("images").column("jpg").to_pylist()
    assert sum(b is not None and b[:2] == b"\xff\xd8" for b in jpg) == 4


def test_folder_without_captions_gives_uncaptioned_rows(folder, tmp_path):
    images, pairs = folder
    result = ingest(str(images), str(tmp_path / "ds"), IngestOptions(image_size=32))
    assert result.kind == "folder" and result.rows == 5
    rows = read_images(tmp_path / "ds")
    assert all(r["caption"] is None for r in rows)
    assert sorted(r["status"] for r in rows) == ["failed_to_resize"] + ["success"] * 4


def test_coco_annotation_json(folder, tmp_path):
    images, pairs = folder
    annotation = {
        "images": [
            {"id": 1, "file_name": pairs[0].name},
            {"id": 2, "file_name": pairs[1].name},
            {"id": 3, "file_name": pairs[2].name},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "first caption"},
            {"id": 11, "image_id": 1, "caption": "second caption"},
            {"id": 12, "image_id": 2, "caption": "only caption"},
            {"id": 13, "image_id": 99, "caption": "of an image nobody listed"},
        ],
    }
    path = tmp_path / "captions_train.json"
    path.write_text(json.dumps(annotation))
    result = ingest(
        str(path), str(tmp_path / "ds"), IngestOptions(image_root=str(images), image_size=32)
    )
    assert result.kind == "coco" and result.rows == 5
    rows = sorted(read_images(tmp_path / "ds"), key=lambda r: r["key"])
    assert [(r["image_id"], r["annotation_id"], r["caption"], r["status"]) for r in rows] == [
        (1, 10, "first caption", "success"),
        (1, 11, "second caption", "success"),
        (2, 12, "only caption", "success"),
        (99, 13, "of an image nobody listed", "failed_to_download"),
        (3, None, None, "success"),  # an image without captions is kept, to be captioned
    ]
    assert "image id 99" in rows[3]["error_message"]


def test_blip_annotation_list_and_shards(folder, tmp_path):
    images, pairs = folder
    entries = [
        {
            "image": f"src/images/{p.name}",
            "caption": [p.true_caption, "another one"],
            "image_id": f"toy_{i}",
        }
        for i, p in enumerate(pairs)
    ]
    path = tmp_path / "blip.json"
    path.write_text(json.dumps(entries))
    ds = tmp_path / "ds"
    result = ingest(str(path), str(ds), IngestOptions(image_size=32, shard_size=3))
    assert result.kind == "blip_json" and result.rows == 8
    dataset = Dataset(str(ds))
    assert dataset.shards("images") == [0, 1, 2]
    rows = read_images(ds)
    assert sorted(r["key"] for r in rows) == [
        "000000",
        "000001",
        "000002",
        "000010",
        "000011",
        "000012",
        "000020",
        "000021",
    ]
    assert {r["image_id"] for r in rows} == {f"toy_{i}" for i in range(4)}
    assert all(r["status"] == "success" for r in rows)

    # Resume: only the missing shard is written again, no row twice.
    (ds / "images" / "00001.parquet").unlink()
    again = ingest(str(path), str(ds), IngestOptions(image_size=32, shard_size=3))
    assert again.shards_done_now == [1] and again.shards_skipped == [0, 2]
    assert sorted(r["key"] for r in read_images(ds)) == sorted(r["key"] for r in rows)
    runs = dataset.read_manifest()["runs"]
    assert [r["stage"] for r in runs] == ["ingest", "ingest"]
    assert dataset.read_manifest()["source"]["kind"] == "blip_json"


def test_ingested_and_fetched_rows_share_the_schema(folder, tmp_path):
    images, _ = folder
    ingest(str(images), str(tmp_path / "ds"), IngestOptions(image_size=32))
    names = Dataset(str(tmp_path / "ds")).read_stage("images").column_names
    for column in (
        "key",
        "url",
        "caption",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
        "jpg",
    ):
        assert column in names


def _fails_cleanly(args, *needles):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text


def test_cli_ingest_and_its_errors(folder, tmp_path):
    images, pairs = folder
    ds = str(tmp_path / "ds")
    _fails_cleanly(["ingest", str(tmp_path / "nothing"), ds], "not found")
    (tmp_path / "bad.csv").write_text("name,text\na.jpg,hello\n")
    _fails_cleanly(["ingest", str(tmp_path / "bad.csv"), ds], "no file-name column", "--file-col")
    _fails_cleanly(
        ["ingest", str(tmp_path / "bad.csv"), ds, "--file-col", "name"], "no column 'caption'"
    )
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    _fails_cleanly(["ingest", str(tmp_path / "bad.json"), ds], "neither COCO-style")
    (tmp_path / "empty").mkdir()
    _fails_cleanly(["ingest", str(tmp_path / "empty"), ds], "nothing to ingest")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails_cleanly(["ingest", str(images), str(a_file / "ds")], "cannot write")

    (tmp_path / "caps.jsonl").write_text(
        "".join(json.dumps({"image": p.name, "caption": p.caption}) + "\n" for p in pairs[:2])
    )
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            str(tmp_path / "caps.jsonl"),
            ds,
            "--image-root",
            str(images),
            "--image-size",
            "24",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 ok (100.0%)" in result.output
    assert {r["width"] for r in read_images(tmp_path / "ds")} == {24}
    _fails_cleanly(["ingest", str(images), ds], "--overwrite")
