"""DuckDB views over a dataset folder: one view per stage folder that has shards, and
`dedup_groups` (every duplicate group, one row each) where dedup/ has run.

A connection is a sandbox unless its caller opts out: DuckDB may open only the shard files
its views read (`allowed_paths`), nothing else (`enable_external_access=false`: no other
file, no network, no extension), and `lock_configuration` refuses the SET that would undo
it. DuckDB's allowed paths may be written as well as read, so `check_statements` refuses,
before anything runs, each statement that writes or opens files (COPY, EXPORT, ATTACH,
INSTALL/LOAD, SET, file PRAGMAs, CREATE SECRET); what is left reads the views and makes
in-memory tables at most.

`capfilt filter --where` evaluates one condition over each scores/ shard's Arrow table in a
connection of its own that reaches no file at all (`sandboxed_connection`); `check_condition`
refuses, before a model loads, what is not one true/false condition over known columns: ';',
subqueries, table functions (read_csv …), unknown columns.
"""

from __future__ import annotations

import re
import threading

from capfilt.core import parquet
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGE_FOLDERS, Dataset

STAGE_HINTS = {
    "images": "run `capfilt fetch` or `capfilt ingest` first",
    "captions": "run `capfilt caption DATASET` first",
    "scores": "run `capfilt filter DATASET --threshold T` first",
    "curated": "run `capfilt filter DATASET --threshold T` first",
    "embeddings": "run `capfilt filter DATASET --threshold T` first (it writes them)",
    "hashes": "run `capfilt dedup DATASET` first",
    "dedup": "run `capfilt dedup DATASET` first",
    "dedup_groups": "run `capfilt dedup DATASET` first",
}
# Views made of other views: name -> (the view it reads, its SQL).
DERIVED_VIEWS = {
    # Every duplicate group of more than one image, one row each: its images and why each
    # other image goes (the representative first).
    "dedup_groups": (
        "dedup",
        "SELECT group_id, count(*) AS images, any_value(representative) AS representative, "
        "count(*) FILTER (WHERE kept) AS kept, "
        "list(key ORDER BY kept DESC, key) AS keys, "
        "list(coalesce(reason, 'kept') ORDER BY kept DESC, key) AS reasons, "
        "list(DISTINCT reason ORDER BY reason) FILTER (WHERE reason IS NOT NULL) AS kinds "
        "FROM dedup WHERE group_size > 1 GROUP BY group_id",
    ),
}
VIEWS = (*STAGE_FOLDERS, *DERIVED_VIEWS)
SANDBOX_FLAG = "--allow-external-access"

# Set in this order, once the views exist; `lock_configuration` last. A setting this DuckDB
# does not know is skipped, except those the sandbox rests on.
_REQUIRED = ("allowed_paths", "enable_external_access", "lock_configuration")
_SANDBOX_SETTINGS = (
    ("python_enable_replacements", False),  # no scans of the caller's Python variables
    ("autoinstall_known_extensions", False),  # no download of an extension
    ("autoload_known_extensions", False),
    ("allow_community_extensions", False),
    ("enable_external_access", False),  # no file but the allowed ones, no network
    ("lock_configuration", True),  # no SET/RESET/PRAGMA that changes a setting
)


