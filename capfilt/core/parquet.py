"""Parquet shards: the schemas of every stage folder, whole-or-nothing writes, fingerprints.

A shard's fingerprint is the SHA-256 of its Parquet footer: row counts, byte sizes and
statistics of every column chunk, and the key-value metadata. Every file capfilt writes
carries a unique write id in that metadata, so two writes never share a fingerprint, and
reading it costs one small ranged read whatever the shard's size (`capfilt status` on a
million shards stays cheap). A file written by another tool is told apart by its footer alone.
"""

from __future__ import annotations

import hashlib
import uuid

from capfilt.core.errors import CapfiltError

# images/ follows img2dataset's parquet schema (plus any extra input columns), so it is not
# fixed here; these are the folders capfilt itself writes. Built on first use (module
# __getattr__), so that `capfilt --help` does not import pyarrow.
_SCHEMAS = {
    "CAPTIONS_SCHEMA": [
        ("key", "string"),
        ("caption_id", "int32"),
        ("text", "string"),
        ("model", "string"),
        ("status", "string"),
        ("error_message", "string"),
    ],
    "SCORES_SCHEMA": [
        ("key", "string"),
        ("text_id", "int32"),
        ("source", "string"),
        ("text", "string"),
        ("itm_score", "float32"),
        ("itc_score", "float32"),
        ("model", "string"),
        # Added by issue 16, so absent from shards written before (OPTIONAL_COLUMNS): CLIP
        # and SigLIP similarity (null when not asked for), and whether the text was cut to a
        # model's window.
        ("clip_score", "float32"),
        ("siglip_score", "float32"),
        ("truncated", "bool_"),
    ],
    "CURATED_SCHEMA": [
        ("key", "string"),
        ("text_id", "int32"),
        ("source", "string"),
        ("text", "string"),
        ("itm_score", "float32"),
    ],
    # One row per images/ row: what dedup knows of the image (capfilt/dedup/hashing.py).
    "HASHES_SCHEMA": [
        ("key", "string"),
        ("url", "string"),
        ("domain", "string"),
        ("status", "string"),
        ("error_message", "string"),
        ("sha256", "string"),
        ("pixel_sha256", "string"),
        ("phash", "int64"),
        ("width", "int32"),
        ("height", "int32"),
        ("pixel_std", "float32"),
        ("mean_color", "int32"),
    ],
    # One row per images/ row: its duplicate group and the verdict (capfilt/dedup/groups.py).
    "DEDUP_SCHEMA": [
        ("key", "string"),
        ("group_id", "int64"),
        ("group_size", "int32"),
        ("representative", "string"),
        ("kept", "bool_"),
        ("reason", "string"),
        ("detail", "string"),
        ("against", "string"),
        ("against_key", "string"),
    ],
}
# embeddings/: key, embedding (fixed_size_list<halffloat>[D], D the model's ITC size), written
# by the filter beside scores/; its width is the model's, so it has no fixed schema here.
EMBEDDING_COLUMN = "embedding"


def __getattr__(name: str):
    if name in _SCHEMAS:
        import pyarrow as pa

        return pa.schema([(column, getattr(pa, kind)()) for column, kind in _SCHEMAS[name]])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def temp_name(path: str) -> str:
    """A hidden sibling of `path` that shard discovery never lists."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}"


WRITE_ID = b"capfilt.write_id"


def with_write_id(schema):
    """`schema` with a fresh write id in its metadata, which the file's footer will carry."""
    return schema.with_metadata({**(schema.metadata or {}), WRITE_ID: uuid.uuid4().hex.encode()})


