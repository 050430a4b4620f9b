"""URL lists (csv, tsv, parquet, jsonl, json, txt): checked, read, converted to Parquet."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError

URL_LIST_FORMATS = ("csv", "tsv", "parquet", "jsonl", "json", "txt")


# Column names img2dataset writes itself: an input column with one of these names is not kept.
RESERVED_COLUMNS = frozenset(
    "key caption url width height original_width original_height status error_message exif "
    "md5 sha256 sha512 jpg txt".split()
)


@dataclass(frozen=True)
class ListColumns:
    """How to read a URL list: its format and the columns of URLs and captions."""

    url_col: str = "url"
    caption_col: str | None = None  # None: a "caption" column when the list has one
    input_format: str | None = None  # None: from the file name
    column_names: tuple[str, ...] | None = None  # for csv/tsv lists without a header line


@dataclass
class UrlList:
    """A URL list as img2dataset will read it: Parquet files, their row counts and columns."""

    source: str
    input_format: str  # the format of the user's list
    files: list[str]  # Parquet files (the originals, or converted copies)
    rows_per_file: list[int]
    columns: list[str]
    url_col: str
    caption_col: str | None
    extra_columns: list[str]
    skipped_columns: list[str] = field(default_factory=list)
    temp_dir: str | None = None
    invalid_utf8_values: int = 0  # text values whose invalid UTF-8 bytes became U+FFFD
    fingerprint: str | None = None  # of the list's bytes: a changed list is another source

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)

    def img2dataset_input(self) -> str:
        """What to pass as img2dataset's url_list: the one file, or the folder of them."""
        if len(self.files) == 1:
            return self.files[0]
        return self.files[0].rsplit("/", 1)[0]

    def cleanup(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def base_format(name: str) -> str | None:
    name = name.lower().removesuffix(".gz")
    return name if name in URL_LIST_FORMATS else None


def _format_of(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower().removesuffix(".gz")
    return base_format(name.rsplit(".", 1)[-1]) if "." in name else None


def read_url_list(url_list: str, options: ListColumns) -> UrlList:
    """Check and, unless it is Parquet, convert the URL list; raise CapfiltError when it is bad."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url_list)
    if not fs.exists(path):
        raise CapfiltError(f"URL list {url_list!r} not found; pass a file or a folder of files")
    fmt = base_format(options.input_format) if options.input_format else None
    if fs.isdir(path):
        names = sorted(p for p in fs.ls(path, detail=False) if fs.isfile(p))
        if fmt is None:
            found = {_format_of(p) for p in names} - {None}
            if len(found) != 1:
                raise CapfiltError(
                    f"cannot tell the format of the URL lists in {url_list!r} (found "
                    f"{', '.join(sorted(found)) or 'no known extension'}); pass --input-format"
                )
            fmt = found.pop()
        files = [p for p in names if _format_of(p) == fmt]
        if not files:
            raise CapfiltError(f"no .{fmt} files in {url_list!r}")
    else:
        fmt = fmt or _format_of(path)
        if fmt is None:
            raise CapfiltError(
                f"cannot tell the format of {url_list!r} from its name; pass --input-format "
                f"({', '.join(URL_LIST_FORMATS)})"
            )
        files = [path]

    temp_dir = None
    out_files, rows_per_file, columns, digests = [], [], None, []
    invalid_utf8 = 0
    try:
        for i, file in enumerate(files):
            # What the list is: a Parquet file by its footer (one ranged read, as capfilt tells
            # shards apart), a text file by all its bytes.
            fingerprint = io.file_fingerprint if fmt == "parquet" else io.content_fingerprint
            digests.append(fingerprint(fs, file))
            if fmt == "parquet":
                try:
                    with fs.open(file, "rb") as f:
                        meta = pq.ParquetFile(f).metadata
                        file_columns, rows = list(meta.schema.names), meta.num_rows
                except Exception as e:
                    raise CapfiltError(f"cannot read URL list {file!r} as Parquet: {e}") from e
                out_files.append(fs.unstrip_protocol(file) if fs.protocol != "file" else file)
            else:
                table, repaired = utf8_text_columns(_read_table(fs, file, fmt, options))
                invalid_utf8 += repaired
                file_columns, rows = table.column_names, table.num_rows
                if temp_dir is None:
                    temp_dir = tempfile.mkdtemp(prefix="capfilt-urls-")
                out = os.path.join(temp_dir, f"{i:05d}.parquet")
                try:
                    pq.write_table(table, out)
                except Exception as e:  # found by fuzzing: e.g. a column of empty JSON objects
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise CapfiltError(
                        f"cannot read URL list {file!r}: its columns cannot be stored as "
                        f"Parquet ({first}); give every column plain text or numbers"
                    ) from e
                out_files.append(out)
            if columns is None:
                columns = file_columns
            elif set(file_columns) != set(columns):
                raise CapfiltError(
                    f"URL list {file!r} has columns {file_columns}, but {files[0]!r} has "
                    f"{columns}; every file of a list needs the same columns"
                )
            rows_per_file.append(rows)
    except BaseException:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise

    listing = UrlList(url_list, fmt, out_files, rows_per_file, columns or [], "url", None, [])
    listing.temp_dir = temp_dir
    listing.invalid_utf8_values = invalid_utf8
    listing.fingerprint = io.bytes_fingerprint("\n".join(digests).encode())
    try:
        _choose_columns(listing, options)
        if listing.rows == 0:
            raise CapfiltError(f"URL list {url_list!r} has no rows; nothing to fetch")
    except BaseException:
        listing.cleanup()
        raise
    return listing


def _read_table(fs, file: str, fmt: str, options: ListColumns):
    """Read a csv/tsv/jsonl/json/txt URL list into an Arrow table (empty fields are null)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json

    compression = "gzip" if file.endswith(".gz") else None
    try:
        with fs.open(file, "rb", compression=compression) as f:
            if fmt in ("csv", "tsv"):
                names = list(options.column_names) if options.column_names else None
                table = pa_csv.read_csv(
                    f,
                    read_options=pa_csv.ReadOptions(column_names=names),
                    parse_options=pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                    convert_options=pa_csv.ConvertOptions(strings_can_be_null=True),
                )
            elif fmt == "jsonl":
                check_jsonl_lines(f)
                f.seek(0)
                table = pa_json.read_json(f)
            elif fmt == "json":
                records = json.load(f)
                if not isinstance(records, list):
                    raise ValueError("a .json URL list must hold a list of objects")
                table = pa.Table.from_pylist(records)
            else:  # txt: one URL a line (after the byte order mark editors put first)
                urls = [line.strip() for line in f.read().decode("utf-8-sig").splitlines()]
                table = pa.table(
                    {options.url_col: [u for u in urls if u]},
                    pa.schema([(options.url_col, pa.string())]),
                )
    except CapfiltError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CapfiltError(f"cannot read URL list {file!r} as {fmt}: {first}") from e
    # A column with no value at all has Arrow's null type; make it a string column so
    # every shard of images/ gets the same schema.
    try:
        table.column_names  # noqa: B018 - decodes the names
    except UnicodeDecodeError as e:  # found by fuzzing: a header line that is not UTF-8
        raise CapfiltError(
            f"cannot read URL list {file!r} as {fmt}: its column names are not valid UTF-8"
        ) from e
    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
    return table


def utf8_text_columns(table):
    """`table` with its binary columns as text, and how many values had invalid UTF-8.

    pyarrow reads a csv column holding bytes that are not UTF-8 (a Latin-1 caption in a web
    dump) as binary; such a value keeps its row, with U+FFFD for each invalid byte, rather than
    failing the whole list or reaching images/ as bytes.
    """
    import pyarrow as pa

    repaired = 0
    for i, column in enumerate(table.schema):
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            continue
        texts = []
        for value in table.column(i).to_pylist():
            if value is None:
                texts.append(None)
                continue
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(value.decode("utf-8", errors="replace"))
                repaired += 1
        table = table.set_column(i, column.name, pa.array(texts, pa.string()))
    return table, repaired


def _names(columns: list[str]) -> str:
    """Column names for a one-line message (a name may hold a newline: found by fuzzing)."""
    return ", ".join(c if c.isprintable() else repr(c) for c in columns)


def check_jsonl_lines(f) -> None:
    """Raise ValueError unless every non-blank line of a JSONL list is a JSON object.

    pyarrow's JSON reader crashes the interpreter (segmentation fault, pyarrow 26) on a line
    that is a bare value such as `null`; found by fuzzing. This pass streams, so it adds no
    memory, only a read of the file.
    """
    for number, line in enumerate(f, start=1):
        stripped = line.strip()
        if number == 1:  # a byte order mark (which pyarrow's reader skips) may come first
            stripped = stripped.removeprefix(b"\xef\xbb\xbf").strip()
        if stripped and not stripped.startswith(b"{"):
            raise ValueError(f"line {number} is not a JSON object; each line must be one")


def _choose_columns(listing: UrlList, options: ListColumns) -> None:
    columns = listing.columns
    if options.url_col not in columns:
        raise CapfiltError(
            f"URL list {listing.source!r} has no column {options.url_col!r} (its columns: "
            f"{_names(columns) or 'none'}); pass --url-col with the column of image URLs"
        )
    caption_col = options.caption_col
    if caption_col is not None and caption_col not in columns:
        raise CapfiltError(
            f"URL list {listing.source!r} has no column {caption_col!r} (its columns: "
            f"{_names(columns)}); pass --caption-col with the column of captions"
        )
    if caption_col is None and "caption" in columns and options.url_col != "caption":
        caption_col = "caption"
    listing.url_col, listing.caption_col = options.url_col, caption_col
    rest = [c for c in columns if c not in (options.url_col, caption_col)]
    listing.extra_columns = [c for c in rest if c not in RESERVED_COLUMNS]
    listing.skipped_columns = [c for c in rest if c in RESERVED_COLUMNS]
