"""`capfilt caption` and image decoding: rows, failures as rows, seeds, resume, options."""

from __future__ import annotations

import io

import pytest
from conftest import draw_scene, write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.images.decode import decode_image
from capfilt.models.sampling import caption_seed
from capfilt.stages.caption import CaptionOptions, caption_dataset

FAST = dict(max_length=10, min_length=5, num_workers=0)


@pytest.fixture(scope="module")
def captioner(tiny_captioner):
    from capfilt.models.blip import Captioner

    return Captioner.load(str(tiny_captioner), precision="fp32", device="cpu")


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- decoding --------------------------------------------------------------------------------
def _encoded(img, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def test_decode_converts_modes_and_applies_exif_orientation():
    from PIL import Image

    scene = draw_scene("red", "square", size=40)
    cmyk = decode_image(_encoded(scene.convert("CMYK"), "JPEG"))
    assert cmyk.ok and cmyk.image.mode == "RGB"

    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0)).convert("P")
    palette = decode_image(_encoded(transparent, "PNG", transparency=0))
    assert palette.ok and palette.image.mode == "RGB"
    assert palette.image.getpixel((0, 0)) == (255, 255, 255)  # transparency → white, not black

    wide = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = decode_image(_encoded(wide, "JPEG", exif=exif.tobytes()))
    assert rotated.ok and rotated.image.size == (20, 60)


def test_decode_failures_are_values():
    assert decode_image(None).error == "no image bytes"
    garbage = decode_image(b"<html>not an image</html>")
    assert not garbage.ok and garbage.error.startswith("cannot decode image")
    truncated = decode_image(_encoded(draw_scene("blue", "circle"), "JPEG")[:200])
    assert not truncated.ok and "cannot decode" in truncated.error
    big = _encoded(draw_scene("blue", "circle", size=96), "PNG")
    for limit in (6000, 2000):  # between the limit and twice it PIL only warns: still an error
        bomb = decode_image(big, max_pixels=limit)
        assert not bomb.ok and bomb.error.startswith("image too large")
    assert decode_image(big).ok


# --- the stage -------------------------------------------------------------------------------
def test_caption_command_writes_a_row_per_caption_and_an_error_row_per_bad_image(
    tmp_path, tiny_captioner
):
    root = tmp_path / "ds"
    truths = write_images_dataset(root, n_shards=2, per_shard=6, bad_keys=("000010002",))
    result = invoke(
        "caption",
        root,
        "--model",
        tiny_captioner,
        "--num-captions",
        2,
        "--max-length",
        10,
        "--batch-size",
        3,
        "--workers",
        0,
        "--seed",
        7,
    )
    assert result.exit_code == 0, result.output
    assert "captions written" in result.output

    ds = Dataset(str(root))
    assert ds.shards("captions") == [0, 1]
    rows = ds.read_stage("captions").to_pylist()
    successful = {key for key, _ in truths}
    assert {r["key"] for r in rows} == successful  # failed downloads get no rows
    bad = [r for r in rows if r["key"] == "000010002"]
    assert len(bad) == 1
    assert bad[0]["caption_id"] == 0 and bad[0]["text"] is None and bad[0]["status"] == "error"
    assert "cannot decode" in bad[0]["error_message"]
    good = [r for r in rows if r["key"] != "000010002"]
    assert len(good) == 2 * (len(successful) - 1)
    assert all(r["status"] == "success" and isinstance(r["text"], str) for r in good)
    assert sorted({r["caption_id"] for r in good}) == [0, 1]
    assert {r["model"] for r in rows} == {str(tiny_captioner)}

    run = ds.read_manifest()["runs"][-1]
    assert run["stage"] == "caption"
    assert run["model"]["id"] == str(tiny_captioner)
    assert run["model"]["path"] == str(tiny_captioner.resolve())
    assert run["model"]["revision"].startswith("sha256:")  # of the folder's files
    assert run["provenance_options"]["model_revision"] == run["model"]["revision"]
    assert run["options"]["seed"] == 7 and run["options"]["num_captions"] == 2
    assert run["counts"]["captions"] == len(good) and run["counts"]["errors"] == 1


def test_same_seed_gives_the_same_captions_whatever_the_batch_size(tmp_path, captioner):
    tables = []
    for name, batch_size, workers in (("a", 1, 0), ("b", 5, 2)):
        root = tmp_path / name
        write_images_dataset(root, n_shards=1, per_shard=6)
        config = CaptionOptions(
            model="tiny",
            num_captions=2,
            seed=3,
            batch_size=batch_size,
            **dict(FAST, num_workers=workers),
        )
        caption_dataset(str(root), config, captioner=captioner, progress=False)
        tables.append(Dataset(str(root)).read_stage("captions").to_pylist())
    assert tables[0] == tables[1]
    assert caption_seed(3, "000000000", 0) != caption_seed(4, "000000000", 0)
    assert caption_seed(3, "000000000", 0) != caption_seed(3, "000000000", 1)


