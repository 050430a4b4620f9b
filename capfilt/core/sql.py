"""DuckDB views over a dataset folder: one view per stage folder that has shards."""

from __future__ import annotations

import re

from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGES, Dataset

STAGE_HINTS = {
    "images": "run `capfilt fetch` or `capfilt ingest` first",
    "captions": "run `capfilt caption DATASET` first",
    "scores": "run `capfilt filter DATASET --threshold T` first",
    "curated": "run `capfilt filter DATASET --threshold T` first",
}


def connect(dataset: Dataset, with_images: bool = False, folders: dict | None = None):
    """A DuckDB connection with one view per stage folder that has shards.

    `folders`: stage -> StageFolder already resolved (`Dataset.folder`), so that several
    connections and other readers of one command see the same generation of curated/.
    """
    import duckdb

    con = duckdb.connect()
    if not dataset.is_local:
        con.register_filesystem(dataset.fs)
    for stage in STAGES:
        folder = (folders or {}).get(stage) or dataset.folder(stage)  # one generation
        shards = folder.shards()
        if not shards:
            continue
        files = [folder.url(s) for s in shards]
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
