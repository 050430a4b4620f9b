"""DuckDB views over a dataset folder, and SQL over them."""

from __future__ import annotations

import re

from capfilt.errors import CapfiltError, StageNotRunError
from capfilt.layout import STAGES, Dataset

_HINTS = {
    "images": "run `capfilt fetch` or `capfilt ingest` first",
    "captions": "run `capfilt caption DATASET` first",
    "scores": "run `capfilt filter DATASET --threshold T` first",
    "curated": "run `capfilt filter DATASET --threshold T` first",
}


def connect(dataset: Dataset, with_images: bool = False):
    """A DuckDB connection with one view per stage folder that has shards."""
    import duckdb

    con = duckdb.connect()
    if not dataset.is_local:
        con.register_filesystem(dataset.fs)
    for stage in STAGES:
        shards = dataset.shards(stage)
        if not shards:
            continue
        files = [dataset.url(stage, f"{s:05d}.parquet") for s in shards]
        file_list = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        exclude = " EXCLUDE (jpg)" if stage == "images" and not with_images else ""
        try:
            con.execute(
                f"CREATE VIEW {stage} AS SELECT *{exclude} "
                f"FROM read_parquet({file_list}, union_by_name=true)"
            )
        except duckdb.Error as e:
            # DuckDB reads every footer here, so a damaged shard fails before any query runs.
            raise CapfiltError(
                f"cannot read the {stage}/ shards of {dataset.root!r}: "
                f"{str(e).splitlines()[0]}. Delete the damaged shard and re-run the stage "
                "that wrote it"
            ) from e
    return con


def missing_stages(sql: str, dataset: Dataset) -> list[str]:
    """Stage views the query names that this dataset does not have yet."""
    words = set(re.findall(r"[A-Za-z_]+", sql.lower()))
    return [s for s in STAGES if s in words and not dataset.has_stage(s)]


def run_query(dataset: Dataset, sql: str, with_images: bool = False):
    """Run `sql` and return (column names, rows)."""
    import duckdb

    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist")
    if not sql.strip():
        raise CapfiltError('the query is empty; pass SQL such as "select count(*) from images"')
    con = connect(dataset, with_images=with_images)
    try:
        result = con.execute(sql)
    except duckdb.CatalogException as e:
        missing = missing_stages(sql, dataset)
        if missing:
            stage = missing[0]
            raise StageNotRunError(
                f"the query reads `{stage}`, but {dataset.root!r} has no {stage}/ shards yet: "
                f"{_HINTS[stage]}"
            ) from e
        raise CapfiltError(f"query failed: {str(e).splitlines()[0]}") from e
    except duckdb.Error as e:
        raise CapfiltError(f"query failed: {str(e).splitlines()[0]}") from e
    if result is None:  # only comments, no statement
        return [], []
    columns = [d[0] for d in result.description] if result.description else []
    return columns, result.fetchall()