def write_atomic(fs, path: str, write, fingerprint=None, before_rename=None) -> str | None:
    """Write a file so that readers see the whole file or no file: `write(f)` fills a hidden
    temporary sibling, which is renamed to `path` once complete.

    `fingerprint(fs, tmp)` fingerprints the complete file, and `before_rename(fingerprint)` runs
    before the rename (the stage runner writes the shard's provenance there). Returns the
    fingerprint (None without `fingerprint`).
    """
    tmp = temp_name(path)
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        made = fingerprint(fs, tmp) if fingerprint is not None else None
        if before_rename is not None:
            before_rename(made)
        fs.mv(tmp, path)
        return made
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_table_atomic(fs, path: str, table, before_rename=None) -> str:
    """Write `table` as Parquet, whole or not at all (`write_atomic`), with a fresh write id in
    its footer; returns the file's fingerprint."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata(with_write_id(table.schema).metadata)
    return write_atomic(
        fs,
        path,
        lambda f: pq.write_table(table, f, compression="zstd"),
        file_fingerprint,
        before_rename,
    )


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a part."""
    write_atomic(fs, path, lambda f: f.write(data))


# Columns a folder gained after shards of it were written: readers take them when there and
# treat them as null when not (DuckDB views read with union_by_name).
OPTIONAL_COLUMNS = {"scores": ("clip_score", "siglip_score", "truncated")}
# What a reader needs of each folder. images/ is img2dataset's schema with any extra columns
# of the URL list; the folders capfilt writes have their fixed schemas above.
REQUIRED_COLUMNS = {
    "images": ("key", "jpg"),
    "embeddings": ("key", EMBEDDING_COLUMN),
    **{
        folder: tuple(
            column for column, _ in columns if column not in OPTIONAL_COLUMNS.get(folder, ())
        )
        for folder, columns in ((n.split("_")[0].lower(), c) for n, c in _SCHEMAS.items())
    },
}
# The kinds of the columns readers use, where a folder has them: string or large_string,
# binary or large_binary, a number.
COLUMN_KINDS = {
    "images": {"key": "string", "jpg": "binary", "status": "string", "caption": "string"},
    "embeddings": {"key": "string"},
    **{
        name.split("_")[0].lower(): {
            column: "number" if kind.startswith(("int", "float")) else kind
            for column, kind in columns
            if kind.startswith(("int", "float")) or kind in ("string", "binary")
        }
        for name, columns in _SCHEMAS.items()
    },
}


UNREADABLE = "unreadable:"  # the fingerprint of a file that is not Parquet


class UnreadableShard(CapfiltError):
    """A shard that is cut short, not Parquet, or not in the schema its folder holds."""


def read_table(fs, path: str, columns: list[str] | None = None):
    return read_table_and_fingerprint(fs, path, columns, fingerprint=False)[0]


def read_table_and_fingerprint(
    fs, path: str, columns: list[str] | None = None, fingerprint: bool = True
):
    """(table, fingerprint) of one file, both from the same open handle: the fingerprint is of
    exactly the bytes that were read, even if the file is replaced meanwhile.

    A damaged file, or one without the `columns` asked for, raises UnreadableShard naming it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            found = _footer_fingerprint(f) if fingerprint else None
            f.seek(0)
            if columns:
                check_columns(path, pq.read_schema(f).names, columns)
                f.seek(0)
            return pq.read_table(f, columns=columns), found
        except (ValueError, OSError, pa.ArrowException) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise UnreadableShard(damaged(path, e)) from e


def check_columns(path: str, names: list[str], required) -> None:
    """Raise UnreadableShard when a file with columns `names` lacks some of `required`."""
    missing = [c for c in required if c not in names]
    if missing:
        raise UnreadableShard(
            f"{path} has no column {', '.join(missing)} (its columns: "
            f"{', '.join(names[:12]) + (' …' if len(names) > 12 else '') or 'none'}); it was "
            "not written in the layout capfilt reads. Put images in with `capfilt fetch` or "
            "`capfilt ingest`, or move the file out of the dataset"
        )


def check_kinds(path: str, schema, kinds: dict) -> None:
    """Raise UnreadableShard when a column of `schema` named in `kinds` holds another kind of
    value (a key that is a number, image bytes stored as text)."""
    import pyarrow as pa

    tests = {
        "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
    }
    for field in schema:
        kind = kinds.get(field.name)
        if kind and not pa.types.is_null(field.type) and not tests[kind](field.type):
            raise UnreadableShard(
                f"{path}: column {field.name} holds {field.type}, not {kind}; it was not "
                "written in the layout capfilt reads. Put images in with `capfilt fetch` or "
                "`capfilt ingest`, or move the file out of the dataset"
            )


def check_keys(path: str, table) -> None:
    """Raise UnreadableShard when a shard's `key` column has nulls or repeats: each image must
    be told apart from the others (its captions, scores and curated pairs hang on the key)."""
    import pyarrow.compute as pc

    keys = table.column("key")
    if keys.null_count:
        raise UnreadableShard(
            f"{path}: {keys.null_count} rows have no key; every image needs its own key"
        )
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        repeated = next(c for c in counts.to_pylist() if c["counts"] > 1)
        raise UnreadableShard(
            f"{path}: key {repeated['values']!r} is on {repeated['counts']} rows; every image "
            "needs its own key"
        )


def check_schema(fs, path: str, folder: str) -> None:
    """Read one file's footer: it is Parquet, has the columns readers of `folder` need, of
    the kinds they read (`REQUIRED_COLUMNS`, `COLUMN_KINDS`), or raise UnreadableShard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except (ValueError, OSError, pa.ArrowException) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UnreadableShard(damaged(path, e)) from e
    check_columns(path, schema.names, REQUIRED_COLUMNS.get(folder, ()))
    check_kinds(path, schema, COLUMN_KINDS.get(folder, {}))