def test_rerun_skips_done_shards_and_redoes_a_deleted_one(tmp_path, captioner):
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=2, per_shard=3)
    ds = Dataset(str(root))
    config = CaptionOptions(model="tiny", **FAST)
    first = caption_dataset(ds, config, captioner=captioner, progress=False)
    assert (first.shards_done, first.shards_skipped) == (2, 0)
    path0, path1 = (ds.shard_path("captions", s) for s in (0, 1))
    mtime0 = ds.fs.modified(path0)

    leftover = ds.join("captions", ".00001.parquet.tmp-deadbeef")  # from a killed run
    ds.fs.pipe(leftover, b"partial")
    again = caption_dataset(ds, config, captioner=captioner, progress=False)
    assert not ds.fs.exists(leftover)
    assert (again.shards_done, again.shards_skipped, again.images) == (0, 2, 0)
    assert ds.fs.modified(path0) == mtime0

    before = ds.read_shard("captions", 1).to_pylist()
    ds.fs.rm(path1)
    redo = caption_dataset(ds, config, captioner=captioner, progress=False)
    assert redo.shards_done == 1
    assert ds.fs.modified(path0) == mtime0
    assert ds.read_shard("captions", 1).to_pylist() == before  # same seed, same captions

    overwrite = caption_dataset(
        ds,
        CaptionOptions(model="tiny", overwrite=True, **FAST),
        captioner=captioner,
        progress=False,
    )
    assert overwrite.shards_done == 2
    assert ds.fs.modified(path0) > mtime0
    assert [r["stage"] for r in ds.read_manifest()["runs"]] == ["caption"] * 4


def test_greedy_and_beam_decoding_options(tmp_path, captioner):
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=1, per_shard=3)
    ds = Dataset(str(root))
    caption_dataset(
        ds,
        CaptionOptions(model="tiny", decoding="greedy", **FAST),
        captioner=captioner,
        progress=False,
    )
    greedy = ds.read_stage("captions").to_pylist()
    assert [r["caption_id"] for r in greedy] == [0, 0, 0]
    caption_dataset(
        ds,
        CaptionOptions(model="tiny", decoding="beam", num_captions=2, overwrite=True, **FAST),
        captioner=captioner,
        progress=False,
    )
    beam = ds.read_stage("captions").to_pylist()
    assert [r["caption_id"] for r in beam] == [0, 1] * 3


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_p=0), "--top-p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), "--top-p must be in \\(0, 1\\]"),
        (dict(decoding="greedy", num_captions=3), "greedy decoding gives one caption"),
        (dict(min_length=30, max_length=20), "larger than --max-length"),
        (dict(num_captions=0), "--num-captions must be at least 1"),
        (dict(decoding="topk"), "--decoding must be one of"),
    ],
)
def test_caption_config_validation(options, message):
    with pytest.raises(CapfiltError, match=message):
        CaptionOptions(**options)


def test_caption_command_errors_are_one_line(tmp_path, tiny_captioner):
    result = invoke("caption", tmp_path / "empty", "--model", tiny_captioner)
    assert result.exit_code == 2
    assert "no images/ shards yet" in result.output and "Traceback" not in result.output
    result = invoke("caption", tmp_path / "empty", "--top-p", "1.5")
    assert result.exit_code == 2 and "--top-p must be in (0, 1]" in result.output


def test_gpu_decode_captions_like_the_pil_path_or_asks_for_torchvision(tmp_path, tiny_captioner):
    """--gpu-decode through the command (on the CPU device here): the same greedy captions as
    decoding with PIL, the option in the manifest; without torchvision, a one-line error."""
    try:
        import torchvision  # noqa: F401

        has_torchvision = True
    except ImportError:
        has_torchvision = False
    texts = {}
    for gpu_decode in (False, True):
        root = tmp_path / f"ds-{gpu_decode}"
        write_images_dataset(root, n_shards=1, per_shard=6, bad_keys=("000000002",))
        args = ["caption", root, "--model", tiny_captioner, "--decoding", "greedy"]
        args += ["--max-length", 8, "--workers", 1, "--cuda-graphs"]  # a no-op on the CPU
        result = invoke(*args, *(["--gpu-decode"] if gpu_decode else []))
        if gpu_decode and not has_torchvision:
            assert result.exit_code == 2
            assert "--gpu-decode needs torchvision" in result.output
            return
        assert result.exit_code == 0, result.output
        ds = Dataset(str(root))
        rows = ds.read_stage("captions").to_pylist()
        texts[gpu_decode] = {(r["key"], r["text"], r["status"]) for r in rows}
        assert ds.read_manifest()["runs"][-1]["options"]["gpu_decode"] is gpu_decode
    assert texts[True] == texts[False]
