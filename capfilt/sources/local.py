"""Local image-text sources: a folder with a captions file, a captions file, or a COCO-style
or BLIP annotation JSON (one pair per image and caption)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from capfilt.core.errors import CapfiltError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


CAPTION_FILE_NAMES = ("captions.csv", "captions.tsv", "captions.jsonl")


FILE_COLUMN_GUESSES = ("file_name", "filename", "file", "image", "image_path", "path")


RESERVED_COLUMNS = frozenset(
    "key caption url width height original_width original_height status error_message exif "
    "sha256 jpg".split()
)


@dataclass(frozen=True)
class LocalColumns:
    """Where a local source's captions are and which columns name the files and captions."""

    captions_file: str | None = None
    file_col: str | None = None  # None: the first of FILE_COLUMN_GUESSES the file has
    caption_col: str = "caption"
    image_root: str | None = None


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


def read_source(source: str, options: LocalColumns) -> SourcePairs:
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


def _read_captions_file(path: str, root: str, options: LocalColumns) -> SourcePairs:
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json

    try:
        if path.lower().endswith(".jsonl"):
            from capfilt.sources.url_list import check_jsonl_lines

            with open(path, "rb") as f:
                check_jsonl_lines(f)  # pyarrow crashes on a line that is not an object
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
    from capfilt.sources.url_list import utf8_text_columns

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


def _read_annotation_json(path: str, options: LocalColumns) -> SourcePairs:
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