def connect(
    dataset: Dataset,
    with_images: bool = False,
    folders: dict | None = None,
    sandbox: bool = True,
):
    """A DuckDB connection with one view per stage folder that has shards.

    `folders`: stage -> StageFolder already resolved (`Dataset.folder`), so that several
    connections and other readers of one command see the same generation of curated/.
    `sandbox`: DuckDB may open only the shards the views read (see the module docstring);
    False leaves the connection as DuckDB makes it (`capfilt query --allow-external-access`).
    """
    import duckdb

    con = duckdb.connect()
    if not dataset.is_local:
        con.register_filesystem(dataset.fs)
    allowed: list[str] = []
    made = []
    for stage in STAGE_FOLDERS:
        folder = (folders or {}).get(stage) or dataset.folder(stage)  # one generation
        shards = folder.shards()
        if not shards:
            continue
        files = [folder.url(s) for s in shards]
        allowed += files
        file_list = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
        exclude = " EXCLUDE (jpg)" if stage == "images" and not with_images else ""
        # The first shard's footer: the columns the views' readers use, of the kinds they use
        # (a key that is a number would fail deep in a report's SQL).
        parquet.check_schema(folder.fs, folder.shard_path(shards[0]), stage)
        try:
            con.execute(
                f"CREATE VIEW {stage} AS SELECT *{exclude} "
                f"FROM read_parquet({file_list}, union_by_name=true)"
            )
        except duckdb.Error as e:
            # DuckDB reads every footer here, so a damaged shard fails before any query runs;
            # name the shard, and say whether it is damaged or in another schema.
            for shard in shards:
                parquet.check_schema(folder.fs, folder.shard_path(shard), stage)
            raise CapfiltError(
                f"cannot read the {stage}/ shards of {dataset.root!r}: "
                f"{str(e).splitlines()[0]}. Delete the damaged shard and re-run the stage "
                "that wrote it"
            ) from e
        made.append(stage)
    for view, (source, select) in DERIVED_VIEWS.items():
        if source in made:
            con.execute(f"CREATE VIEW {view} AS {select}")
    if sandbox:
        _lock_down(con, dataset, allowed)
    return con


def _lock_down(con, dataset: Dataset, files: list[str]) -> None:
    """Let `con` open `files` and nothing else, for good (views bind again at each query)."""
    allowed = set(files)
    if not dataset.is_local:
        # DuckDB asks a registered fsspec filesystem for the files of a view and checks the
        # names it returns, which may be spelt otherwise (memory://b/x -> memory:///b/x).
        fs = dataset.fs
        allowed |= {fs.unstrip_protocol(fs._strip_protocol(f)) for f in files}
    _sandbox(
        con,
        sorted(allowed),
        f"; `capfilt query` also runs without the sandbox with {SANDBOX_FLAG}",
    )


def _sandbox(con, allowed: list[str] | None, hint: str = "") -> None:
    """Apply the sandbox's settings to `con`, `lock_configuration` last: it may open the files
    `allowed` and nothing else (None: no file at all). `hint` ends the refusal of a DuckDB
    too old to sandbox."""
    import duckdb

    known = {row[0] for row in con.execute("SELECT name FROM duckdb_settings()").fetchall()}
    required = [n for n in _REQUIRED if allowed is not None or n != "allowed_paths"]
    missing = [name for name in required if name not in known]
    if missing:
        raise CapfiltError(
            f"this DuckDB ({duckdb.__version__}) cannot sandbox SQL (it has no "
            f"{', '.join(missing)} setting): upgrade duckdb to 1.2 or later{hint}"
        )
    if allowed is not None:
        con.execute("SET allowed_paths = $1", [allowed])
    for name, value in _SANDBOX_SETTINGS:
        if name not in known:
            continue
        try:
            con.execute(f"SET {name} = {str(value).lower()}")
        except duckdb.Error:
            if name in _REQUIRED:
                raise


