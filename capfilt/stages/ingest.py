"""`capfilt ingest`: local images and captions into DATASET/images/, in img2dataset's schema.

Three kinds of SOURCE:

- a folder of images with a captions file (csv, tsv or jsonl: a file-name column and a
  caption column; `captions.csv` / `captions.tsv` / `captions.jsonl` inside the folder is found
  by itself). Without a captions file every image becomes a row with no caption, ready for
  `capfilt caption`.
- a captions file (csv, tsv, jsonl); image paths are relative to its folder or --image-root.
- a COCO-style annotation JSON: either COCO's {"images": [...], "annotations": [...]} or the
  list BLIP trains on ([{"image": path, "caption": text or [texts]}, ...]; COCO Karpathy,
  Visual Genome). One row per image-caption pair, as BLIP uses COCO.

Images are resized by img2dataset's own resizer, so an ingested dataset matches a fetched one.
A file that is missing or unreadable becomes a row with `status` and `error_message`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

from capfilt.core import parquet as io
from capfilt.core.layout import Dataset
from capfilt.core.options import Options, option
from capfilt.sources.local import LocalColumns, Pair, SourcePairs, read_source
from capfilt.stages import image_shards
from capfilt.stages.image_shards import ImagesResult, counts_of, run_totals, shard_stats
from capfilt.stages.runner import Stage, run_stage


@dataclass(frozen=True, kw_only=True)
class IngestOptions(Options):
    """How `capfilt ingest` reads SOURCE and writes the shards."""

    captions_file: str | None = option(
        None, "Captions file for a folder SOURCE (csv, tsv, jsonl).", flag="--captions"
    )
    file_col: str | None = option(
        None, "Column of image file names.", cli_default="file_name, file, image, ..."
    )
    caption_col: str = option("caption", "Column of captions.")
    image_root: str | None = option(
        None, "Folder the image paths are relative to.", cli_default="SOURCE's folder"
    )
    image_size: int = image_shards.image_size_option()
    resize_mode: str = image_shards.resize_mode_option()
    shard_size: int = image_shards.shard_size_option()
    encode_quality: int = 95
    overwrite: bool = image_shards.overwrite_images_option("ingest")

    def local_columns(self) -> LocalColumns:
        return LocalColumns(self.captions_file, self.file_col, self.caption_col, self.image_root)


@dataclass
class IngestResult(ImagesResult):
    kind: str = ""
    rows: int = 0
    unlisted_files: int = 0


class IngestStage(Stage):
    """A slice of SOURCE's pairs → one images/ shard in img2dataset's schema."""

    name = "ingest"
    output = "images"
    inputs = ()
    refuse_changed_inputs = True  # another SOURCE would replace images/ wholesale
    unit = "rows"

    def __init__(self, options: IngestOptions, found: SourcePairs):
        super().__init__(options)
        self.found = found
        self.extra_columns = list(dict.fromkeys(k for p in found.pairs for k in p.extra))
        self.resizer = None

    def pairs(self, shard: int) -> list[Pair]:
        size = self.options.shard_size
        return self.found.pairs[shard * size : (shard + 1) * size]

    def shards(self, dataset: Dataset) -> list[int]:
        return list(range(math.ceil(len(self.found.pairs) / self.options.shard_size)))

    def input_fingerprints(self, dataset: Dataset, shard: int) -> dict:
        """The shard's rows of SOURCE, and the size and time of each image file they name."""
        listed = []
        for pair in self.pairs(shard):
            path = os.path.join(self.found.root, pair.file) if pair.file else ""
            try:
                st = os.stat(path)
                stat = [st.st_size, st.st_mtime_ns]
            except OSError:
                stat = None
            listed.append([pair.file, pair.caption, pair.extra, pair.error, stat])
        data = json.dumps(listed, default=str, sort_keys=True).encode()
        return {"source": io.bytes_fingerprint(data)}

    def work(self, dataset: Dataset, shards: list[int]) -> int:
        return sum(len(self.pairs(s)) for s in shards)

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        from capfilt.sources.safe_fetch import SafeResizer

        # Refuses decompression bombs, and turns EXIF-rotated, 16-bit, CMYK, alpha, palette and
        # animated images into upright RGB before img2dataset's resizer (OpenCV) sees them.
        self.resizer = SafeResizer.wrapping(
            image_size=self.options.image_size,
            resize_mode=self.options.resize_mode,
            resize_only_if_bigger=False,
            encode_quality=self.options.encode_quality,
        )

    def read(self, dataset: Dataset, shard: int):
        return self.pairs(shard), self.input_fingerprints(dataset, shard)

    def process(self, shard: int, pairs: list[Pair], advance):
        start = time.time()
        rows = []
        for index, pair in enumerate(pairs):
            row = _process(pair, self.found.root, self.resizer)
            row["key"], row["extra"] = _key(shard, index, self.options.shard_size), pair.extra
            rows.append(row)
            advance(1)
        stats = shard_stats(
            [r["status"] for r in rows], [r["error_message"] for r in rows], start, time.time()
        )
        return _table(rows, self.extra_columns), stats

    def write(self, folder, shard: int, result, before_rename) -> str:
        table, stats = result

        def with_stats(fingerprint: str) -> None:
            io.write_bytes_atomic(
                folder.fs,
                folder.dataset.stats_path("images", shard),
                json.dumps(stats, indent=2).encode(),
            )
            before_rename(fingerprint)

        return super().write(folder, shard, table, with_stats)

    def count(self, result) -> dict:
        return counts_of(result[1])

    def rows(self, result) -> int:
        return result[0].num_rows


