"""capfilt export-data: each format opened by its own library (pyarrow, webdataset, datasets)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _report_fixtures import write_scored_dataset
from PIL import Image
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet as capfilt_io
from capfilt.core.errors import CapfiltError, StageNotRunError
from capfilt.core.layout import Dataset
from capfilt.stages.export_data import export_data


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return write_scored_dataset(tmp_path_factory.mktemp("export") / "ds")


@pytest.fixture(scope="module")
def image_bytes(scored):
    table = Dataset(scored.root).read_stage("images", ["key", "jpg"])
    return dict(zip(table.column("key").to_pylist(), table.column("jpg").to_pylist(), strict=True))


@pytest.fixture(scope="module")
def curated_texts(scored):
    rows = Dataset(scored.root).read_stage("curated").to_pylist()
    return {(r["key"], r["text_id"]): r for r in rows}


def test_parquet_export_is_self_contained(scored, image_bytes, curated_texts, tmp_path):
    out = tmp_path / "pq"
    result = export_data(Dataset(scored.root), "parquet", str(out))
    names = sorted(p.name for p in out.iterdir())
    assert names == [".provenance", "00000.parquet", "00001.parquet", "_capfilt_export.json"]
    table = pq.read_table(out)  # pyarrow skips the _ names
    assert table.column_names == [
        "key",
        "text_id",
        "text",
        "source",
        "itm_score",
        "jpg",
        "width",
        "height",
    ]
    rows = table.to_pylist()
    assert sorted((r["key"], r["text_id"], r["source"]) for r in rows) == scored.kept(0.5)
    assert result.pairs == len(rows) == len(curated_texts)
    assert result.images == len({r["key"] for r in rows}) and result.missing_images == []
    for row in rows:
        assert row["jpg"] == image_bytes[row["key"]]
        assert row["text"] == curated_texts[(row["key"], row["text_id"])]["text"]
        assert Image.open(io.BytesIO(row["jpg"])).size == (row["width"], row["height"]) == (96, 96)
        assert row["itm_score"] >= 0.5


def test_webdataset_export_reads_with_webdataset(scored, image_bytes, curated_texts, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    result = export_data(Dataset(scored.root), "webdataset", str(out))
    shards = sorted(str(p) for p in out.glob("*.tar"))
    assert len(shards) == result.shards == 2
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert len(samples) == result.pairs == len(curated_texts)
    seen = set()
    for sample in samples:
        meta = json.loads(sample["json"])
        pair = (meta["key"], meta["text_id"])
        seen.add(pair)
        assert sample["__key__"] == f"{meta['key']}_{meta['text_id']}"
        assert sample["txt"].decode() == meta["text"] == curated_texts[pair]["text"]
        assert sample["jpg"] == image_bytes[meta["key"]]
        assert meta["source"] == curated_texts[pair]["source"]
        assert meta["url"].startswith("http://") and len(meta["sha256"]) == 64
    assert seen == set(curated_texts)
    decoded = next(iter(wds.WebDataset(shards, shardshuffle=False).decode("pil")))
    assert decoded["jpg"].size == (96, 96)


def test_hf_export_loads_with_datasets(scored, curated_texts, tmp_path):
    import datasets

    out = tmp_path / "hf"
    result = export_data(Dataset(scored.root), "hf", str(out))
    loaded = datasets.load_from_disk(str(out))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert len(loaded) == result.pairs == len(curated_texts)
    first = loaded[0]
    assert first["image"].size == (96, 96)
    assert first["text"] == curated_texts[(first["key"], first["text_id"])]["text"]
    assert {(k, t) for k, t in zip(loaded["key"], loaded["text_id"], strict=True)} == set(
        curated_texts
    )


def test_export_never_deletes_what_capfilt_did_not_write(scored, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(CapfiltError, match="not written by capfilt export-data"):
            export_data(Dataset(scored.root), "parquet", str(out), overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"
    ds = Dataset(scored.root)
    for inside in (scored.root, str(Path(scored.root) / "curated"), str(Path(scored.root) / "x")):
        with pytest.raises(CapfiltError, match="inside the dataset"):
            export_data(ds, "parquet", inside, overwrite=True)
    with pytest.raises(CapfiltError, match="inside the dataset"):
        export_data(ds, "parquet", str(Path(scored.root).parent), overwrite=True)
    assert ds.shards("curated") == [0, 1] and ds.shards("images") == [0, 1]


def test_an_earlier_export_is_replaced_whole_only_with_overwrite(scored, tmp_path):
    out = tmp_path / "wds"
    first = export_data(Dataset(scored.root), "webdataset", str(out))
    marker = json.loads((out / "_capfilt_export.json").read_text())
    assert marker["format"] == "webdataset" and marker["pairs"] == first.pairs
    # The same export again: up to date, nothing rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = export_data(Dataset(scored.root), "webdataset", str(out))
    assert again.pairs == first.pairs
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    # Another format into the same folder: refused without --overwrite, replaced with it.
    with pytest.raises(CapfiltError, match="--overwrite"):
        export_data(Dataset(scored.root), "parquet", str(out))
    export_data(Dataset(scored.root), "parquet", str(out), overwrite=True)
    assert sorted(p.suffix for p in out.iterdir() if p.is_file()) == [
        ".json",
        ".parquet",
        ".parquet",
    ]
    assert not list(tmp_path.glob(".wds.capfilt-export*"))  # no staging left beside it
    # A file of the user's inside an export is never deleted.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CapfiltError, match="did not write"):
        export_data(Dataset(scored.root), "webdataset", str(out), overwrite=True)
    assert (out / "notes.txt").exists()


def test_export_needs_curated(images_dataset, tmp_path):
    with pytest.raises(StageNotRunError, match="capfilt filter"):
        export_data(Dataset(str(images_dataset)), "parquet", str(tmp_path / "out"))


def test_pairs_without_image_bytes_are_reported_not_exported(tmp_path):
    scored = write_scored_dataset(tmp_path / "ds", stages=("scores", "curated"))
    ds = Dataset(scored.root)
    curated = ds.read_shard("curated", 0)
    orphan = capfilt_io.rows_to_table(
        [dict(key="999999999", text_id=0, source="web", text="lost", itm_score=0.9)],
        capfilt_io.CURATED_SCHEMA,
    )
    ds.write_shard("curated", 0, pa.concat_tables([curated, orphan]))
    result = export_data(ds, "webdataset", str(tmp_path / "wds"))
    assert result.missing_images == ["999999999"]
    assert result.pairs == curated.num_rows + ds.read_shard("curated", 1).num_rows


def test_cli_export_data(scored, tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(
        app, ["export-data", scored.root, "--format", "parquet", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"exported {len(scored.kept(0.5))} pairs" in result.output
    bad = runner.invoke(app, ["export-data", scored.root, "--format", "zip", "--out", str(out)])
    assert bad.exit_code == 2 and "--format" in bad.output and "zip" in bad.output
    runs = Dataset(scored.root).read_manifest()["runs"]
    assert runs[-1]["stage"] == "export-data" and runs[-1]["options"]["format"] == "parquet"


def test_a_switch_killed_between_its_renames_is_finished_by_the_next_run(scored, tmp_path):
    out = tmp_path / "out"
    export_data(Dataset(scored.root), "parquet", str(out))
    export_data(Dataset(scored.root), "webdataset", str(tmp_path / "new"))
    # Killed after the earlier export was moved aside and before the new one was moved in:
    out.rename(tmp_path / ".out.capfilt-export-old")
    (tmp_path / "new").rename(tmp_path / ".out.capfilt-export")
    result = export_data(Dataset(scored.root), "webdataset", str(out))
    assert result.format == "webdataset" and list(out.glob("*.tar"))

    def beside() -> list[str]:  # the lock files of each --out stay (see core/locks.py)
        return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))

    assert beside() == ["out"]
    # Killed after the new one was moved in, before the earlier one was removed:
    (tmp_path / ".out.capfilt-export-old").mkdir()
    export_data(Dataset(scored.root), "webdataset", str(out))
    assert beside() == ["out"]
