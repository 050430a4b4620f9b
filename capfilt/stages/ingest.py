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
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.sources.local import LocalColumns, Pair, read_source

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


@dataclass(frozen=True)
class IngestOptions:
    """How `capfilt ingest` reads SOURCE and writes the shards."""

    captions_file: str | None = None
    file_col: str | None = None  # None: the first of FILE_COLUMN_GUESSES the file has
    caption_col: str = "caption"
    image_root: str | None = None
    image_size: int = 384
    resize_mode: str = "keep_ratio"
    shard_size: int = 10_000
    encode_quality: int = 95
    overwrite: bool = False

    def local_columns(self) -> LocalColumns:
        return LocalColumns(self.captions_file, self.file_col, self.caption_col, self.image_root)

    def validate(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise CapfiltError(
                f"unknown --resize-mode {self.resize_mode!r}; "
                f"choose one of {', '.join(RESIZE_MODES)}"
            )
        if self.image_size < 1 or self.shard_size < 1:
            raise CapfiltError("--image-size and --shard-size must be at least 1")


@dataclass
class IngestResult:
    dataset: str
    kind: str
    rows: int
    shards_done_now: list[int]
    shards_skipped: list[int]
    counts: dict
    errors: dict
    unlisted_files: int
    skipped_columns: list[str]
    invalid_utf8_values: int = 0

    @property
    def success_rate(self) -> float:
        return self.counts["successes"] / self.counts["count"] if self.counts["count"] else 0.0


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


def _shards(pairs: list[Pair], shard_size: int) -> Iterator[tuple[int, list[Pair]]]:
    for shard in range(math.ceil(len(pairs) / shard_size)):
        yield shard, pairs[shard * shard_size : (shard + 1) * shard_size]


def _check_resume(dataset: Dataset, rows: int, options: IngestOptions) -> None:
    """Refuse a re-run whose shards would not line up with the shards already written."""
    if options.overwrite or not dataset.has_stage("images"):
        return
    source = dataset.read_manifest().get("source") or {}
    if (source.get("shard_size"), source.get("rows")) != (options.shard_size, rows):
        raise CapfiltError(
            f"{dataset.root!r} already has images/ shards from another source or shard size; "
            "re-run with the same SOURCE and --shard-size to resume, or pass --overwrite"
        )


def ingest(
    source: str,
    dataset: Dataset | str,
    options: IngestOptions | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> IngestResult:
    """Write SOURCE's images and captions to DATASET/images/ shards; resume a re-run."""
    options = options or IngestOptions()
    dataset = Dataset(dataset) if isinstance(dataset, str) else dataset
    options.validate()
    found = read_source(str(source), options.local_columns())
    dataset.ensure_writable()
    _check_resume(dataset, len(found.pairs), options)
    if options.overwrite and dataset.fs.exists(dataset.stage_dir("images")):
        dataset.fs.rm(dataset.stage_dir("images"), recursive=True)
    dataset.remove_temp_files("images")
    extra_columns = list(dict.fromkeys(k for p in found.pairs for k in p.extra))
    # Recorded before any shard is written, so that a killed run can resume.
    dataset.set_source(
        {
            "kind": found.kind,
            "path": os.path.abspath(str(source)),
            "image_root": os.path.abspath(found.root),
            "rows": len(found.pairs),
            "shard_size": options.shard_size,
            "extra_columns": extra_columns,
            **(
                {"invalid_utf8_values": found.invalid_utf8_values}
                if found.invalid_utf8_values
                else {}
            ),
        }
    )

    from capfilt.sources.safe_fetch import SafeResizer

    # Refuses decompression bombs, and turns EXIF-rotated, 16-bit, CMYK, alpha, palette and
    # animated images into upright RGB before img2dataset's resizer (OpenCV) sees them.
    resizer = SafeResizer.wrapping(
        image_size=options.image_size,
        resize_mode=options.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=options.encode_quality,
    )
    done = set(dataset.shards("images"))
    total, rows_done = len(found.pairs), 0
    counts, errors, done_now, skipped = Counter(), Counter(), [], []
    for shard, pairs in _shards(found.pairs, options.shard_size):
        if shard in done:
            skipped.append(shard)
            rows_done += len(pairs)
            continue
        start = time.time()
        rows = []
        for index, pair in enumerate(pairs):
            row = _process(pair, found.root, resizer)
            row["key"], row["extra"] = _key(shard, index, options.shard_size), pair.extra
            rows.append(row)
        statuses = Counter(r["status"] for r in rows)
        messages = Counter(r["error_message"] or "success" for r in rows)
        stats = {
            "count": len(rows),
            "successes": statuses["success"],
            "failed_to_download": statuses["failed_to_download"],
            "failed_to_resize": statuses["failed_to_resize"],
            "duration": time.time() - start,
            "start_time": start,
            "end_time": time.time(),
            "status_dict": dict(messages),
        }
        dataset.write_shard("images", shard, _table(rows, extra_columns))
        io.write_bytes_atomic(
            dataset.fs, dataset.stats_path("images", shard), json.dumps(stats, indent=2).encode()
        )
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            counts[key] += stats[key]
        errors.update({m: n for m, n in messages.items() if m != "success"})
        done_now.append(shard)
        rows_done += len(rows)
        if on_progress is not None:
            on_progress(rows_done, total, counts["successes"])

    counts = {
        k: counts[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")
    }
    result = IngestResult(
        dataset=dataset.root,
        kind=found.kind,
        rows=total,
        shards_done_now=done_now,
        shards_skipped=skipped,
        counts=counts,
        errors=dict(errors.most_common()),
        unlisted_files=found.unlisted_files,
        skipped_columns=found.skipped_columns,
        invalid_utf8_values=found.invalid_utf8_values,
    )
    dataset.record_run(
        "ingest",
        asdict(options),
        {
            **counts,
            "rows": total,
            "shards_done": len(done_now),
            "shards_skipped": len(skipped),
            "unlisted_files": found.unlisted_files,
        },
        command=f"capfilt ingest {source} {dataset.root}",
        errors=dict(list(result.errors.items())[:20]),
    )
    return result