def damaged(path: str, error) -> str:
    why = (str(error).splitlines() or [type(error).__name__])[0].replace("'<Buffer>'", "it")
    why = why.rstrip(". ")
    return (
        f"cannot read {path}: {why}. The file is damaged (cut short by a full disk or a killed "
        "copy?) or not Parquet: delete it and re-run the stage that wrote it"
    )


def file_fingerprint(fs, path: str) -> str | None:
    """The fingerprint of a Parquet file (see the module docstring), None if there is none."""
    try:
        with fs.open(path, "rb") as f:
            try:
                return _footer_fingerprint(f)
            except ValueError as e:  # damaged, or not Parquet: it matches no provenance
                return f"{UNREADABLE}{f.seek(0, 2)} ({e})"
    except FileNotFoundError:
        return None


def content_fingerprint(fs, path: str) -> str | None:
    """SHA-256 of a whole file's bytes (for files that are not Parquet), None if it is gone."""
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return "sha256:" + digest.hexdigest()


def bytes_fingerprint(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _footer_fingerprint(f) -> str:
    size = f.seek(0, 2)
    if size < 12:
        raise ValueError("not a Parquet file (too short)")
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        raise ValueError("not a Parquet file (no PAR1 footer)")
    length = int.from_bytes(tail[:4], "little")
    if length > size - 12:
        raise ValueError("not a Parquet file (footer longer than the file)")
    f.seek(size - 8 - length)
    footer = f.read(length)
    return "sha256:" + hashlib.sha256(footer + size.to_bytes(8, "little")).hexdigest()


def embeddings_table(keys: list[str], vectors):
    """An embeddings/ table: `key`, and `embedding` as fixed_size_list<halffloat>[D] of the
    rows of `vectors` (N, D), stored in float16 (half the bytes; cosine similarities move by
    about 1e-3)."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 1
    values = pa.array(vectors.reshape(-1), type=pa.float16())
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.table({"key": pa.array(keys, pa.string()), EMBEDDING_COLUMN: column})


def embeddings_matrix(table):
    """The float16 (N, D) matrix of an embeddings/ table's `embedding` column."""
    import numpy as np
    import pyarrow as pa

    column = table.column(EMBEDDING_COLUMN).combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise UnreadableShard(
            f"embeddings/: column {EMBEDDING_COLUMN} holds {column.type}, not a fixed-size "
            "list of floats; re-run `capfilt filter` with --overwrite to write it again"
        )
    dim = column.type.list_size
    if column.null_count:
        raise UnreadableShard(f"embeddings/: {column.null_count} rows have no embedding")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float16).reshape(len(column), dim)


def rows_to_table(rows: list[dict], schema):
    """Build a table with exactly `schema`'s columns from a list of row dicts."""
    import pyarrow as pa

    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table(columns, schema=schema)
