"""DuckDB views over a dataset folder and SQL over them (capfilt/query.py, `capfilt query`)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError, StageNotRunError
from capfilt.core.layout import Dataset
from capfilt.core.sql import connect, missing_stages
from capfilt.stages.query import run_query


def _captions(ds: Dataset, shard: int, keys: list[str]) -> None:
    rows = [
        dict(
            key=k,
            caption_id=0,
            text=f"synthetic {k}",
            model="tiny",
            status="success",
            error_message=None,
        )
        for k in keys
    ]
    ds.write_shard("captions", shard, io.rows_to_table(rows, io.CAPTIONS_SCHEMA))


def test_images_view_counts_rows_and_hides_the_bytes(images_dataset):
    ds = Dataset(str(images_dataset))
    columns, rows = run_query(ds, "select status, count(*) as n from images group by 1 order by 1")
    assert columns == ["status", "n"]
    assert rows == [("failed_to_download", 2), ("success", 10)]
    columns, _ = run_query(ds, "select * from images limit 1")
    assert "jpg" not in columns and "caption" in columns
    columns, rows = run_query(
        ds, "select jpg from images where status = 'success'", with_images=True
    )
    assert columns == ["jpg"] and all(r[0][:2] == b"\xff\xd8" for r in rows)


def test_views_exist_only_for_stages_that_ran(images_dataset):
    ds = Dataset(str(images_dataset))
    tables = {
        r[0]
        for r in connect(ds)
        .execute("select view_name from duckdb_views() where not internal")
        .fetchall()
    }
    assert tables == {"images"}
    _captions(ds, 0, ["000000000", "000000001"])
    _captions(ds, 1, ["000010000"])
    columns, rows = run_query(
        ds, "select count(*) from captions c join images i using (key) where i.status = 'success'"
    )
    assert rows == [(3,)]


def test_query_of_a_stage_not_run_says_which_command_to_run(images_dataset):
    ds = Dataset(str(images_dataset))
    assert missing_stages("select * from scores join curated using (key)", ds) == [
        "scores",
        "curated",
    ]
    with pytest.raises(StageNotRunError, match="capfilt caption"):
        run_query(ds, "select * from captions")
    with pytest.raises(StageNotRunError, match="capfilt filter"):
        run_query(ds, "select count(*) from scores")


def test_query_errors_are_capfilt_errors(images_dataset, tmp_path):
    ds = Dataset(str(images_dataset))
    with pytest.raises(CapfiltError, match="query failed"):
        run_query(ds, "selec nothing")
    with pytest.raises(CapfiltError, match="query failed"):
        run_query(ds, "select no_such_column from images")
    with pytest.raises(CapfiltError, match="query failed: Catalog Error"):
        run_query(ds, "select * from no_such_table")
    with pytest.raises(CapfiltError, match="is empty"):
        run_query(ds, "   ")
    with pytest.raises(CapfiltError, match="does not exist"):
        run_query(Dataset(str(tmp_path / "nowhere")), "select 1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageNotRunError, match="capfilt fetch"):
        run_query(Dataset(str(tmp_path / "empty")), "select * from images")


def test_a_damaged_shard_is_named_not_a_traceback(images_dataset):
    (images_dataset / "images" / "00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(CapfiltError, match="cannot read the images/ shards"):
        run_query(Dataset(str(images_dataset)), "select count(*) from images")


def test_shards_with_different_columns_union_by_name(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    write_images_dataset(tmp_path / "ds", n_shards=1)
    extra = pa.table(
        {
            "key": ["x"],
            "url": ["u"],
            "status": ["success"],
            "jpg": [b""],
            "true_caption": ["a red circle"],
        }
    )
    ds.write_shard("images", 1, extra)
    columns, rows = run_query(ds, "select key, true_caption from images where key = 'x'")
    assert rows == [("x", "a red circle")]


def test_remote_fsspec_dataset(tmp_path):
    write_images_dataset("memory://capfilt-query-test", n_shards=1)
    try:
        ds = Dataset("memory://capfilt-query-test")
        assert run_query(ds, "select count(*) from images") == (["count_star()"], [(6,)])
    finally:
        ds.fs.rm(ds.path, recursive=True)


def test_cli_query_formats_and_errors(images_dataset):
    runner = CliRunner()
    sql = "select status, count(*) as n from images group by 1 order by 1"
    result = runner.invoke(app, ["query", str(images_dataset), sql, "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["status,n", "failed_to_download,2", "success,10"]
    result = runner.invoke(app, ["query", str(images_dataset), sql, "-f", "json"])
    assert [json.loads(line) for line in result.output.splitlines()] == [
        {"status": "failed_to_download", "n": 2},
        {"status": "success", "n": 10},
    ]
    result = runner.invoke(app, ["query", str(images_dataset), sql])
    assert result.exit_code == 0 and "success" in result.output and "10" in result.output
    result = runner.invoke(app, ["query", str(images_dataset), "select * from curated"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2 and "capfilt filter" in result.output
