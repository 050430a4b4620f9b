"""capfilt dedup: planted duplicates of every kind found (precision and recall measured and
printed), curated/ and export-data without the images not kept, the filter's embeddings,
provenance (a re-run does nothing, other options re-group without hashing) and a killed run
that resumes.

The planted set is toy scenes (a gradient and a few random shapes each, richer than
conftest's single shape so that distinct scenes have distinct pHashes): originals, and copies
of them that are exact, the same pixels in a PNG, re-encoded, resized and cropped;
placeholders (a blank image, an "image unavailable" picture behind many sites and a resized
copy of it); and copies of the images of an evaluation set. The tiny random BLIP filter of the
tests gives every image nearly the same embedding (cosine ≈ 1), so the semantic pass is
measured with a stand-in embedder written to embeddings/ as the filter would write them: a
16 × 16 colour thumbnail, centred and normalised. The filter's own embeddings are tested for
what they are (one per image, written with the scores, the vectors ITC uses).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import images_schema, jpeg_bytes
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet as capfilt_io
from capfilt.core import provenance
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.dedup.groups import phash_pairs, popcount64
from capfilt.dedup.hashing import hash_image, url_domain
from capfilt.dedup.semantic import semantic_pairs
from capfilt.stages import dedup as dedup_stage
from capfilt.stages.dedup import DedupOptions, dedup_dataset

SIDE = 128
DUPLICATE_KINDS = ("exact", "pixels", "reencoded", "resized", "cropped")
# The reasons a planted kind may be found by (re-encoded and resized copies by pHash; a crop
# moves the pHash more, so the semantic pass finds what pHash does not).
FOUND_AS = {
    "exact": {"exact"},
    "pixels": {"pixels"},
    "reencoded": {"perceptual"},
    "resized": {"perceptual"},
    "cropped": {"perceptual", "semantic"},
}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- the planted set -----------------------------------------------------------------------------
def scene(seed: int, side: int = SIDE):
    """A toy scene: a vertical gradient and 3–6 shapes of random colours and places."""
    rng = random.Random(seed)
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    top = [rng.randrange(256) for _ in range(3)]
    bottom = [rng.randrange(256) for _ in range(3)]
    for y in range(side):
        t = y / (side - 1)
        draw.line(
            [(0, y), (side, y)],
            fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    for _ in range(rng.randint(3, 6)):
        x0, y0 = rng.randrange(side), rng.randrange(side)
        w, h = rng.randint(side // 8, side // 2), rng.randint(side // 8, side // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.choice("erp")
        if kind == "e":
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        elif kind == "r":
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
        else:
            draw.polygon([(rng.randrange(side), rng.randrange(side)) for _ in range(3)], fill=fill)
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def copy_of(kind: str, original: bytes) -> bytes:
    """A planted copy of JPEG bytes `original`."""
    img = Image.open(io.BytesIO(original)).convert("RGB")
    if kind == "exact":
        return original
    if kind == "pixels":  # another file of the very same decoded pixels
        return png_bytes(img)
    if kind == "reencoded":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=50)
        return buf.getvalue()
    if kind == "resized":
        return jpeg_bytes(img.resize((SIDE * 6 // 10, SIDE * 6 // 10), Image.Resampling.BICUBIC))
    if kind == "cropped":  # 3 px off each side: 5 % of the picture
        return jpeg_bytes(img.crop((3, 3, SIDE - 3, SIDE - 3)))
    raise ValueError(kind)


def unavailable_icon(side: int = 160) -> Image.Image:
    """What a host serves for a photo it no longer has."""
    img = Image.new("RGB", (side, side), (226, 226, 226))
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 50, 120, 110), outline=(150, 150, 150), width=6)
    draw.line((40, 110, 120, 50), fill=(150, 150, 150), width=6)
    draw.ellipse((95, 60, 110, 75), fill=(150, 150, 150))
    return img


@dataclass
class Row:
    key: str
    url: str | None
    data: bytes | None
    kind: str  # original, unique, a DUPLICATE_KINDS kind, placeholder, contaminated, failed
    origin: str | None = None  # the truth group: which picture it shows


def write_rows(root, shards: list[list[Row]]) -> None:
    ds = Dataset(str(root))
    for shard, rows in enumerate(shards):
        records = []
        for row in rows:
            ok = row.data is not None
            records.append(
                dict(
                    key=row.key,
                    url=row.url,
                    caption=f"picture {row.origin}",
                    status="success" if ok else "failed_to_download",
                    error_message=None if ok else "HTTP Error 404",
                    width=SIDE if ok else None,
                    height=SIDE if ok else None,
                    original_width=SIDE if ok else None,
                    original_height=SIDE if ok else None,
                    exif="{}" if ok else None,
                    sha256=hashlib.sha256(row.data).hexdigest() if ok else None,
                    jpg=row.data,
                )
            )
        schema = images_schema()
        ds.write_shard(
            "images", shard, pa.table({n: [r[n] for r in records] for n in schema.names}, schema)
        )


def plant(root, eval_root) -> dict[str, Row]:
    """The planted training set (3 shards) and evaluation set (1 shard); key → Row."""
    originals = {i: jpeg_bytes(scene(i)) for i in range(40)}
    evaluation = {i: jpeg_bytes(scene(100 + i)) for i in range(10)}
    shards: list[list[Row]] = [[], [], []]

    def add(shard: int, url, data, kind, origin) -> None:
        key = f"{shard:05d}{len(shards[shard]):04d}"
        shards[shard].append(Row(key, url, data, kind, origin))

    for i, data in originals.items():  # the originals come first, so their keys are smallest
        kind = "original" if i < 32 else "unique"
        add(0, f"https://site{i % 7}.example/{i}.jpg", data, kind, f"scene{i}")
    for n, kind in enumerate(DUPLICATE_KINDS):
        for j in range(6):
            i = n * 6 + j + (2 if kind != "exact" else 0)
            add(
                1,
                f"https://mirror.example/{kind}/{i}.jpg",
                copy_of(kind, originals[i]),
                kind,
                f"scene{i}",
            )
    exact_extra = [0, 1]  # two more exact copies on a second mirror: 3 sites, not placeholders
    for i in exact_extra:
        add(1, f"https://cdn.other.example/{i}.jpg", originals[i], "exact", f"scene{i}")
    blank = jpeg_bytes(Image.new("RGB", (SIDE, SIDE), (128, 128, 128)))
    for s in range(3):
        add(2, f"https://blank{s}.example/b.jpg", blank, "placeholder", "blank")
    icon = jpeg_bytes(unavailable_icon())
    for s in range(6):
        add(2, f"https://host{s}.example/missing.jpg", icon, "placeholder", "icon")
    small_icon = jpeg_bytes(unavailable_icon().resize((100, 100), Image.Resampling.BICUBIC))
    add(2, "https://host9.example/missing-small.jpg", small_icon, "placeholder", "icon")
    for i, kind in enumerate(
        ["exact", "exact", "reencoded", "reencoded", "resized", "resized", "cropped"]
    ):
        add(
            2,
            f"https://leak.example/{i}.jpg",
            copy_of(kind, evaluation[i]),
            "contaminated",
            f"eval{i}",
        )
    add(2, "https://site1.example/broken.jpg", b"<html>gone</html>", "broken", None)
    add(2, "https://site2.example/404.jpg", None, "failed", None)
    write_rows(root, shards)
    eval_rows = [
        Row(f"ev{i:03d}", f"https://coco.example/{i}.jpg", data, "evaluation", f"eval{i}")
        for i, data in evaluation.items()
    ]
    write_rows(eval_root, [eval_rows])
    return {row.key: row for rows in shards for row in rows}


def toy_embedding(data: bytes) -> np.ndarray:
    """The stand-in embedder: a 16 × 16 colour thumbnail, centred, unit norm (768 values)."""
    from capfilt.images.decode import decode_image

    small = decode_image(data).image.resize((16, 16), Image.Resampling.BOX)
    vector = np.asarray(small, dtype=np.float32).ravel()
    vector -= vector.mean()
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector  # a blank image: no direction at all


def write_toy_embeddings(root) -> None:
    """embeddings/ shards as the filter writes them, from the stand-in embedder."""
    from capfilt.images.decode import decode_image

    ds = Dataset(str(root))
    folder = ds.folder("embeddings")
    for shard in ds.shards("images"):
        table = ds.read_shard("images", shard, ["key", "status", "jpg"]).to_pylist()
        keys, vectors = [], []
        for row in table:
            if row["status"] == "success" and decode_image(row["jpg"]).ok:
                keys.append(row["key"])
                vectors.append(toy_embedding(row["jpg"]))
        capfilt_io.write_table_atomic(
            ds.fs, folder.shard_path(shard), capfilt_io.embeddings_table(keys, np.stack(vectors))
        )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("planted")
    root, eval_root = base / "train", base / "coco"
    truth = plant(root, eval_root)
    write_toy_embeddings(root)
    write_toy_embeddings(eval_root)
    return root, eval_root, truth


def verdicts(root) -> dict[str, dict]:
    return {r["key"]: r for r in Dataset(str(root)).read_stage("dedup").to_pylist()}


# --- precision and recall -------------------------------------------------------------------------
def measure(found: dict[str, dict], truth: dict[str, Row]) -> dict[str, dict]:
    """Per planted kind: recall (the copies found, each in its original's group with one image
    of the group kept); per reason: precision (the images left out for it that truly are a
    copy of the image kept, a placeholder, or a copy of an evaluation image)."""
    by_origin: dict[str, list[str]] = {}
    for key, row in truth.items():
        if row.origin:
            by_origin.setdefault(row.origin, []).append(key)
    figures: dict[str, dict] = {}
    for kind in (*DUPLICATE_KINDS, "placeholder", "contaminated"):
        planted = [k for k, row in truth.items() if row.kind == kind]
        if kind in DUPLICATE_KINDS:
            hits = []
            for key in planted:
                verdict = found[key]
                group = [found[k] for k in by_origin[truth[key].origin]]
                kept_one = sum(bool(v["kept"]) for v in group) == 1
                same = all(v["group_id"] == verdict["group_id"] for v in group)
                hits.append(not verdict["kept"] and same and kept_one)
        else:
            hits = [found[key]["reason"] == kind for key in planted]
        figures[kind] = {"planted": len(planted), "found": sum(hits)}
        figures[kind]["recall"] = sum(hits) / len(planted)
    reasons = ("exact", "pixels", "perceptual", "semantic", "placeholder", "contaminated")
    for reason in reasons:
        flagged = [k for k, v in found.items() if v["reason"] == reason]
        right = 0
        for key in flagged:
            row, verdict = truth[key], found[key]
            if reason in ("placeholder", "contaminated"):
                right += row.kind == reason
            else:
                kept = truth[verdict["representative"]]
                right += row.kind in DUPLICATE_KINDS and kept.origin == row.origin
        figures.setdefault(f"reason {reason}", {})
        figures[f"reason {reason}"].update(
            flagged=len(flagged), precision=right / len(flagged) if flagged else None
        )
    removed = [k for k, v in found.items() if v["kept"] is False]
    should = {
        k
        for k, row in truth.items()
        if row.kind in (*DUPLICATE_KINDS, "placeholder", "contaminated")
    }
    figures["all"] = dict(
        removed=len(removed),
        precision=len(should & set(removed)) / len(removed),
        recall=len(should & set(removed)) / len(should),
    )
    return figures


def print_figures(title: str, figures: dict) -> None:
    print(f"\n{title}")
    for name, f in figures.items():
        cells = ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()
        )
        print(f"  {name:<20} {cells}")


def copy_of_dataset(source, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(source, root)
    return root


def test_planted_duplicates_are_found_with_precision_and_recall(planted, tmp_path):
    source, eval_root, truth = planted
    root = copy_of_dataset(source, tmp_path)
    options = DedupOptions(against=(str(eval_root),), workers=2, semantic="off")
    hash_only = dedup_dataset(str(root), options, progress=False)
    assert hash_only.hashed.shards_done == 3
    without_semantic = measure(verdicts(root), truth)
    print_figures("dedup of the planted set, pHash ≤ 4 bits, no semantic pass:", without_semantic)

    # Semantic on: a new grouping from the same hashes (nothing is hashed again).
    result = dedup_dataset(str(root), options.replace(semantic="auto"), progress=False)
    assert result.hashed.shards_done == 0 and result.regrouped
    found = verdicts(root)
    figures = measure(found, truth)
    print_figures("dedup of the planted set, pHash ≤ 4 bits + semantic (eps 0.05):", figures)

    for kind in ("exact", "pixels", "reencoded", "resized", "placeholder"):
        assert without_semantic[kind]["recall"] == 1.0, kind
    # A 5 % crop moves the pHash by 4 bits or more about half the time: the semantic pass
    # finds those (also the cropped copy of an evaluation image).
    assert without_semantic["cropped"]["recall"] >= 0.5
    assert without_semantic["contaminated"]["found"] >= 6
    for kind in (*DUPLICATE_KINDS, "placeholder", "contaminated"):
        assert figures[kind]["recall"] == 1.0, kind
    assert without_semantic["all"]["precision"] == figures["all"]["precision"] == 1.0
    for reason in ("exact", "pixels", "perceptual", "semantic", "placeholder", "contaminated"):
        assert figures[f"reason {reason}"]["precision"] in (1.0, None), reason
    for key, row in truth.items():
        verdict = found[key]
        if row.kind in ("original", "unique"):
            assert verdict["kept"] and verdict["reason"] is None, key
        if row.kind in DUPLICATE_KINDS:
            assert verdict["reason"] in FOUND_AS[row.kind], (key, verdict)
            assert truth[verdict["representative"]].kind == "original"  # more pixels, first key
    broken = next(k for k, row in truth.items() if row.kind == "broken")
    assert found[broken]["kept"] is True  # undecodable but unique bytes: nothing to drop
    failed = next(k for k, row in truth.items() if row.kind == "failed")
    assert found[failed]["kept"] is None and found[failed]["group_id"] is None
    blank = [k for k, row in truth.items() if row.origin == "blank"]
    assert all(found[k]["detail"].startswith("blank") for k in blank)
    icon = [k for k, row in truth.items() if row.origin == "icon"]
    assert sum("under 6 sites" in found[k]["detail"] for k in icon) == 6
    assert sum("near-duplicate of placeholder" in found[k]["detail"] for k in icon) == 1
    leaks = [k for k, row in truth.items() if row.kind == "contaminated"]
    for key in leaks:
        assert found[key]["against"] == str(eval_root)
        assert found[key]["against_key"] == f"ev{int(truth[key].origin[4:]):03d}"
    assert result.summary["contaminated_by"] == {str(eval_root): len(leaks)}
    exact = next(k for k, row in truth.items() if row.kind == "exact")
    original = found[exact]["representative"]
    assert found[exact]["detail"] == f"same bytes as {original}"
    assert found[original]["group_size"] == found[exact]["group_size"] >= 2
    assert found[original]["representative"] == original and found[original]["kept"]
    resized = next(k for k, row in truth.items() if row.kind == "resized")
    assert "bits apart" in found[resized]["detail"]


# --- provenance, options, resume ------------------------------------------------------------------
def _shard_runs(root, folder: str) -> dict[int, str]:
    ds = Dataset(str(root))
    target = ds.folder(folder)
    return {s: provenance.read(target, s).run for s in target.shards()}


def test_rerun_does_nothing_and_new_options_regroup_without_hashing(planted, tmp_path):
    source, eval_root, truth = planted
    root = copy_of_dataset(source, tmp_path)
    options = DedupOptions(against=(str(eval_root),), workers=0)
    first = dedup_dataset(str(root), options, progress=False)
    ds = Dataset(str(root))
    hashes, generation = _shard_runs(root, "hashes"), ds.current_generation("dedup")

    again = dedup_dataset(str(root), options, progress=False)
    assert again.hashed.shards_done == 0 and again.hashed.shards_skipped == 3
    assert not again.regrouped and ds.current_generation("dedup") == generation
    assert again.summary == first.summary

    strict = dedup_dataset(str(root), options.replace(phash_distance=0), progress=False)
    assert strict.hashed.shards_done == 0 and _shard_runs(root, "hashes") == hashes
    assert strict.regrouped and ds.current_generation("dedup") == generation + 1
    assert strict.summary["removed_by_reason"]["perceptual"] == 0
    assert ds.generation_record("dedup")["options"]["phash_distance"] == 0
    run = ds.read_manifest()["runs"][-1]
    assert run["stage"] == "dedup" and run["regrouped"] is True
    assert run["stages"]["dedup"]["provenance_options"]["phash_distance"] == 0

    # Changed images: only that shard is hashed again, and dedup/ is grouped again.
    table = ds.read_shard("images", 2)
    ds.write_shard("images", 2, table.slice(0, table.num_rows - 3))
    from capfilt.stages.status import dataset_status

    status = dataset_status(ds)
    assert status.folder("hashes").stale == [2]
    assert status.folder("dedup").stale == [0, 1, 2]  # grouped with the stale hashes/ shard
    redone = dedup_dataset(str(root), options, progress=False)
    assert redone.hashed.shards_done == 1 and redone.regrouped
    assert dataset_status(ds).folder("dedup").up_to_date


def _killed_run(root: str, eval_root: str, at: str) -> None:
    """A `capfilt dedup` child that SIGKILLs itself: while hashing shard 2 ('hash'), or once
    the first dedup/ shard of the new generation is written ('group')."""
    import signal

    from capfilt.stages import dedup

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if at == "hash":
        hash_process = dedup.HashStage.process

        def process(self, shard, inputs, advance):
            if shard == 2:
                die()
            return hash_process(self, shard, inputs, advance)

        dedup.HashStage.process = process
    else:
        group_process, written = dedup.GroupStage.process, []

        def process(self, shard, inputs, advance):
            if written:
                die()
            written.append(shard)
            return group_process(self, shard, inputs, advance)

        dedup.GroupStage.process = process
    options = DedupOptions(against=(eval_root,), workers=0, phash_distance=3)
    dedup.dedup_dataset(root, options, progress=False)


def test_a_killed_run_resumes(planted, tmp_path, monkeypatch):
    source, eval_root, _ = planted
    root = copy_of_dataset(source, tmp_path)
    ds = Dataset(str(root))
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_killed_run, args=(str(root), str(eval_root), "hash"))
    child.start()
    child.join(60)
    assert child.exitcode == -9
    hashed = _shard_runs(root, "hashes")
    assert sorted(hashed) == [0, 1] and not ds.folder("dedup").shards()

    child = context.Process(target=_killed_run, args=(str(root), str(eval_root), "group"))
    child.start()
    child.join(60)
    assert child.exitcode == -9
    assert _shard_runs(root, "hashes")[0] == hashed[0]  # shards 0 and 1 were not hashed again
    assert ds.current_generation("dedup") == 0  # never switched in: readers see no dedup/
    unfinished = ds.generation_folder("dedup", 1)
    assert unfinished.shards() == [0]
    assert ds.fs.exists(f"{unfinished.path}/{dedup_stage.GROUPING_FILE}")

    # The resumed run reads the grouping the killed one kept: it does not group again.
    def no_grouping(*args, **kwargs):
        raise AssertionError("the grouping was made again")

    monkeypatch.setattr(dedup_stage, "group_dataset", no_grouping)
    options = DedupOptions(against=(str(eval_root),), workers=0, phash_distance=3)
    resumed = dedup_dataset(str(root), options, progress=False)
    assert resumed.hashed.shards_done == 0 and resumed.grouped.shards_done == 2
    assert ds.current_generation("dedup") == 1 and ds.shards("dedup") == [0, 1, 2]
    monkeypatch.undo()

    # The same verdicts as a run never killed.
    fresh = tmp_path / "fresh"
    shutil.copytree(source, fresh)
    dedup_dataset(str(fresh), options, progress=False)
    assert verdicts(root) == verdicts(fresh)


# --- curated/, export-data, the filter's embeddings -----------------------------------------------
@pytest.fixture(scope="module")
def filtered(tmp_path_factory, tiny_filter):
    """A small planted set scored by the tiny filter (scores/, embeddings/, curated/)."""
    from capfilt.models.blip import ItmScorer
    from capfilt.stages.filter import FilterOptions, filter_dataset

    root = tmp_path_factory.mktemp("filtered") / "ds"
    originals = [jpeg_bytes(scene(200 + i)) for i in range(8)]
    rows = [[], []]
    for i, data in enumerate(originals):
        rows[0].append(
            Row(f"00000{i:04d}", f"https://a.example/{i}.jpg", data, "original", f"s{i}")
        )
    for i in range(4):  # copies in the other shard
        kind = ("exact", "resized", "pixels", "reencoded")[i]
        rows[1].append(
            Row(
                f"00001{i:04d}",
                f"https://b.example/{i}.jpg",
                copy_of(kind, originals[i]),
                kind,
                f"s{i}",
            )
        )
    rows[1].append(Row("000010004", "https://b.example/x.jpg", None, "failed", None))
    write_rows(root, rows)
    scorer = ItmScorer.load(str(tiny_filter), precision="fp32", device="cpu")
    options = FilterOptions(threshold=0.0, model=str(tiny_filter), batch_size=4, num_workers=0)
    filter_dataset(str(root), options, scorer=scorer, progress=False)
    return root, options, scorer


def test_filter_keeps_image_embeddings_beside_scores(filtered):
    from capfilt.images.batches import ShardImages, stage_batches

    root, options, scorer = filtered
    ds = Dataset(str(root))
    assert ds.shards("embeddings") == ds.shards("scores") == [0, 1]
    for shard in (0, 1):
        table = ds.read_shard("embeddings", shard)
        keys = table["key"].to_pylist()
        images = ds.read_shard("images", shard).to_pylist()
        assert keys == [r["key"] for r in images if r["status"] == "success"]
        matrix = capfilt_io.embeddings_matrix(table)
        assert matrix.dtype == np.float16 and matrix.shape == (len(keys), 256)
        # the very vectors ITC compares: unit norm, equal to a vision pass of the scorer
        batch = next(
            iter(
                stage_batches(
                    ShardImages(keys, [r["jpg"] for r in images if r["jpg"]]), scorer, options
                )
            )
        )
        itc = scorer.encode_images(batch.pixel_values).itc.float().numpy()
        np.testing.assert_allclose(matrix[: len(itc)], itc, atol=2e-3)
        record = provenance.read(ds.folder("embeddings"), shard)
        scores_record = provenance.read(ds.folder("scores"), shard)
        assert record.run == scores_record.run and record.options == scores_record.options
        assert record.inputs == {"images": scores_record.inputs["images"]}
    from capfilt.stages.status import dataset_status

    assert dataset_status(ds).folder("embeddings").up_to_date


def test_missing_embeddings_are_made_without_scoring_again(filtered, tmp_path):
    from capfilt.stages.filter import filter_dataset

    source, options, scorer = filtered
    root = tmp_path / "ds"
    shutil.copytree(source, root)
    ds = Dataset(str(root))
    before = ds.read_shard("embeddings", 1)
    scored = _shard_runs(root, "scores")
    ds.folder("embeddings").remove_shard(1)  # as a dataset scored before embeddings/ existed
    result = filter_dataset(str(root), options, scorer=scorer, progress=False)
    assert result.scored.shards_done == 0 and result.embedded.shards_done == 1
    assert _shard_runs(root, "scores") == scored
    after = ds.read_shard("embeddings", 1)
    np.testing.assert_allclose(
        capfilt_io.embeddings_matrix(after).astype(np.float32),
        capfilt_io.embeddings_matrix(before).astype(np.float32),
        atol=2e-3,
    )
    again = filter_dataset(str(root), options, scorer=scorer, progress=False)
    assert again.scored.shards_done == again.embedded.shards_done == 0


def test_curated_and_export_leave_out_the_images_not_kept(filtered, tmp_path):
    from capfilt.stages.export_data import export_data
    from capfilt.stages.filter import filter_dataset

    source, options, scorer = filtered
    root = tmp_path / "ds"
    shutil.copytree(source, root)
    ds = Dataset(str(root))
    curated_before = ds.read_stage("curated", ["key"])["key"].to_pylist()
    assert len(set(curated_before)) == 12  # threshold 0: every scored image
    # The tiny filter embeds every image alike (cosine ≈ 1): no semantic pass here.
    result = dedup_dataset(str(root), DedupOptions(semantic="off", workers=0), progress=False)
    assert result.curated is not None and result.curated.plan.generation is not None
    found = verdicts(root)
    dropped = {k for k, v in found.items() if v["kept"] is False}
    assert len(dropped) == 4
    # The representative of each pair has the better filter score.
    best = {}
    for row in ds.read_stage("scores").to_pylist():
        best[row["key"]] = max(best.get(row["key"], -1.0), row["itm_score"] or -1.0)
    for key in dropped:
        kept = found[key]["representative"]
        assert best[kept] >= best[key] and found[kept]["kept"]
    curated = set(ds.read_stage("curated", ["key"])["key"].to_pylist())
    assert curated == set(curated_before) - dropped

    # A new threshold re-derives curated/ from scores/, and still leaves them out.
    filter_dataset(str(root), options.replace(threshold=0.0001), scorer=scorer, progress=False)
    assert not set(ds.read_stage("curated", ["key"])["key"].to_pylist()) & dropped
    out = tmp_path / "export"
    exported = export_data(ds, "parquet", str(out))
    keys = set(pq.read_table(out)["key"].to_pylist())
    assert exported.images == len(keys) and not keys & dropped

    # A curated/ derived before dedup ran is stale once dedup/ exists: export-data refuses it
    # rather than exporting pairs that dedup did not judge, and `capfilt dedup` re-derives it.
    stale = tmp_path / "stale"
    shutil.copytree(source, stale)
    shutil.copytree(root / "dedup", stale / "dedup")
    with pytest.raises(CapfiltError, match="dedup/ changed since it was made"):
        export_data(Dataset(str(stale)), "parquet", str(tmp_path / "export2"))
    assert not (tmp_path / "export2").exists()


# --- query, status, report, CLI -------------------------------------------------------------------
def test_query_status_report_and_cli_know_dedup(planted, tmp_path):
    from capfilt.stages.query import run_query
    from capfilt.stages.report import build_report
    from capfilt.stages.status import dataset_status

    source, eval_root, truth = planted
    root = copy_of_dataset(source, tmp_path)
    result = invoke("dedup", root, "--against", eval_root, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "generation 1 switched in" in result.output
    assert "contaminated by" in result.output and "removed: placeholder" in result.output
    again = invoke("dedup", root, "--against", eval_root, "--workers", 0)
    assert "up to date" in again.output

    ds = Dataset(str(root))
    columns, rows = run_query(
        ds,
        "SELECT images, kept, keys, reasons, kinds FROM dedup_groups ORDER BY images DESC, "
        "group_id",
    )
    groups = [dict(zip(columns, row, strict=True)) for row in rows]
    assert groups[0]["images"] == 7 and groups[0]["kinds"] == ["placeholder"]  # the icon
    assert groups[0]["kept"] == 0
    kept_one = [g for g in groups if g["kept"]]
    assert all(g["kept"] == 1 and g["reasons"][0] == "kept" for g in kept_one)
    assert {"exact", "pixels", "perceptual", "semantic"} <= {
        k for g in kept_one for k in g["kinds"]
    }
    _, rows = run_query(ds, "SELECT count(*) FROM hashes WHERE phash IS NOT NULL")
    assert rows[0][0] == sum(r.kind not in ("failed", "broken") for r in truth.values())
    for view in ("dedup", "hashes", "embeddings", "dedup_groups"):
        run_query(ds, f"SELECT * FROM {view} LIMIT 1")

    status = dataset_status(ds)
    for name in ("hashes", "dedup"):
        assert status.folder(name).done == [0, 1, 2], name
    assert "generation 1" in status.folder("dedup").note
    printed = invoke("status", root).output
    assert "dedup/" in printed and "hashes/" in printed

    report = build_report(ds)
    figures = report.summary["dedup"]
    assert figures["removed"] == sum(
        r.kind in (*DUPLICATE_KINDS, "placeholder", "contaminated") for r in truth.values()
    )
    assert figures["contaminated_by"] == {str(eval_root): 7}
    assert figures["largest_groups"][0]["images"] >= 4
    page = open(report.html_path, encoding="utf-8").read()
    assert '<section id="dedup">' in page and 'data-reason="placeholder"' in page
    section = page[page.index('<section id="dedup">') :]
    assert section.count("data:image/jpeg;base64,") >= 10  # thumbnails of the groups


def test_dedup_refuses_what_it_cannot_do(planted, tmp_path):
    source, _, _ = planted
    with pytest.raises(CapfiltError, match="has no images/ shards"):
        dedup_dataset(str(source), DedupOptions(against=(str(tmp_path / "nope"),)))
    with pytest.raises(CapfiltError, match="is the dataset itself"):
        dedup_dataset(str(source), DedupOptions(against=(str(source),)))
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("embeddings"))
    with pytest.raises(CapfiltError, match="no embeddings"):
        dedup_dataset(str(bare), DedupOptions(semantic="on"))
    with pytest.raises(CapfiltError, match="not a file"):
        DedupOptions(placeholder_list=str(tmp_path / "none.txt"))
    result = invoke("dedup", bare, "--phash-distance", 13)
    assert result.exit_code == 2 and "--phash-distance" in result.output


def test_placeholder_list_and_sites_threshold(tmp_path):
    root = tmp_path / "ds"
    picture = jpeg_bytes(scene(7))
    logo = jpeg_bytes(scene(8))
    rows = [
        Row(f"00000{i:04d}", f"https://s{i}.example/p.jpg", picture, "placeholder", "p")
        for i in range(4)
    ]
    rows.append(Row("000000004", "https://x.example/logo.jpg", logo, "placeholder", "logo"))
    write_rows(root, [rows])
    listed = tmp_path / "known.txt"
    listed.write_text(f"# known\n{hashlib.sha256(logo).hexdigest()}\n")
    options = DedupOptions(workers=0, placeholder_list=str(listed))
    dedup_dataset(str(root), options, progress=False)
    found = verdicts(root)
    assert [found[r.key]["kept"] for r in rows[:4]] == [True, False, False, False]  # 4 sites
    assert found["000000004"]["reason"] == "placeholder"
    assert found["000000004"]["detail"] == "on the list of known placeholders"
    dedup_dataset(str(root), options.replace(placeholder_domains=4), progress=False)
    assert {verdicts(root)[r.key]["reason"] for r in rows[:4]} == {"placeholder"}


# --- the searches, alone --------------------------------------------------------------------------
def test_phash_pairs_are_every_pair_within_the_distance():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=200, dtype=np.int64).astype(np.uint64)
    values = [base]
    for flips in range(1, 7):
        near = base.copy()
        for _ in range(flips):
            near ^= np.uint64(1) << rng.integers(0, 64, size=200).astype(np.uint64)
        values.append(near)
    values = np.concatenate(values)
    a, b = np.triu_indices(len(values), 1)
    distance = popcount64(values[a] ^ values[b])
    for threshold in (1, 2, 4, 6):
        i, j = phash_pairs(values, threshold)
        near = distance <= threshold
        expected = set(zip(a[near].tolist(), b[near].tolist(), strict=True))
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected, threshold


def test_semantic_pairs_find_planted_near_copies_across_clusters():
    from capfilt.dedup.bench import planted_embeddings

    embeddings, planted = planted_embeddings(20000, 64, seed=1)
    found = semantic_pairs(embeddings, eps=0.05)
    assert found.clusters == 20
    pairs = set(zip(found.i.tolist(), found.j.tolist(), strict=True))
    truth = {(min(a, b), max(a, b)) for a, b in planted.tolist()}
    recall = len(pairs & truth) / len(truth)
    print(
        f"\nsemantic pairs, 20,000 embeddings in 20 clusters: recall {recall:.4f}, "
        f"{len(pairs - truth)} pairs beyond the planted ones"
    )
    assert recall >= 0.99


def test_hashes_and_sites():
    data = jpeg_bytes(scene(3))
    row = hash_image(data)
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["error"] is None
    assert (row["width"], row["height"]) == (SIDE, SIDE) and row["pixel_std"] > 20
    assert (
        hash_image(png_bytes(Image.open(io.BytesIO(data))))["pixel_sha256"] == row["pixel_sha256"]
    )
    assert hash_image(b"nope")["error"] and hash_image(b"nope")["sha256"]
    assert hash_image(None)["sha256"] is None
    assert url_domain("https://www.Example.com/a.jpg") == "example.com"
    assert url_domain("http://img3.cdn.example.co.uk/x") == "example.co.uk"
    assert url_domain("http://10.0.0.1:8080/x") == "10.0.0.1"
    assert url_domain("/data/coco/1.jpg") is None
    assert json.dumps(row)  # plain values, for worker processes and Parquet


def test_readme_dedup_queries_run(planted, tmp_path):
    import re
    from pathlib import Path

    from capfilt.stages.query import run_query

    source, eval_root, _ = planted
    root = copy_of_dataset(source, tmp_path)
    dedup_dataset(str(root), DedupOptions(against=(str(eval_root),), workers=0), progress=False)
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Duplicate groups and why", 1)[1].split("\n### ", 1)[0]
    queries = re.findall(r"```sql\n(.*?)```", section, re.S)
    assert len(queries) == 2
    groups = run_query(Dataset(str(root)), queries[0])[1]
    verdicts_ = dict(run_query(Dataset(str(root)), queries[1])[1])
    assert groups and groups[0][1] == 7  # the "image unavailable" picture and its copies
    assert verdicts_["kept"] == 41 and verdicts_["placeholder"] == 10
    assert verdicts_["contaminated"] == 7
