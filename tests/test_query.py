"""DuckDB views over a dataset folder and SQL over them (capfilt/query.py, `capfilt query`),
and the sandbox the SQL runs in (capfilt/core/sql.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_images_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError, StageNotRunError
from capfilt.core.layout import Dataset
from capfilt.core.sql import SANDBOX_FLAG, connect, missing_stages
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
    with pytest.raises(CapfiltError, match=r"cannot read .*images/00001.parquet"):
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


# --- the sandbox ------------------------------------------------------------------------------
SECRET = "TOPSECRET"  # in every file outside the dataset that an attack tries to read
REFUSED: set[str] = set()  # distinct attack queries refused by the sandbox, over the tests


def _outside(root):
    """Files beside the dataset that a query must not read (nor write next to)."""
    out = root / "outside"
    out.mkdir()
    (out / "secret.csv").write_text(f"name,token\nalice,{SECRET}-csv\n")
    (out / "secret.txt").write_text(f"{SECRET}-txt\n")
    (out / "secret.json").write_text(json.dumps({"token": f"{SECRET}-json"}))
    pq.write_table(pa.table({"token": [f"{SECRET}-parquet"]}), out / "secret.parquet")
    import duckdb

    victim = duckdb.connect(str(out / "victim.db"))
    victim.execute(f"CREATE TABLE t AS SELECT '{SECRET}-db' AS token")
    victim.close()
    return out


def _snapshot(*roots) -> dict:
    """Every file under `roots` and a hash of its bytes."""
    found = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as fh:
                    found[path] = hashlib.sha256(fh.read()).hexdigest()
    return found


@pytest.fixture
def sandbox(tmp_path):
    """A dataset with images/ and captions/, files beside it, and what they all hold now."""
    root = tmp_path / "ds"
    write_images_dataset(root)
    _captions(Dataset(str(root)), 0, ["000000000", "000000001"])
    out = _outside(tmp_path)
    return dict(ds=root, out=out, before=_snapshot(tmp_path), tmp=tmp_path)


def _refused(ds: Dataset, sql: str) -> str:
    with pytest.raises(CapfiltError) as raised:
        run_query(ds, sql)
    message = str(raised.value)
    assert "sandboxed" in message and SANDBOX_FLAG in message, message
    assert "\n" not in message
    REFUSED.add(sql)
    return message


ATTACKS = {
    # reading files other than the dataset's shards
    "read_csv /etc/passwd": "select * from read_csv('/etc/passwd', sep=':')",
    "read_csv": "select * from read_csv('{out}/secret.csv')",
    "read_csv_auto": "select * from read_csv_auto('{out}/secret.csv')",
    "file as a table": "select * from '{out}/secret.csv'",
    "read_parquet other": "select * from read_parquet('{out}/secret.parquet')",
    "read_parquet shard and other": (
        "select * from read_parquet(['{ds}/images/00000.parquet', '{out}/secret.parquet'], "
        "union_by_name=true)"
    ),
    "read_json": "select * from read_json('{out}/secret.json')",
    "read_text": "select content from read_text('{out}/secret.txt')",
    "read_blob": "select content from read_blob('/etc/passwd')",
    "glob /etc": "select * from glob('/etc/*')",
    "glob dataset": "select * from glob('{ds}/**')",
    "sniff_csv": "select * from sniff_csv('{out}/secret.csv')",
    "parquet_metadata": "select * from parquet_metadata('{out}/secret.parquet')",
    "table from a file": "create table stolen as select * from read_csv('{out}/secret.csv')",
    "network": "select * from read_csv('https://127.0.0.1:9/x.csv')",
    "extension function": "select * from st_read('{out}/secret.json')",
    # writing files
    "COPY TO a planted shard": (
        "copy (select * from images) to '{ds}/images/00009.parquet' (format parquet)"
    ),
    "COPY over a shard": (
        "copy (select * from images limit 1) to '{ds}/images/00000.parquet' "
        "(format parquet, use_tmp_file false)"
    ),
    "COPY TO outside": "copy (select * from images) to '{out}/written.csv'",
    "COPY FROM": "create table t (name varchar, token varchar); copy t from '{out}/secret.csv'",
    "COPY (PIVOT) TO": "copy (pivot images on status using count(*)) to '{out}/pivot.csv'",
    "EXPLAIN ANALYZE COPY": "explain analyze copy (select 1) to '{out}/explained.csv'",
    "COPY after a SELECT": "select 1; copy (select 1) to '{out}/second.csv'",
    "commented COPY": "/* hi */ CoPy\n(SELECT 1) -- x\n\tTo '{out}/commented.csv'",
    "EXPORT DATABASE": "export database '{out}/export'",
    "IMPORT DATABASE": "import database '{out}'",
    "PREPARE COPY": "prepare p as copy (select 1) to '{out}/prepared.csv'; execute p",
    # other databases, extensions, settings, secrets
    "ATTACH a new file": "attach '{out}/created.db' as created",
    "ATTACH another db": "attach '{out}/victim.db' as victim; select * from victim.t",
    "ATTACH a shard": "attach '{ds}/images/00000.parquet' as shard",
    "INSTALL": "install httpfs",
    "LOAD": "load httpfs",
    "FORCE INSTALL": "force install httpfs",
    "SET external access": "set enable_external_access = true",
    "RESET the lock": "reset lock_configuration",
    "SET allowed_directories": "set allowed_directories = ['/']",
    "SET temp_directory": "set temp_directory = '{out}/tmp'",
    "USE": "use memory",
    "PRAGMA profiling": "pragma enable_profiling",
    "PRAGMA profiling_output": "pragma profiling_output = '{out}/profile.json'",
    "CREATE PERSISTENT SECRET": "create persistent secret s (type s3, key_id 'a', secret 'b')",
    "CREATE SECRET": "create secret s (type s3, key_id 'a', secret 'b')",
    "CALL": "call pragma_version()",
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_sandbox_refuses(sandbox, attack):
    sql = ATTACKS[attack].format(ds=sandbox["ds"], out=sandbox["out"])
    _refused(Dataset(str(sandbox["ds"])), sql)
    # Nothing written, nothing planted: every file as it was, no new one.
    assert _snapshot(sandbox["tmp"]) == sandbox["before"]
    assert not (sandbox["ds"] / "images" / "00009.parquet").exists()
    assert not (sandbox["out"] / "created.db").exists()


def test_sandbox_refusals_name_what_was_refused(sandbox):
    ds, out = Dataset(str(sandbox["ds"])), sandbox["out"]
    assert f"cannot open {out}/secret.csv;" in _refused(
        ds, f"select * from read_csv('{out}/secret.csv')"
    )
    assert "cannot COPY" in _refused(ds, f"copy (select 1) to '{out}/x.csv'")
    assert "cannot ATTACH" in _refused(ds, f"attach '{out}/x.db'")
    assert "INSTALL/LOAD" in _refused(ds, "install httpfs")
    assert "SET/RESET/USE" in _refused(ds, "set threads = 1")
    assert "CREATE SECRET" in _refused(ds, "create temporary secret (type s3)")
    assert "EXPORT DATABASE" in _refused(ds, f"export database '{out}/e'")


def test_the_cli_refuses_in_one_line(sandbox):
    out = sandbox["out"]
    result = CliRunner().invoke(
        app, ["query", str(sandbox["ds"]), f"select * from read_csv('{out}/secret.csv')"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the query is sandboxed"), lines
    assert SANDBOX_FLAG in lines[0] and SECRET not in result.output


def test_queries_of_the_dataset_work_in_the_sandbox(sandbox):
    ds = Dataset(str(sandbox["ds"]))
    shard = f"{sandbox['ds']}/images/00000.parquet"
    assert run_query(
        ds,
        "select i.status, count(*) as n, count(c.key) as captioned "
        "from images i left join captions c using (key) group by 1 order by 1",
    )[1] == [("failed_to_download", 2, 0), ("success", 10, 2)]
    assert run_query(ds, "select avg(width), max(height) from images")[1] == [(96.0, 96)]
    columns, rows = run_query(
        ds, "select key, jpg from images where status = 'success' limit 2", with_images=True
    )
    assert columns == ["key", "jpg"] and all(r[1][:2] == b"\xff\xd8" for r in rows)
    # a shard of the dataset read by name is the dataset's data
    assert run_query(ds, f"select count(*) from read_parquet('{shard}')")[1] == [(6,)]
    # in-memory tables, macros and the statements that describe the views
    script = (
        "create temp table ok as select key from images where status = 'success'; "
        "create macro twice(x) as 2 * x; select twice(count(*)) from ok"
    )
    assert run_query(ds, script)[1] == [(20,)]
    assert run_query(ds, "pivot images on status using count(*)")[0][-2:] == [
        "failed_to_download",
        "success",
    ]
    assert "key" in {r[0] for r in run_query(ds, "describe images")[1]}
    assert run_query(ds, "summarize captions")[1]
    assert "key" in {r[1] for r in run_query(ds, "pragma table_info('images')")[1]}
    assert run_query(ds, "explain select count(*) from images")[1]
    assert run_query(ds, "with n as (from images) select count(*) from n")[1] == [(12,)]
    assert _snapshot(sandbox["tmp"]) == sandbox["before"]


def test_connect_is_a_sandbox_unless_told(sandbox):
    import duckdb

    ds, secret = Dataset(str(sandbox["ds"])), f"{sandbox['out']}/secret.csv"
    con = connect(ds)
    assert con.execute("select count(*) from images").fetchall() == [(12,)]
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"select * from read_csv('{secret}')")
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("set enable_external_access = true")
    assert connect(ds, sandbox=False).execute(f"select * from read_csv('{secret}')").fetchall()


def test_allow_external_access_gives_back_duckdb_as_it_is(sandbox):
    ds, out = Dataset(str(sandbox["ds"])), sandbox["out"]
    assert run_query(
        ds, f"select token from read_csv('{out}/secret.csv')", allow_external_access=True
    )[1] == [(f"{SECRET}-csv",)]
    run_query(ds, f"copy (select 1 as n) to '{out}/written.csv'", allow_external_access=True)
    assert (out / "written.csv").read_text().split() == ["n", "1"]
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["query", str(sandbox["ds"]), f"select token from '{out}/secret.csv'", "-f", "csv"],
    )
    assert result.exit_code == 2 and SECRET not in result.output
    result = runner.invoke(
        app,
        [
            "query",
            str(sandbox["ds"]),
            f"select token from '{out}/secret.csv'",
            "-f",
            "csv",
            SANDBOX_FLAG,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["token", f"{SECRET}-csv"]
    help_text = runner.invoke(app, ["query", "--help"], env={"COLUMNS": "200"}).output
    assert SANDBOX_FLAG in help_text and "Lift the sandbox" in help_text


def test_the_sandbox_on_a_remote_fsspec_dataset():
    import fsspec

    write_images_dataset("memory://capfilt-sandbox/ds", n_shards=1)
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://capfilt-sandbox/other.csv", f"token\n{SECRET}\n".encode())
    ds = Dataset("memory://capfilt-sandbox/ds")
    try:
        assert run_query(ds, "select count(*) from images")[1] == [(6,)]
        for sql in (
            "select * from read_csv('memory://capfilt-sandbox/other.csv')",
            "select * from glob('memory://capfilt-sandbox/*')",
            "copy (select 1) to 'memory://capfilt-sandbox/ds/images/00009.parquet'",
        ):
            _refused(ds, sql)
        assert not fs.exists("memory://capfilt-sandbox/ds/images/00009.parquet")
    finally:
        fs.rm("memory://capfilt-sandbox", recursive=True)


# --- fuzzing the sandbox ------------------------------------------------------------------------
# SQL composed from the statements and table functions that reach outside, over paths inside
# and outside the dataset, in any case, with any whitespace and comments between the words.
# Whatever it is, the query is refused (a CapfiltError) or it read the dataset only; no file
# appears or changes, inside the dataset or out.
SANDBOX_FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,  # no .hypothesis/ folder: the test checks that no file appears
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
READERS = (
    "read_csv read_csv_auto read_json read_json_auto read_ndjson read_json_objects "
    "read_parquet parquet_scan parquet_metadata parquet_schema read_text read_blob glob "
    "sniff_csv"
).split()
# {ds}: the dataset folder, {out}: a folder beside it, {rel}: a name relative to the cwd
SHARDS = ("{ds}/images/00000.parquet", "{ds}/images/00001.parquet", "{ds}/captions/00000.parquet")
PATHS = SHARDS + (
    "{ds}/images/../images/00000.parquet",
    "{ds}/images/*.parquet",
    "{ds}/images/00009.parquet",
    "{ds}/images",
    "{ds}",
    "{ds}/new/00000.parquet",
    "{ds}/../outside/secret.csv",
    "{out}/secret.csv",
    "{out}/secret.parquet",
    "{out}/secret.json",
    "{out}/secret.txt",
    "{out}/victim.db",
    "{out}/*",
    "{out}/new.csv",
    "{out}/new",
    "file://{out}/secret.csv",
    "/etc/passwd",
    "/etc/*",
    "{rel}",
    "https://127.0.0.1:9/x.csv",
    "s3://capfilt-nowhere/x.parquet",
)
SETTINGS = (
    ("enable_external_access", "true"),
    ("lock_configuration", "false"),
    ("allowed_directories", "['/']"),
    ("allowed_paths", "['{p}']"),
    ("temp_directory", "'{p}'"),
    ("profiling_output", "'{p}'"),
    ("secret_directory", "'{p}'"),
    ("extension_directory", "'{p}'"),
    ("autoinstall_known_extensions", "true"),
    ("python_enable_replacements", "true"),
    ("disabled_filesystems", "''"),
)
READS = (
    "SELECT * FROM {fn}('{p}')",
    "SELECT count(*) FROM images, {fn}('{p}')",
    "SELECT * FROM images WHERE key IN (SELECT * FROM {fn}('{p}'))",
    "CREATE TABLE t AS SELECT * FROM {fn}('{p}')",
    "SELECT * FROM '{p}'",
    "FROM {fn}(['{p}', '{p2}'])",
)
OTHERS = (
    "COPY (SELECT * FROM images) TO '{p}'",
    "COPY (SELECT * FROM images) TO '{p}' (FORMAT {fmt}, USE_TMP_FILE false)",
    "COPY (PIVOT images ON status USING count(*)) TO '{p}'",
    "CREATE TABLE t (key VARCHAR); COPY t FROM '{p}'",
    "EXPORT DATABASE '{p}'",
    "IMPORT DATABASE '{p}'",
    "ATTACH '{p}' AS x",
    "ATTACH '{p}' AS x (READ_ONLY)",
    "ATTACH '{p}' AS x; CREATE TABLE x.t AS SELECT 1",
    "INSTALL {ext}",
    "LOAD {ext}",
    "FORCE INSTALL {ext}",
    "LOAD '{p}'",
    "SET {setting} = {value}",
    "SET GLOBAL {setting} = {value}",
    "RESET {setting}",
    "PRAGMA {setting} = {value}",
    "PRAGMA {setting}",
    "CREATE {secret} SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "PREPARE q AS COPY (SELECT 1) TO '{p}'; EXECUTE q",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{p}'",
    "USE x",
    "CALL {fn}('{p}')",
)
SEPARATORS = (" ", "  ", "\n", "\t", " /* c */ ", " -- c\n", "/**/")
CASES = (str.lower, str.upper, str.title, str.swapcase, lambda s: s)


@st.composite
def attacks(draw) -> str:
    template = draw(st.sampled_from(READS + OTHERS))
    if draw(st.booleans()):
        template = "EXPLAIN ANALYZE " + template
    if draw(st.booleans()):
        template = draw(st.sampled_from(["SELECT 1; ", "FROM images;\n"])) + template
    if draw(st.booleans()):
        template += ";"
    setting, value = draw(st.sampled_from(SETTINGS))
    fill = dict(
        fn=draw(st.sampled_from(READERS)),
        p=draw(st.sampled_from(PATHS)),
        p2=draw(st.sampled_from(PATHS)),
        fmt=draw(st.sampled_from(["parquet", "csv", "json"])),
        ext=draw(st.sampled_from(["httpfs", "spatial", "sqlite", "'{p}'"])),
        setting=setting,
        value=value,
        secret=draw(st.sampled_from(["", "PERSISTENT", "TEMPORARY", "OR REPLACE PERSISTENT"])),
    )
    case = draw(st.sampled_from(CASES))
    separators = draw(st.lists(st.sampled_from(SEPARATORS), min_size=1, max_size=8))
    # change case and spacing of the SQL words only, not of the quoted paths
    parts = re.split(r"('[^']*'|\{\w+\})", template)
    seps = itertools.cycle(separators)
    words = [
        p if i % 2 else re.sub(" ", lambda _: next(seps), case(p)) for i, p in enumerate(parts)
    ]
    lead = draw(st.sampled_from(["", "-- note\n", "/* note */ ", "\n  "]))
    sql = lead + "".join(words)
    for name in ("ext", "value", "setting", "fn", "secret", "fmt", "p2", "p"):  # {p} last
        sql = sql.replace("{" + name + "}", fill[name])
    return sql


@pytest.fixture(scope="module")
def fuzz_place(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sandbox-fuzz")
    root = tmp / "ds"
    write_images_dataset(root)
    _captions(Dataset(str(root)), 0, ["000000000", "000000001"])
    out = _outside(tmp)
    rel = f"capfilt-sandbox-fuzz-{os.getpid()}.csv"  # relative: in the working directory
    return dict(tmp=tmp, ds=root, out=out, rel=rel, before=_snapshot(tmp))


@SANDBOX_FUZZ
@given(template=attacks())
def test_fuzz_the_sandbox(fuzz_place, template):
    place = fuzz_place
    sql = template.replace("{ds}", str(place["ds"])).replace("{out}", str(place["out"]))
    sql = sql.replace("{rel}", place["rel"])
    try:
        columns, rows = run_query(Dataset(str(place["ds"])), sql)
    except CapfiltError as e:
        assert "\n" not in str(e).strip()
        if "sandboxed" in str(e):
            assert SANDBOX_FLAG in str(e)
            REFUSED.add(template)
    else:
        # What ran read the dataset: only a read of one of its shards may succeed.
        assert SECRET not in repr((columns, rows)) and "root:" not in repr(rows)
        shards = {s.format(ds=place["ds"]) for s in SHARDS}
        shards.add(f"{place['ds']}/images/../images/00000.parquet")
        named = re.findall(r"'([^']*)'", sql)
        assert named and set(named) <= shards, sql
    assert _snapshot(place["tmp"]) == place["before"], sql
    assert not os.path.exists(place["rel"]), sql


def test_count_of_attacks_refused():
    """How many distinct attack queries the sandbox refused in this module's tests."""
    if not REFUSED:
        pytest.skip("no sandbox test ran before this one")
    print(f"\nthe sandbox refused {len(REFUSED)} distinct attack queries")
    assert len(REFUSED) >= len(ATTACKS)
