"""DuckDB views over a dataset folder, and SQL over them, in a sandbox unless opted out."""

from __future__ import annotations

from capfilt.core.errors import CapfiltError, StageNotRunError
from capfilt.core.layout import Dataset
from capfilt.core.sql import STAGE_HINTS, check_statements, connect, missing_stages, sandbox_error


def run_query(
    dataset: Dataset, sql: str, with_images: bool = False, allow_external_access: bool = False
):
    """Run `sql` and return (column names, rows).

    The SQL sees the dataset's views and nothing else (core/sql.py): a statement or a
    function that would read another file, write one, reach the network or change a setting
    fails with one line that names the opt-in, `allow_external_access`, which lifts that.
    """
    import duckdb

    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist")
    if not sql.strip():
        raise CapfiltError('the query is empty; pass SQL such as "select count(*) from images"')
    con = connect(dataset, with_images=with_images, sandbox=not allow_external_access)
    try:
        if not allow_external_access:
            check_statements(con, sql)  # before any statement runs
        result = con.execute(sql)
    except duckdb.CatalogException as e:
        missing = missing_stages(sql, dataset)
        if missing:
            stage = missing[0]
            raise StageNotRunError(
                f"the query reads `{stage}`, but {dataset.root!r} has no {stage}/ shards yet: "
                f"{STAGE_HINTS[stage]}"
            ) from e
        raise _failed(e, allow_external_access) from e
    except duckdb.Error as e:
        raise _failed(e, allow_external_access) from e
    if result is None:  # only comments, no statement
        return [], []
    columns = [d[0] for d in result.description] if result.description else []
    return columns, result.fetchall()


def _failed(e: Exception, allow_external_access: bool) -> CapfiltError:
    refused = None if allow_external_access else sandbox_error(e)
    return refused or CapfiltError(f"query failed: {str(e).splitlines()[0]}")