# --- the statements a sandboxed query may run --------------------------------------------------
# By DuckDB's own parser (case, whitespace and comments are its business, not a regex's):
# the statement types allowed, then the leading words of each, so that a MULTI statement
# (what DuckDB makes of a PIVOT, also inside COPY (PIVOT …) TO) or an EXPLAIN ANALYZE runs
# nothing but a query.
_ALLOWED_TYPES = frozenset(
    {
        "SELECT",
        "EXPLAIN",
        "MULTI",
        "CREATE",
        "INSERT",
        "UPDATE",
        "DELETE",
        "DROP",
        "ALTER",
        "TRANSACTION",
        "PRAGMA",
    }
)
_QUERY_WORDS = frozenset(
    "select with from values table pivot unpivot pivot_wider pivot_longer summarize describe "
    "show ( create insert update delete drop alter begin commit rollback abort start end "
    "pragma explain".split()
)
# PRAGMAs that only describe the in-memory catalog; the others set a setting (locked
# anyway) or touch files.
_READ_PRAGMAS = frozenset(
    "table_info show show_tables show_tables_expanded database_size storage_info version "
    "platform functions collations user_agent metadata_info".split()
)
_WHAT = {
    "COPY": "COPY (reads or writes files)",
    "EXPORT": "EXPORT DATABASE (writes files)",
    "IMPORT": "IMPORT DATABASE (reads files)",
    "ATTACH": "ATTACH (opens or creates a database file)",
    "DETACH": "DETACH",
    "LOAD": "INSTALL/LOAD (extensions)",
    "INSTALL": "INSTALL/LOAD (extensions)",
    "FORCE": "INSTALL/LOAD (extensions)",
    "UPDATE_EXTENSIONS": "UPDATE EXTENSIONS",
    "SET": "SET/RESET/USE (changes settings)",
    "RESET": "SET/RESET/USE (changes settings)",
    "USE": "SET/RESET/USE (changes settings)",
    "PREPARE": "PREPARE/EXECUTE (statements it cannot check)",
    "EXECUTE": "PREPARE/EXECUTE (statements it cannot check)",
    "CALL": "CALL (use SELECT * FROM the function instead)",
    "CHECKPOINT": "CHECKPOINT",
    "VACUUM": "VACUUM/ANALYZE",
    "ANALYZE": "VACUUM/ANALYZE",
}


def sandbox_refusal(what: str) -> CapfiltError:
    """The one line a sandboxed query that tries `what` fails with."""
    return CapfiltError(
        f"the query is sandboxed to the dataset's views ({', '.join(VIEWS)}) and cannot "
        f"{what}; pass {SANDBOX_FLAG} to lift the sandbox"
    )


def check_statements(con, sql: str) -> None:
    """Raise a CapfiltError for a statement of `sql` that the sandbox refuses, before any
    statement runs; `con` parses (a syntax error raises duckdb's ParserException)."""
    for kind, text in _statements(con, sql):
        _check_statement(con, kind, text)


def _statements(con, sql: str) -> list[tuple[str, str]]:
    """(type name, text) of each statement of `sql`, by DuckDB's parser."""
    try:
        return [(s.type.name, s.query) for s in con.extract_statements(sql)]
    except ValueError as e:  # a statement type this duckdb's Python API has no name for
        raise sandbox_refusal("run a statement of a kind it does not know") from e


def _tokens(text: str) -> list[tuple[int, str]]:
    """(position, lower-case text) of each token of `text` that is not a comment."""
    import duckdb

    found = duckdb.tokenize(text)
    tokens = []
    for i, (pos, kind) in enumerate(found):
        end = found[i + 1][0] if i + 1 < len(found) else len(text)
        if getattr(kind, "name", str(kind)).rsplit(".", 1)[-1] != "comment":
            tokens.append((pos, text[pos:end].strip().lower()))
    return tokens


