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
Images that `capfilt dedup` does not keep (dedup/ `kept` false: a duplicate, a placeholder, a
copy of an evaluation image) are left out, also when curated/ was derived before dedup ran.

An export is written whole or not at all: its shards go to a staging folder beside OUT
(.OUT.capfilt-export/, resumed after a kill, each shard with its provenance), and the finished
export replaces OUT in one rename. OUT/_capfilt_export.json marks a folder as capfilt's export
(which curated/ generation, which shards, which files): capfilt replaces only such a folder,
only with --overwrite, and never one that holds files it did not write, a dataset, or a folder
inside a dataset.
"""

from __future__ import annotations

import io as _io
import json
import tarfile
from dataclasses import dataclass, field
from enum import Enum

from capfilt.core import parquet as io
from capfilt.core import provenance
from capfilt.core.distributed import sum_counts
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import MANIFEST, METADATA_DIRS, STAGES, Dataset, ShardFolder
from capfilt.core.locks import path_lock
from capfilt.core.options import Options, option
from capfilt.stages.runner import Stage, run_stage

MARKER = "_capfilt_export.json"
FORMATS = ("parquet", "webdataset", "hf")


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


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """Options of `capfilt export-data`."""

    out: str = option(help="Folder to write (local path or fsspec URL).", flag="--out")
    format: str = option(
        "parquet",
        "parquet (self-contained shards), webdataset (tar shards: KEY_TEXTID.jpg/.txt/.json per "
        "curated pair) or hf (datasets.save_to_disk folder with an Image column).",
        choices=FORMATS,
        flag="--format",
        output=True,
    )
    overwrite: bool = option(
        False,
        "Replace an earlier export in --out (only a folder capfilt's export-data wrote, "
        "holding nothing else).",
    )


def join_images(curated, images):
    """Curated pairs joined with their image bytes, sorted by (key, text_id).

    Returns (table with EXPORT_SCHEMA plus `url`/`sha256` when images/ has them, missing keys).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if images is None:
        return export_schema().empty_table(), sorted(set(curated.column("key").to_pylist()))
    wanted = ["key", "jpg", "width", "height", "url", "sha256", "status"]
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
    columns = {
        name: (
            joined.column(name).cast(schema.field(name).type)
            if name in joined.column_names  # width and height are img2dataset's, not required
            else pa.nulls(joined.num_rows, schema.field(name).type)
        )
        for name in schema.names
    }
    for extra in ("url", "sha256"):
        if extra in joined.column_names:
            columns[extra] = joined.column(extra).cast(pa.string())
    return pa.table(columns), missing


class ExportStage(Stage):
    """curated/ shard (+ its images/ shard) → one shard of the export."""

    name = "export-data"
    output = "export"
    inputs = ("curated",)
    optional_inputs = ("images", "dedup")
    hint = "run `capfilt filter DATASET --threshold T` first"
    unit = "shards"

    def __init__(self, options: ExportOptions):
        super().__init__(options)
        self.missing_images: list[str] = []

    @property
    def staged_format(self) -> str:
        """The shards the runner writes: hf is built from staged Parquet shards at the end."""
        return "parquet" if self.options.format == "hf" else self.options.format

    def process(self, shard: int, inputs: dict, advance):
        """(the shard's table, keys of curated pairs without image bytes)"""
        from capfilt.stages.curate import without_dropped

        curated = without_dropped(inputs["curated"], inputs.get("dedup"))
        table, missing = join_images(curated, inputs["images"])
        self.missing_images += missing
        if self.options.format == "hf":
            names = export_schema().names
            table = table.select(names).rename_columns(
                ["image" if name == "jpg" else name for name in names]
            )
        elif self.options.format == "parquet":
            table = table.select(export_schema().names)
        return table, missing

    def write(self, folder, shard: int, result, before_rename) -> str:
        table, _ = result
        folder.fs.makedirs(folder.path, exist_ok=True)
        if self.staged_format == "webdataset":
            return write_webdataset_shard(
                folder.fs, folder.shard_path(shard), table, before_rename=before_rename
            )
        return super().write(folder, shard, table, before_rename)

    def count(self, result) -> dict:
        table, missing = result
        images = len(set(table.column("key").to_pylist()))
        return dict(pairs=table.num_rows, images=images, missing_images=len(missing))

    def rows(self, result) -> int:
        return result[0].num_rows


