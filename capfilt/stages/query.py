"""DuckDB views over a dataset folder, and SQL over them."""

from __future__ import annotations

from capfilt.core.errors import CapfiltError, StageNotRunError
from capfilt.core.layout import Dataset
from capfilt.core.sql import STAGE_HINTS, connect, missing_stages


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
                f"{STAGE_HINTS[stage]}"
            ) from e
        raise CapfiltError(f"query failed: {str(e).splitlines()[0]}") from e
    except duckdb.Error as e:
        raise CapfiltError(f"query failed: {str(e).splitlines()[0]}") from e
    if result is None:  # only comments, no statement
        return [], []
    columns = [d[0] for d in result.description] if result.description else []
    return columns, result.fetchall()
