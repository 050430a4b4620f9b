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
A file that is missing or unreadable becomes a row with `status` and `error_message`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from capfilt import io
from capfilt.errors import CapfiltError
from capfilt.layout import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILE_NAMES = ("captions.csv", "captions.tsv", "captions.jsonl")
FILE_COLUMN_GUESSES = ("file_name", "filename", "file", "image", "image_path", "path")
RESERVED_COLUMNS = frozenset(
    "key caption url width height original_width original_height status error_message exif "
    "sha256 jpg".split()
)
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

    def validate(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise CapfiltError(
                f"unknown --resize-mode {self.resize_mode!r}; "
                f"choose one of {', '.join(RESIZE_MODES)}"
            )
        if self.image_size < 1 or self.shard_size < 1:
            raise CapfiltError("--image-size and --shard-size must be at least 1")


@dataclass
class Pair:
    """One row to ingest: an image file (relative to the root) and its caption."""

    file: str
    caption: str | None
    extra: dict = field(default_factory=dict)
    error: str | None = None  # set when the annotation itself is broken


@dataclass
class SourcePairs:
    kind: str  # "folder", "captions_file", "coco", "blip_json"
    root: str  # folder the image paths are relative to
    pairs: list[Pair]
    unlisted_files: int = 0  # images in the folder that no caption row names
    skipped_columns: list[str] = field(default_factory=list)
    invalid_utf8_values: int = 0  # caption-file values whose invalid UTF-8 bytes became U+FFFD


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


# --- reading the source ----------------------------------------------------------------------
def read_source(source: str, options: IngestOptions) -> SourcePairs:
    """The (image file, caption) pairs SOURCE describes; CapfiltError when it cannot be read."""
    if not os.path.exists(source):
        raise CapfiltError(f"ingest source {source!r} not found; pass a folder or a file")
    if os.path.isdir(source):
        captions = options.captions_file
        if captions is None:
            found = [n for n in CAPTION_FILE_NAMES if os.path.isfile(os.path.join(source, n))]
            captions = os.path.join(source, found[0]) if found else None
        root = options.image_root or source
        if captions is None:
            files = _image_files(root)
            if not files:
                raise CapfiltError(
                    f"{source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
                    f"captions file ({', '.join(CAPTION_FILE_NAMES)}); nothing to ingest"
                )
            return SourcePairs("folder", root, [Pair(f, None) for f in files])
        listed = _read_captions_file(captions, root, options)
        named = {os.path.normpath(p.file) for p in listed.pairs}
        listed.unlisted_files = sum(os.path.normpath(f) not in named for f in _image_files(root))
        return listed
    lower = source.lower()
    if lower.endswith(".json"):
        return _read_annotation_json(source, options)
    if lower.endswith((".csv", ".tsv", ".jsonl")):
        return _read_captions_file(source, options.image_root or os.path.dirname(source), options)
    raise CapfiltError(
        f"cannot tell what {source!r} is: pass a folder of images, a captions file "
        "(.csv, .tsv, .jsonl) or an annotation .json"
    )


def _image_files(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found


def _read_captions_file(path: str, root: str, options: IngestOptions) -> SourcePairs:
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json

    try:
        if path.lower().endswith(".jsonl"):
            from capfilt.fetch import _check_jsonl_lines

            with open(path, "rb") as f:
                _check_jsonl_lines(f)  # pyarrow crashes on a line that is not an object
            table = pa_json.read_json(path)
        else:
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
            table = pa_csv.read_csv(
                path,
                parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                convert_options=pa_csv.ConvertOptions(strings_can_be_null=True),
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CapfiltError(f"cannot read captions file {path!r}: {first}") from e
    from capfilt.fetch import utf8_text_columns

    table, invalid_utf8 = utf8_text_columns(table)
    columns = table.column_names
    file_col = options.file_col or next((c for c in FILE_COLUMN_GUESSES if c in columns), None)
    if file_col is None or file_col not in columns:
        wanted = options.file_col or " or ".join(FILE_COLUMN_GUESSES)
        raise CapfiltError(
            f"captions file {path!r} has no file-name column ({wanted}); "
            f"its columns: {', '.join(columns)}. Pass --file-col"
        )
    if options.caption_col not in columns:
        raise CapfiltError(
            f"captions file {path!r} has no column {options.caption_col!r}; its columns: "
            f"{', '.join(columns)}. Pass --caption-col"
        )
    rest = [c for c in columns if c not in (file_col, options.caption_col)]
    extras = [c for c in rest if c not in RESERVED_COLUMNS]
    pairs = []
    for row in table.to_pylist():
        file = row[file_col]
        pair = Pair(
            "" if file is None else str(file),
            row[options.caption_col],
            {c: row[c] for c in extras},
        )
        if file is None:
            pair.error = f"row of {os.path.basename(path)} has no {file_col}"
        pairs.append(pair)
    if not pairs:
        raise CapfiltError(f"captions file {path!r} has no rows; nothing to ingest")
    skipped = [c for c in rest if c in RESERVED_COLUMNS]
    return SourcePairs(
        "captions_file", root, pairs, skipped_columns=skipped, invalid_utf8_values=invalid_utf8
    )


def _read_annotation_json(path: str, options: IngestOptions) -> SourcePairs:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CapfiltError(f"cannot read annotation file {path!r}: {e}") from e
    root = options.image_root or os.path.dirname(path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return SourcePairs("coco", root, _coco_pairs(data, path))
    if isinstance(data, list) and all(isinstance(e, dict) and "image" in e for e in data):
        pairs = _blip_pairs(data)
        if not pairs:
            raise CapfiltError(f"annotation file {path!r} has no entries; nothing to ingest")
        return SourcePairs("blip_json", root, pairs)
    raise CapfiltError(
        f"{path!r} is neither COCO-style ({{'images': [...], 'annotations': [...]}}) nor a "
        "BLIP annotation list ([{'image': path, 'caption': text}, ...])"
    )


def _coco_pairs(data: dict, path: str) -> list[Pair]:
    images = {}
    for image in data["images"]:
        images[image["id"]] = image.get("file_name") or image.get("coco_url") or ""
    pairs, captioned = [], set()
    for ann in data["annotations"]:
        image_id = ann.get("image_id")
        extra = {"image_id": image_id, "annotation_id": ann.get("id")}
        if image_id not in images:
            pairs.append(
                Pair(
                    "",
                    ann.get("caption"),
                    extra,
                    f"annotation names image id {image_id}, "
                    f"which {os.path.basename(path)} does not list",
                )
            )
            continue
        captioned.add(image_id)
        pairs.append(Pair(images[image_id], ann.get("caption"), extra))
    # An image without a caption (COCO's test split) is kept, ready to be captioned.
    for image_id, file in images.items():
        if image_id not in captioned:
            pairs.append(Pair(file, None, {"image_id": image_id, "annotation_id": None}))
    if not pairs:
        raise CapfiltError(f"annotation file {path!r} has no images; nothing to ingest")
    return pairs


def _blip_pairs(entries: list[dict]) -> list[Pair]:
    pairs = []
    for entry in entries:
        captions = entry.get("caption")
        captions = captions if isinstance(captions, list) else [captions]
        extra = {
            k: v
            for k, v in entry.items()
            if k not in ("image", "caption")
            and k not in RESERVED_COLUMNS
            and (v is None or isinstance(v, (str, int, float, bool)))
        }
        for caption in captions or [None]:
            pairs.append(Pair(str(entry["image"]), caption, dict(extra)))
    return pairs


# --- processing ------------------------------------------------------------------------------
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
    found = read_source(str(source), options)
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

    from capfilt.safe_fetch import SafeResizer

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
