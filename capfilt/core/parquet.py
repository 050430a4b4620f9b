"""Parquet shards: the schemas of every stage folder, and whole-or-nothing writes."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.parquet as pq

# images/ follows img2dataset's parquet schema (plus any extra input columns), so it is not
# fixed here; these are the folders capfilt itself writes.
CAPTIONS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption_id", pa.int32()),
        ("text", pa.string()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
    ]
)
SCORES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("text_id", pa.int32()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("itm_score", pa.float32()),
        ("itc_score", pa.float32()),
        ("model", pa.string()),
    ]
)
CURATED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("text_id", pa.int32()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("itm_score", pa.float32()),
    ]
)
SCHEMAS = {"captions": CAPTIONS_SCHEMA, "scores": SCORES_SCHEMA, "curated": CURATED_SCHEMA}


def temp_name(path: str) -> str:
    """A hidden sibling of `path` that shard discovery never lists."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}"


def write_table_atomic(fs, path: str, table: pa.Table) -> None:
    """Write `table` to `path` so that readers see the whole file or no file."""
    tmp = temp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a part."""
    tmp = temp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def read_table(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema`'s columns from a list of row dicts."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table(columns, schema=schema)