def webdataset_key(key: str, text_id: int) -> str:
    """The sample key KEY_TEXTID; dots and slashes would split it, so they become '_'."""
    return f"{key}_{text_id}".replace(".", "_").replace("/", "_")


def write_webdataset_shard(fs, path: str, table, before_rename=None) -> str:
    """Write one tar shard of samples (KEY.jpg, KEY.txt, KEY.json), whole or not at all.

    `before_rename(fingerprint)` runs once the tar is complete under its temporary name."""

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w|") as tar:
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

    return io.write_atomic(fs, path, write, io.content_fingerprint, before_rename)


# --- the output folder ---------------------------------------------------------------------------
class _Out:
    """--out and its staging folder beside it, on one filesystem."""

    def __init__(self, out: str):
        import fsspec

        self.out = out
        self.fs, path = fsspec.core.url_to_fs(out)
        self.path = path.rstrip("/") or "/"
        head, _, name = self.path.rpartition("/")
        self.staging = f"{head}/.{name}.capfilt-export"
        self.old = f"{head}/.{name}.capfilt-export-old"

    def marker(self) -> dict | None:
        try:
            with self.fs.open(f"{self.path}/{MARKER}", "rb") as f:
                marker = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def files(self, root: str) -> list[str]:
        """Every file under `root`, relative to it."""
        return sorted(p[len(root) + 1 :] for p in self.fs.find(root))


def _check_out(dataset: Dataset, out: _Out) -> dict | None:
    """Refuse an --out that is, holds or lies in a dataset, is a file, or holds files capfilt
    did not write; return the marker of an earlier export there (None if empty or new)."""
    if set(_protocols(out.fs)) & set(_protocols(dataset.fs)):
        here, there = _real(out.fs, out.path), _real(dataset.fs, dataset.path)
        if here == there or here.startswith(there + "/") or there.startswith(here + "/"):
            raise CapfiltError(
                f"--out {out.out!r} is, holds or lies inside the dataset {dataset.root!r}; "
                "export to a folder outside it"
            )
    if not out.fs.exists(out.path):
        return None
    if out.fs.isfile(out.path):
        raise CapfiltError(f"--out {out.out!r} is a file; pass a folder")
    if not out.fs.ls(out.path, detail=False):
        return None
    if out.fs.exists(f"{out.path}/{MANIFEST}") or any(
        out.fs.exists(f"{out.path}/{stage}") for stage in STAGES
    ):
        raise CapfiltError(f"--out {out.out!r} is a dataset folder; export to a new folder")
    marker = out.marker()
    if marker is None:
        raise CapfiltError(
            f"--out {out.out!r} is not empty and was not written by capfilt export-data; pass "
            "an empty or new folder (capfilt never deletes files it did not write)"
        )
    return marker


def _protocols(fs) -> tuple:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _real(fs, path: str) -> str:
    import os

    return os.path.realpath(path) if "file" in _protocols(fs) else path.rstrip("/")


