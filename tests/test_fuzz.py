"""Fuzzing the readers of user files: URL lists, capfilt.json, data manifests (TOML).

Whatever the bytes, a reader returns something usable or raises a CapfiltError (one line,
exit code 2 in the CLI); any other exception would reach the user as a traceback.
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.sources.manifests import load_manifest
from capfilt.sources.url_list import read_url_list
from capfilt.stages.fetch import FetchOptions, options_from_manifest

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_names = itertools.count()

# Text made of the characters that steer the parsers: separators, quotes, brackets, newlines.
list_text = st.text(
    alphabet=st.sampled_from(list(",\t\"'\n\r{}[]:\\ url caption http://x/a.jpg é🐱\x00")),
    max_size=200,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
url_rows = st.lists(
    st.dictionaries(st.sampled_from(["url", "caption", "key", "n", ""]), json_values, max_size=4),
    max_size=5,
)


def _file(folder, suffix: str, data: bytes):
    path = folder / f"f{next(_names)}.{suffix}"
    path.write_bytes(data)
    return path


def _read_or_refuse(path, options: FetchOptions | None = None) -> None:
    try:
        listing = read_url_list(str(path), options or FetchOptions())
    except CapfiltError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    try:
        assert listing.rows > 0 and listing.url_col in listing.columns
    finally:
        listing.cleanup()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- URL lists -------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "txt", "parquet", "csv.gz"])
@FUZZ
@given(data=st.binary(max_size=300))
def test_url_list_of_random_bytes(folder, suffix, data):
    _read_or_refuse(_file(folder, suffix, data))


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "txt"])
@FUZZ
@given(text=list_text)
def test_url_list_of_parser_characters(folder, suffix, text):
    _read_or_refuse(_file(folder, suffix, text.encode()))


@FUZZ
@given(text=list_text, compressed=st.booleans())
def test_headerless_csv_with_column_names(folder, text, compressed):
    data = gzip.compress(text.encode()) if compressed else text.encode()
    path = _file(folder, "csv.gz" if compressed else "csv", data)
    _read_or_refuse(path, FetchOptions(column_names=("caption", "url")))


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
@FUZZ
@given(rows=url_rows)
def test_url_list_of_json_shaped_rows(folder, suffix, rows):
    if suffix == "json":
        data = json.dumps(rows)
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows)
    _read_or_refuse(_file(folder, suffix, data.encode()))


# --- capfilt.json ----------------------------------------------------------------------------
def _check_manifest(folder, data: bytes) -> None:
    root = folder / f"ds{next(_names)}"
    root.mkdir()
    (root / "capfilt.json").write_bytes(data)
    ds = Dataset(str(root))
    try:
        manifest = ds.read_manifest()
    except CapfiltError as e:
        assert "capfilt.json" in str(e)
        return
    assert isinstance(manifest["runs"], list)
    assert manifest.get("source") is None or isinstance(manifest["source"], dict)
    # What the stages do with a manifest they could read must work too.
    ds.record_run("fuzz", {}, {"rows": 0})
    assert ds.read_manifest()["runs"][-1]["stage"] == "fuzz"


@FUZZ
@given(data=st.binary(max_size=200))
def test_manifest_of_random_bytes(folder, data):
    _check_manifest(folder, data)


@FUZZ
@given(value=json_values, runs=json_values, source=json_values)
def test_manifest_of_odd_json(folder, value, runs, source):
    _check_manifest(folder, json.dumps(value).encode())
    _check_manifest(folder, json.dumps({"format": 1, "runs": runs, "source": source}).encode())


def test_manifest_nested_too_deeply(folder):
    _check_manifest(folder, b"[" * 100_000 + b"]" * 100_000)


# --- data manifests (TOML) -------------------------------------------------------------------
toml_values = st.recursive(
    st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)
FETCH_KEYS = [f.name for f in fields(FetchOptions)]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "0.0"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return str(value)


def _apply_or_refuse(path) -> None:
    try:
        options, source = options_from_manifest(path)
    except CapfiltError as e:
        assert str(e)
        return
    assert isinstance(source, dict)
    assert isinstance(options.image_size, int) and options.image_size >= 1


@FUZZ
@given(data=st.binary(max_size=200))
def test_data_manifest_of_random_bytes(folder, data):
    path = _file(folder, "toml", data)
    try:
        load_manifest(path)
    except CapfiltError:
        pass
    _apply_or_refuse(path)


@FUZZ
@given(
    table=st.dictionaries(st.sampled_from(FETCH_KEYS + ["unknown"]), toml_values, max_size=5),
    source=st.one_of(st.none(), toml_values),
)
def test_data_manifest_with_odd_fetch_settings(folder, table, source):
    lines = [] if source is None else [f"source = {_toml_value(source)}"]
    lines.append("[fetch]")
    lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    _apply_or_refuse(_file(folder, "toml", "\n".join(lines).encode()))