def _key(shard: int, index: int, shard_size: int) -> str:
    """img2dataset's key: shard number, then the row's index in the shard."""
    digits = math.ceil(math.log10(shard_size)) if shard_size > 1 else 0
    return f"{(10**digits) * shard + index:0{digits + 5}d}"


def _exif(data: bytes) -> str | None:
    import io as _io

    try:
        import exifread

        tags = exifread.process_file(_io.BytesIO(data), details=False)
        return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})
    except Exception:  # EXIF is informational; a bad block must not fail the image
        return None


def _process(pair: Pair, root: str, resizer) -> dict:
    """One output row in img2dataset's schema, successful or not."""
    import io as _io

    path = os.path.join(root, pair.file) if pair.file else ""
    row = {
        "url": os.path.abspath(path) if path else None,
        "caption": None if pair.caption is None else str(pair.caption),
        "status": None,
        "error_message": None,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "exif": None,
        "sha256": None,
        "jpg": None,
    }
    if pair.error is not None:
        row.update(status="failed_to_download", error_message=pair.error)
        return row
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        row.update(status="failed_to_download", error_message=f"cannot read file: {e.strerror}")
        return row
    img, width, height, original_width, original_height, error = resizer(_io.BytesIO(data))
    if error is not None:
        row.update(status="failed_to_resize", error_message=error)
        return row
    row.update(
        status="success",
        width=width,
        height=height,
        original_width=original_width,
        original_height=original_height,
        exif=_exif(data),
        sha256=hashlib.sha256(data).hexdigest(),
        jpg=img,
    )
    return row


def _table(rows: list[dict], extra_columns: list[str]):
    import pyarrow as pa

    base = [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("jpg", pa.binary()),
    ]
    columns = {name: pa.array([r[name] for r in rows], type=t) for name, t in base}
    for name in extra_columns:
        values = [r["extra"].get(name) for r in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them as text
            array = pa.array([None if v is None else str(v) for v in values], pa.string())
        if pa.types.is_null(array.type):
            array = array.cast(pa.string())
        columns[name] = array
    return pa.table(columns)


def ingest(
    source: str,
    dataset: Dataset | str,
    options: IngestOptions | None = None,
    progress: bool = True,
) -> IngestResult:
    """Write SOURCE's images and captions to DATASET/images/ shards; resume a re-run.

    A re-run with the same SOURCE and options resumes; another SOURCE (or the same files
    changed) or other options are refused unless `overwrite`, which replaces the shards and
    leaves the later stages' shards stale (they are redone by their next run).
    """
    from capfilt.stages.status import downstream_stale

    options = options or IngestOptions()
    dataset = Dataset(dataset) if isinstance(dataset, str) else dataset
    found = read_source(str(source), options.local_columns())
    dataset.ensure_writable("images")
    stage = IngestStage(options, found)
    source_record = {
        "kind": found.kind,
        "path": os.path.abspath(str(source)),
        "image_root": os.path.abspath(found.root),
        "rows": len(found.pairs),
        "shard_size": options.shard_size,
        "extra_columns": stage.extra_columns,
    }
    if found.invalid_utf8_values:
        source_record["invalid_utf8_values"] = found.invalid_utf8_values
    run = run_stage(
        stage,
        dataset,
        options.overwrite,
        progress,
        command=f"capfilt ingest {source} {dataset.root}",
        record=False,
        before_work=lambda plan: dataset.set_source(source_record),
    )
    counts, errors = run_totals(run.counts)
    done_now = sorted(run.plan.todo)
    result = IngestResult(
        dataset=dataset.root,
        shards_done_now=done_now,
        shards_skipped=sorted(set(run.plan.shards) - set(done_now)),
        counts=counts,
        errors=errors,
        skipped_columns=found.skipped_columns,
        invalid_utf8_values=found.invalid_utf8_values,
        kind=found.kind,
        rows=len(found.pairs),
        unlisted_files=found.unlisted_files,
    )
    if done_now:
        result.stale_downstream = downstream_stale(dataset)
    dataset.record_run(
        "ingest",
        options.to_record(),
        {
            **counts,
            "rows": result.rows,
            "shards_done": len(done_now),
            "shards_skipped": len(result.shards_skipped),
            "unlisted_files": found.unlisted_files,
        },
        command=f"capfilt ingest {source} {dataset.root}",
        run=run.run,
        provenance_options=run.plan.options,
        errors=dict(list(errors.items())[:20]),
    )
    return result