def export_data(
    dataset: Dataset, format: ExportFormat | str, out: str, overwrite: bool = False
) -> ExportResult:
    """Write the curated pairs and their images to `out` in `format`, whole or not at all."""
    options = ExportOptions(out=out, format=ExportFormat(format).value, overwrite=overwrite)
    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist; check the path")
    dataset.read_manifest()  # the run is recorded there: a damaged one stops it before the work
    target = _Out(out)
    earlier = _check_out(dataset, target)
    stage = ExportStage(options)
    curated = stage.folder(dataset, "curated")  # this generation, whatever a filter does now
    if not curated.shards():
        dataset.require_stage("curated", stage.hint)
    with path_lock(target.fs, target.path, f"--out {out!r}", f"capfilt export-data {out}"):
        if _finish_switch(target):
            earlier = _check_out(dataset, target)
        wanted = {
            "dataset": dataset.root,
            "format": options.format,
            "curated_generation": curated.generation,
            "inputs": {s: stage.input_fingerprints(dataset, s) for s in curated.shards()},
        }
        if earlier is not None:
            if {k: earlier.get(k) for k in wanted} == _json_keys(wanted):
                return _result(earlier, out)  # the same export is already there
            if not overwrite:
                raise CapfiltError(
                    f"--out {out!r} holds an earlier export of {earlier.get('dataset')!r} "
                    f"(curated/ generation {earlier.get('curated_generation')}); pass "
                    "--overwrite to replace it"
                )
            extra = set(target.files(target.path)) - set(earlier.get("files", [])) - {MARKER}
            extra = {f for f in extra if f.split("/")[0] not in METADATA_DIRS}
            if extra:
                raise CapfiltError(
                    f"--out {out!r} holds files capfilt did not write ({sorted(extra)[0]!r}, "
                    f"{len(extra)} in all); move them away first"
                )
        suffix = ".tar" if stage.staged_format == "webdataset" else ".parquet"
        shards_dir = target.staging + ("/parquet" if options.format == "hf" else "")
        run = run_stage(
            stage,
            dataset,
            progress=False,
            locked=True,
            record=False,
            target=ShardFolder(target.fs, shards_dir, suffix),
        )
        final = target.staging
        if options.format == "hf":
            final = f"{target.staging}/hf"
            _build_hf(target, shards_dir, final)
        # Totals of every shard, also those a killed run staged before this one resumed.
        staged = ShardFolder(target.fs, shards_dir, suffix)
        totals = sum_counts([provenance.read(staged, s).counts for s in run.plan.shards])
        marker = dict(
            wanted,
            run=run.run,
            pairs=totals.get("pairs", 0),
            images=totals.get("images", 0),
            shards=len(run.plan.shards),
            missing_images=totals.get("missing_images", 0),
        )
        marker["files"] = [f for f in target.files(final) if f.split("/")[0] not in METADATA_DIRS]
        io.write_bytes_atomic(
            target.fs, f"{final}/{MARKER}", json.dumps(marker, indent=1, default=str).encode()
        )
        _switch(target, final)
    result = _result(marker, out)
    result.missing_images = sorted(set(stage.missing_images))
    counts = {"pairs": result.pairs, "images": result.images}
    counts["missing_images"] = len(result.missing_images)
    try:
        dataset.record_run(
            "export-data", options.to_record(), counts, curated_generation=curated.generation
        )
    except OSError:
        pass  # a read-only dataset (e.g. a shared bucket) can still be exported
    return result


def _json_keys(data: dict) -> dict:
    """`data` as it reads back from JSON (int keys become strings)."""
    return json.loads(json.dumps(data, default=str))


def _result(marker: dict, out: str) -> ExportResult:
    return ExportResult(
        format=marker["format"],
        out=out,
        pairs=marker.get("pairs", 0),
        images=marker.get("images", 0),
        shards=marker.get("shards", 0),
    )


def _finish_switch(target: _Out) -> bool:
    """Complete a switch that a kill interrupted between its renames; True if it did any."""
    fs = target.fs
    finished = False
    if not fs.exists(target.path):
        for final in (target.staging, f"{target.staging}/hf"):
            if fs.exists(f"{final}/{MARKER}"):  # the marker is written last: it is whole
                fs.mv(final, target.path, recursive=True)
                finished = True
                break
    for leftover in (target.old, target.staging if finished else None):
        if leftover and fs.exists(leftover) and fs.exists(target.path):
            fs.rm(leftover, recursive=True)
            finished = True
    return finished


def _switch(target: _Out, final: str) -> None:
    """Put the finished export at --out: one rename (two, when an earlier export is there;
    on an object store a copy, which readers may see half-way)."""
    fs = target.fs
    if fs.exists(target.old):
        fs.rm(target.old, recursive=True)
    if fs.exists(target.path):
        fs.mv(target.path, target.old, recursive=True)
    fs.mv(final, target.path, recursive=True)
    for leftover in (target.old, target.staging):
        if fs.exists(leftover):
            fs.rm(leftover, recursive=True)


def _build_hf(target: _Out, shards_dir: str, final: str) -> None:
    """A `datasets` folder (save_to_disk) from the staged Parquet shards."""
    import tempfile

    import datasets

    fs = target.fs
    local = "file" in _protocols(fs)
    files = [p if local else fs.unstrip_protocol(p) for p in fs.glob(f"{shards_dir}/*.parquet")]
    files.sort()
    if fs.exists(final):
        fs.rm(final, recursive=True)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="capfilt-export-") as cache:
            if files:
                hf = datasets.Dataset.from_parquet(files, cache_dir=cache)
            else:
                import pyarrow as pa

                names = ["image" if n == "jpg" else n for n in export_schema().names]
                hf = datasets.Dataset(pa.table(export_schema().empty_table().rename_columns(names)))
            # The staged column holds bytes; the Image feature stores {bytes, path} and
            # decodes to PIL on access, which is what HF image pipelines expect.
            hf = hf.cast_column("image", datasets.Image())
            hf.save_to_disk(final if local else fs.unstrip_protocol(final))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