def _check_statement(con, kind: str, text: str) -> None:
    tokens = _tokens(text)
    words = [word for _, word in tokens]
    first = words[0] if words else ""
    if kind not in _ALLOWED_TYPES or first not in _QUERY_WORDS:
        raise sandbox_refusal(
            _WHAT.get(first.upper()) or _WHAT.get(kind) or f"run {(first or kind).upper()}"
        )
    if kind == "PRAGMA" and first != "pragma":  # IMPORT DATABASE, COPY FROM DATABASE
        raise sandbox_refusal(_WHAT.get(first.upper()) or f"run {first.upper()}")
    if first == "explain":  # EXPLAIN ANALYZE runs what it explains: check that
        i = 2 if words[1:2] == ["analyze"] else 1
        if words[i : i + 1] == ["("]:  # EXPLAIN (FORMAT json) …
            i = words.index(")", i) + 1 if ")" in words[i:] else len(words)
        if i >= len(words):
            raise sandbox_refusal("run this EXPLAIN")
        for inner_kind, inner in _statements(con, text[tokens[i][0] :]):
            _check_statement(con, inner_kind, inner)
    elif first == "pragma":
        name = words[1] if len(words) > 1 else ""
        if name not in _READ_PRAGMAS:
            raise sandbox_refusal(f"run PRAGMA {name} (only pragmas that describe the views)")
    elif first in ("create", "drop"):
        # CREATE [OR REPLACE] [TEMP|TEMPORARY|PERSISTENT] kind …: in-memory objects only
        rest = [w for w in words[1:4] if w not in ("or", "replace", "temp", "temporary")]
        if rest[:1] in (["persistent"], ["secret"]):
            raise sandbox_refusal(f"{first.upper()} SECRET (credentials, stored in a file)")
        if rest[:1] in (["database"], ["extension"]):
            raise sandbox_refusal(f"{first.upper()} {rest[0].upper()}")


def sandbox_error(e: Exception) -> CapfiltError | None:
    """The sandbox's one line for a DuckDB error that its settings raised, else None."""
    import duckdb

    message = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, duckdb.PermissionException):
        m = re.search(r'Cannot access (?:file|directory) "([^"]*)"', message)
        if m:
            return sandbox_refusal(f"open {m.group(1)}")
        if "extension" in message.lower():
            return sandbox_refusal("install or load an extension")
        return sandbox_refusal("reach files or the network")
    m = re.search(r'Cannot change configuration option "([^"]*)"', message)
    if m and "locked" in message:
        return sandbox_refusal(f"change the setting {m.group(1)}")
    m = re.search(r"but it exists in the (\w+) extension", message)
    if m or "automatically install" in message:
        return sandbox_refusal(f"load the {m.group(1) if m else 'needed'} extension")
    m = re.search(r"Table with name (\S+) does not exist", message)
    if m and re.search(r"/|\.(csv|tsv|txt|json|jsonl|ndjson|parquet|gz)$", m.group(1), re.I):
        return sandbox_refusal(f"open {m.group(1)} (a file named as a table)")
    return None


def missing_stages(sql: str, dataset: Dataset) -> list[str]:
    """Stage views the query names that this dataset does not have yet."""
    words = set(re.findall(r"[A-Za-z_]+", sql.lower()))
    sources = {view: source for view, (source, _) in DERIVED_VIEWS.items()}
    return [
        view for view in VIEWS if view in words and not dataset.has_stage(sources.get(view, view))
    ]


# --- one condition over a table's rows (`capfilt filter --where`) -------------------------------
WHERE_FLAG = "--where"
WHERE_VIEW = "scores"  # the name the condition's table has: `scores.itm_score` works too
_WHERE_CONNECTIONS = threading.local()  # see `_where_connection`
_ROW = "capfilt_row__"  # the row number of each row, to read back which rows the WHERE kept
# Words that open a query inside the condition: a subquery could read what is not the row.
_QUERY_OPENERS = frozenset(
    "select from with table values pivot unpivot summarize describe show".split()
)


def sandboxed_connection():
    """An in-memory DuckDB connection that reaches nothing outside itself, for good: no file,
    no network, no extension, settings locked. Tables come in by `register` (Arrow)."""
    import duckdb

    con = duckdb.connect()
    _sandbox(con, None)
    return con


def where_error(problem: str) -> CapfiltError:
    """The one line a refused --where condition fails with."""
    return CapfiltError(
        f"{WHERE_FLAG} {problem}; give one condition over the score columns, e.g. "
        "\"itm_score >= 0.5 AND source = 'synthetic'\""
    )


