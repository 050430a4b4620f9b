"""Export the curated pairs with their images, for training code that does not know capfilt.

Three formats, each readable by its own library alone:

- `parquet`: self-contained Parquet shards `OUT/00000.parquet` with the columns of
  EXPORT_SCHEMA (the image bytes are in `jpg`).
- `webdataset`: tar shards `OUT/00000.tar`, the layout img2dataset writes and OpenCLIP reads.
  One sample per curated pair, not per image: an image with a kept web caption and two kept
  synthetic captions becomes three samples, `KEY_0`, `KEY_1`, `KEY_2` (KEY_TEXTID), each with
  `.jpg` (the image), `.txt` (the text) and `.json` (key, text_id, source, text, itm_score,
  width, height, url, sha256). One sample per pair keeps `.txt` a single caption, which is
  what image-text loaders expect; loaders that want every text of an image group by `key`.
- `hf`: a Hugging Face `datasets` folder (`save_to_disk`) whose `image` column has the
  `Image` feature; `datasets.load_from_disk(OUT)` opens it.

Output shards follow the dataset's shard numbers: curated/00003.parquet → OUT/00003.*.
"""

from __future__ import annotations

import io as _io
import json
import tarfile
from dataclasses import dataclass, field
from enum import Enum

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset, shard_name


class ExportFormat(str, Enum):
    parquet = "parquet"
    webdataset = "webdataset"
    hf = "hf"


def export_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("text_id", pa.int32()),
            ("text", pa.string()),
            ("source", pa.string()),
            ("itm_score", pa.float32()),
            ("jpg", pa.binary()),
            ("width", pa.int64()),
            ("height", pa.int64()),
        ]
    )


@dataclass
class ExportResult:
    """What `export_data` wrote."""

    format: str
    out: str
    pairs: int = 0
    images: int = 0
    shards: int = 0
    # curated pairs whose key has no image bytes in the aligned images/ shard: not exported
    missing_images: list[str] = field(default_factory=list)


def curated_with_images(dataset: Dataset, shard: int):
    """The curated pairs of one shard joined with their image bytes, sorted by (key, text_id).

    Returns (table with EXPORT_SCHEMA plus `url`/`sha256` when images/ has them, missing keys).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    curated = dataset.read_shard("curated", shard)
    if shard not in dataset.shards("images"):
        return export_schema().empty_table(), sorted(set(curated.column("key").to_pylist()))
    wanted = ["key", "jpg", "width", "height", "url", "sha256", "status"]
    images = dataset.read_shard("images", shard)
    images = images.select([c for c in wanted if c in images.column_names])
    if "status" in images.column_names:
        images = images.filter(pc.equal(images.column("status"), "success")).drop_columns(
            ["status"]
        )
    images = images.filter(pc.is_valid(images.column("jpg")))
    joined = curated.join(images, keys="key", join_type="left outer")
    missing_mask = pc.is_null(joined.column("jpg"))
    missing = sorted(set(joined.filter(missing_mask).column("key").to_pylist()))
    joined = joined.filter(pc.invert(missing_mask))
    joined = joined.sort_by([("key", "ascending"), ("text_id", "ascending")])
    schema = export_schema()
    columns = {name: joined.column(name).cast(schema.field(name).type) for name in schema.names}
    for extra in ("url", "sha256"):
        if extra in joined.column_names:
            columns[extra] = joined.column(extra).cast(pa.string())
    return pa.table(columns), missing


def _prepare_out(out: str, overwrite: bool):
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    path = path.rstrip("/") or "/"
    if fs.exists(path):
        if fs.isfile(path):
            raise CapfiltError(f"--out {out!r} is a file; pass a folder")
        if fs.ls(path, detail=False):
            if not overwrite:
                raise CapfiltError(
                    f"--out {out!r} is not empty; pass an empty or new folder, or --overwrite "
                    "to replace its contents"
                )
            fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    return fs, path


def webdataset_key(key: str, text_id: int) -> str:
    """The sample key KEY_TEXTID; dots and slashes would split it, so they become '_'."""
    return f"{key}_{text_id}".replace(".", "_").replace("/", "_")


def write_webdataset_shard(fs, path: str, table) -> None:
    """Write one tar shard of samples (KEY.jpg, KEY.txt, KEY.json), whole or not at all."""
    tmp = io.temp_name(path)
    try:
        with fs.open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
            for row in table.to_pylist():
                sample = webdataset_key(row["key"], row["text_id"])
                meta = {name: row.get(name) for name in ("key", "text_id", "source", "text")}
                meta["itm_score"] = None if row["itm_score"] is None else round(row["itm_score"], 6)
                meta.update(width=row["width"], height=row["height"])
                meta.update({k: row[k] for k in ("url", "sha256") if k in row})
                members = (
                    ("jpg", row["jpg"]),
                    ("txt", (row["text"] or "").encode("utf-8")),
                    ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
                )
                for ext, data in members:
                    info = tarfile.TarInfo(f"{sample}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, _io.BytesIO(data))
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def export_data(
    dataset: Dataset, format: ExportFormat | str, out: str, overwrite: bool = False
) -> ExportResult:
    """Write the curated pairs and their images to `out` in `format`."""
    format = ExportFormat(format)
    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist; check the path")
    shards = dataset.require_stage("curated", "run `capfilt filter DATASET --threshold T` first")
    fs, path = _prepare_out(out, overwrite)
    result = ExportResult(format=format.value, out=out)
    if format is ExportFormat.hf:
        _export_hf(dataset, shards, out, result)
    else:
        keys: set[str] = set()
        for shard in shards:
            table, missing = curated_with_images(dataset, shard)
            result.missing_images += missing
            if format is ExportFormat.parquet:
                target = f"{path}/{shard_name(shard)}.parquet"
                io.write_table_atomic(fs, target, table.select(export_schema().names))
            else:
                write_webdataset_shard(fs, f"{path}/{shard_name(shard)}.tar", table)
            result.pairs += table.num_rows
            result.shards += 1
            keys.update(table.column("key").to_pylist())
        result.images = len(keys)
    counts = {"pairs": result.pairs, "images": result.images}
    counts["missing_images"] = len(result.missing_images)
    try:
        dataset.record_run("export-data", {"format": format.value, "out": out}, counts)
    except OSError:
        pass  # a read-only dataset (e.g. a shared bucket) can still be exported
    return result


def _export_hf(dataset: Dataset, shards: list[int], out: str, result: ExportResult) -> None:
    """Stage the pairs as local Parquet, then let `datasets` build and save the folder."""
    import tempfile

    import datasets
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="capfilt-export-") as staging:
        files, keys = [], set()
        for shard in shards:
            table, missing = curated_with_images(dataset, shard)
            result.missing_images += missing
            table = table.select(export_schema().names).rename_columns(
                ["image" if name == "jpg" else name for name in export_schema().names]
            )
            files.append(f"{staging}/{shard_name(shard)}.parquet")
            pq.write_table(table, files[-1])
            result.pairs += table.num_rows
            keys.update(table.column("key").to_pylist())
        result.images, result.shards = len(keys), len(files)
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            hf = datasets.Dataset.from_parquet(files, cache_dir=f"{staging}/cache")
            # The staged column holds bytes; the Image feature stores {bytes, path} and
            # decodes to PIL on access, which is what HF image pipelines expect.
            hf = hf.cast_column("image", datasets.Image())
            hf.save_to_disk(out)
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
