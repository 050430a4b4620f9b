"""The dataset folder: shard discovery, atomic writes, fingerprints, generations, the manifest."""

from __future__ import annotations

import json
import multiprocessing as mp

import pyarrow as pa
import pytest

from capfilt.core import parquet
from capfilt.core.errors import CapfiltError, StageNotRunError
from capfilt.core.layout import Dataset
from capfilt.core.parquet import CAPTIONS_SCHEMA, rows_to_table


def _captions(n: int) -> pa.Table:
    rows = [
        dict(key=f"{i:09d}", caption_id=0, text="a red circle", model="m", status="success")
        for i in range(n)
    ]
    return rows_to_table(rows, CAPTIONS_SCHEMA)


def test_shards_lists_only_complete_files(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    ds.write_shard("captions", 3, _captions(2))
    ds.write_shard("captions", 0, _captions(1))
    folder = tmp_path / "ds" / "captions"
    (folder / ".00001.parquet.tmp-deadbeef").write_bytes(b"partial")
    (folder / "00002_stats.json").write_text("{}")
    (folder / "notes.txt").write_text("x")
    assert ds.shards("captions") == [0, 3]
    assert ds.read_shard("captions", 3).num_rows == 2
    ds.remove_temp_files("captions")
    assert not (folder / ".00001.parquet.tmp-deadbeef").exists()


def test_failed_write_leaves_no_file(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))

    with pytest.raises((TypeError, AttributeError)):
        ds.write_shard("captions", 0, "not a table")
    assert ds.shards("captions") == []
    assert [p.name for p in (tmp_path / "ds" / "captions").iterdir()] == []


def test_a_generation_is_switched_in_whole_and_the_one_before_is_kept(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.current_generation("curated") == 0 and ds.shards("curated") == []
    for generation, rows in ((1, 1), (2, 2), (3, 3)):
        folder = ds.generation_folder("curated", generation)
        ds.fs.makedirs(folder.path, exist_ok=True)
        for shard in (0, 1):
            parquet.write_table_atomic(ds.fs, folder.shard_path(shard), _captions(rows))
        pinned = ds.folder("curated")  # a reader that resolved the folder before the switch
        ds.switch_generation("curated", generation, {"options": {"threshold": rows / 10}})
        assert pinned.generation == generation - 1
        assert ds.folder("curated").generation == generation
        assert ds.read_stage("curated").num_rows == 2 * rows
    # The generation replaced last stays for readers still on it; older ones are gone.
    assert ds.generations("curated") == [2, 3]
    assert ds.folder("curated").record["options"] == {"threshold": 0.3}


def test_a_written_file_carries_a_unique_fingerprint(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    table = _captions(2)
    first = parquet.write_table_atomic(ds.fs, str(tmp_path / "a.parquet"), table)
    second = parquet.write_table_atomic(ds.fs, str(tmp_path / "b.parquet"), table)
    assert first != second  # the same rows written twice are two writes
    assert parquet.file_fingerprint(ds.fs, str(tmp_path / "a.parquet")) == first
    read, fingerprint = parquet.read_table_and_fingerprint(ds.fs, str(tmp_path / "b.parquet"))
    assert fingerprint == second and read.num_rows == 2
    assert parquet.file_fingerprint(ds.fs, str(tmp_path / "missing.parquet")) is None


def test_require_stage_names_the_missing_stage(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    with pytest.raises(StageNotRunError, match="scores/"):
        ds.require_stage("scores", "run `capfilt filter` first")


def test_manifest_records_runs_and_rejects_garbage(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    ds.set_source({"kind": "test"})
    ds.record_run("caption", {"top_p": 0.9}, {"images": 3})
    manifest = json.loads((tmp_path / "ds" / "capfilt.json").read_text())
    assert manifest["source"] == {"kind": "test"}
    assert manifest["runs"][0]["stage"] == "caption"
    assert manifest["runs"][0]["counts"] == {"images": 3}
    assert "torch" in manifest["runs"][0]["versions"]
    (tmp_path / "ds" / "capfilt.json").write_text("{not json")
    with pytest.raises(CapfiltError, match="not valid JSON"):
        ds.read_manifest()


def _append(root: str, i: int) -> None:
    Dataset(root).record_run("caption", {"i": i}, {})


def test_manifest_updates_from_many_processes_are_all_kept(tmp_path):
    root = str(tmp_path / "ds")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(root, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    runs = Dataset(root).read_manifest()["runs"]
    assert sorted(r["options"]["i"] for r in runs) == [0, 1, 2, 3]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CapfiltError, match="cannot write"):
        Dataset(str(blocker / "ds")).ensure_writable()


def test_a_killed_manifest_writer_leaves_nothing_behind_after_the_next_run(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    ds.record_run("caption", {}, {"images": 1})
    # What a writer killed between writing its temp file and renaming it leaves.
    stale = tmp_path / "ds" / ".capfilt.json.tmp-deadbeef"
    stale.write_text('{"runs": [')
    other = tmp_path / "ds" / ".notes.tmp-1"
    other.write_text("not ours")
    ds.record_run("filter", {}, {"images": 1})
    assert not stale.exists() and other.exists()
    assert [r["stage"] for r in ds.read_manifest()["runs"]] == ["caption", "filter"]


def test_a_dataset_written_before_keeps_its_provenance_and_stats(tmp_path):
    """Datasets written before the metadata moved to hidden folders: _provenance/ and
    NNNNN_stats.json are still read, and removing a shard removes them too."""
    from capfilt.core import provenance

    ds = Dataset(str(tmp_path / "ds"))
    ds.write_shard("captions", 0, _captions(2))
    folder = ds.folder("captions")
    entry = provenance.Provenance(
        stage="caption", shard=0, file="sha256:x", options={}, inputs={}, run="r", rows=2
    )
    provenance.write(folder, 0, entry)
    root = tmp_path / "ds" / "captions"
    (root / ".provenance").rename(root / "_provenance")
    assert provenance.read(folder, 0).run == "r"
    (tmp_path / "ds" / "images").mkdir()
    (tmp_path / "ds" / "images" / "00000_stats.json").write_text('{"count": 3}')
    assert ds.stats_path("images", 0).endswith("images/00000_stats.json")
    assert ds.stats_path("images", 1).endswith("images/.stats/00001.json")
    folder.remove_shard(0)
    assert not (root / "_provenance" / "00000.json").exists()
    assert provenance.read(folder, 0) is None