def check_condition(condition: str, schema) -> None:
    """Refuse, in one line naming the problem, a --where that is not one true/false condition
    over the columns of `schema` (a pyarrow schema): several statements, a subquery or a call
    that reads files or tables, an unknown column, a value that is not true or false. Nothing
    runs: DuckDB parses and binds it against an empty table."""
    import duckdb

    text = condition.strip()
    if not text:
        raise where_error("is empty")
    con = sandboxed_connection()
    check_condition_words(text, con)
    con.register(WHERE_VIEW, schema.empty_table())
    sql = _where_sql(text, select=f"(\n{text}\n) AS keep")
    try:
        statements = con.extract_statements(sql)
        if len(statements) != 1:
            raise where_error("holds more than one statement")
        described = con.execute(f"DESCRIBE {sql}").fetchall()
    except duckdb.Error as e:
        raise _condition_error(e, schema) from e
    kind = described[0][1]
    if kind not in ("BOOLEAN", '"NULL"', "NULL"):
        raise where_error(f"is a {kind} value, not a condition (true or false)")


def where_rows(table, condition: str):
    """The row numbers (in order, int64 numpy) of the rows of `table` that DuckDB's WHERE
    `condition` keeps, in a sandboxed connection: a row where it is NULL is not kept."""
    import duckdb
    import numpy as np
    import pyarrow as pa

    numbered = table.append_column(_ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    con = _where_connection()
    con.register(WHERE_VIEW, numbered)
    try:
        found = con.execute(_where_sql(condition.strip(), select=_ROW) + " ORDER BY 1")
        rows = found.fetchnumpy()[_ROW]
    except duckdb.Error as e:
        raise _condition_error(e, table.schema) from e
    finally:
        con.unregister(WHERE_VIEW)
    return np.asarray(rows, dtype=np.int64)


def _where_connection():
    """This thread's `sandboxed_connection` for `where_rows`: made once, not once per shard
    (making one costs tens of milliseconds); a shard's table is registered only while its
    condition runs."""
    con = getattr(_WHERE_CONNECTIONS, "con", None)
    if con is None:
        con = _WHERE_CONNECTIONS.con = sandboxed_connection()
    return con


def _where_sql(condition: str, select: str) -> str:
    # The condition on lines of its own: a -- comment in it ends with its line.
    return f"SELECT {select} FROM {WHERE_VIEW} WHERE (\n{condition}\n)"


def check_condition_words(text: str, con=None) -> None:
    """Refuse a --where that holds ';', a subquery or a table function (they could read
    files or run statements), by DuckDB's tokenizer: nothing is parsed or run. `con`: a
    connection to list the table functions with (a new one when None)."""
    import duckdb

    tokens = [word for _, word in _tokens(text)]
    for word in tokens:
        if ";" in word and not word.startswith(("'", '"')):
            raise where_error("holds ';': one condition, not statements")
        if word in _QUERY_OPENERS:
            raise where_error(f"holds {word.upper()}: no subqueries (they could read files)")
    con = con or duckdb.connect()
    table_functions = {
        row[0]
        for row in con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'table'"
        ).fetchall()
    }
    for word, after in zip(tokens, tokens[1:], strict=False):
        name = word.strip('"')
        if after.startswith("(") and name in table_functions:
            raise where_error(f"calls {name}(), which reads files or tables, not the row")


def _condition_error(e: Exception, schema) -> CapfiltError:
    """A DuckDB error about a --where condition as one line."""
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    m = re.search(r'Referenced column "([^"]*)" not found', message)
    if m:
        columns = ", ".join(name for name in schema.names if name != _ROW)
        return where_error(f"names the column {m.group(1)}, which scores/ has not ({columns})")
    refused = sandbox_error(e)
    if refused is not None:
        return where_error(f"cannot {str(refused).split(' and cannot ', 1)[-1].split(';')[0]}")
    message = re.sub(r"^[A-Za-z ]*Error: ", "", message)
    return where_error(f"is not a condition DuckDB can run: {message}")
