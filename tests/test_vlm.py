"""`capfilt caption` with BLIP-2 and image-text-to-text captioners (models/vlm.py), on tiny
random checkpoints of three families: rows, provenance, resume, parity with plain
transformers, keyed sampling, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import draw_scene, write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet as io
from capfilt.core.layout import Dataset
from capfilt.models.tiny_vlm import TINY_VLMS, build_tiny_vlm
from capfilt.models.vlm import DEFAULT_INSTRUCTION, VlmCaptioner
from capfilt.stages.caption import CaptionOptions, CaptionStage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = {
    "blip2-tiny": "",
    "llava-tiny": DEFAULT_INSTRUCTION,
    "idefics3-tiny": DEFAULT_INSTRUCTION,
    "paligemma-tiny": "caption en",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: build_tiny_vlm(name, tmp_path_factory.mktemp(name)) for name in TINY_VLMS}


@pytest.fixture(scope="module")
def captioners(checkpoints):
    return {name: VlmCaptioner.load(str(path), "fp32", "cpu") for name, path in checkpoints.items()}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def scenes():
    """Four images of other sizes: a wide one has fewer tiles, so fewer image tokens and a
    left-padded prompt in a batch, for Idefics3."""
    return [
        draw_scene("red", "circle"),
        draw_scene("blue", "square", size=150).resize((150, 50)),
        draw_scene("green", "triangle"),
        draw_scene("yellow", "circle", size=40),
    ]


@pytest.mark.parametrize("family", TINY_VLMS)
def test_caption_command_with_a_vlm_writes_rows_provenance_and_resumes(
    tmp_path, checkpoints, family
):
    root = tmp_path / "ds"
    truths = write_images_dataset(root, n_shards=2, per_shard=6, bad_keys=("000010002",))
    model = checkpoints[family]
    args = ["caption", root, "--model", model, "--num-captions", 2, "--max-length", 6]
    args += ["--min-length", 2, "--batch-size", 3, "--threads", 1, "--seed", 3]
    if family == "llava-tiny":  # decoded images from a worker process (ImageBatch.concat)
        args += ["--workers", 1]
    result = invoke(*args)
    assert result.exit_code == 0, result.output

    ds = Dataset(str(root))
    table = ds.read_stage("captions")
    assert table.schema.names == io.CAPTIONS_SCHEMA.names
    rows = table.to_pylist()
    assert {r["key"] for r in rows} == {key for key, _ in truths}
    bad = [r for r in rows if r["key"] == "000010002"]
    assert len(bad) == 1 and bad[0]["status"] == "error" and bad[0]["text"] is None
    assert "cannot decode" in bad[0]["error_message"]
    good = [r for r in rows if r["status"] == "success"]
    assert len(good) == 2 * (len(truths) - 1)
    assert sorted({r["caption_id"] for r in good}) == [0, 1]
    assert all(isinstance(r["text"], str) and r["text"] == r["text"].strip() for r in good)
    assert not any(DEFAULT_INSTRUCTION.lower() in r["text"] for r in good)  # prompt stripped
    assert {r["model"] for r in rows} == {str(model)}

    run = ds.read_manifest()["runs"][-1]
    assert run["model"]["revision"].startswith("sha256:") and run["model"]["engine"] == "hf"
    recorded = run["provenance_options"]
    assert recorded["prompt"] == PROMPTS[family]  # the prompt used, not the option's None
    assert (recorded["engine"], recorded["max_length"], recorded["repetition_penalty"]) == (
        "hf",
        6,
        1.0,
    )
    assert recorded["model_revision"] == run["model"]["revision"]

    paths = [ds.shard_path("captions", s) for s in (0, 1)]
    mtimes = [ds.fs.modified(p) for p in paths]
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert [ds.fs.modified(p) for p in paths] == mtimes  # nothing redone
    assert ds.read_manifest()["runs"][-1]["counts"].get("shards", 0) == 0
    other = invoke(*args[:-2], "--seed", 4)  # other options: refused without --overwrite
    assert other.exit_code == 2 and "--seed 3 → 4" in other.output


@pytest.mark.parametrize("family", TINY_VLMS)
def test_greedy_ids_equal_plain_transformers_image_by_image(captioners, family):
    import torch

    captioner = captioners[family]
    images = scenes()
    got = captioner.generate_ids(
        images,
        prompt=PROMPTS[family],
        decoding="greedy",
        min_length=0,
        max_length=8,
        repetition_penalty=1.0,
    )
    processor, network = captioner.processor, captioner.network
    pad = captioner.tokenizer.pad_token_id
    text = captioner.prompt_text(PROMPTS[family])
    for image, row in zip(images, got, strict=True):
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            ids = network.generate(**inputs, do_sample=False, max_new_tokens=8)
        expected = ids[0, inputs["input_ids"].shape[1] :].tolist()
        mine = row.tolist()
        while mine and mine[-1] == pad and len(mine) > len(expected):
            mine.pop()  # rows that ended early are padded in the batch
        assert mine == expected


@pytest.mark.parametrize("family", TINY_VLMS)
def test_nucleus_captions_depend_on_their_seed_only(captioners, family):
    captioner = captioners[family]
    images = scenes()
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    options = dict(
        prompt=PROMPTS[family],
        decoding="nucleus",
        num_captions=2,
        top_p=0.9,
        min_length=3,
        max_length=8,
        repetition_penalty=1.3,
    )
    batched = captioner.generate_captions(images, row_seeds=seeds, **options)
    alone = [
        captioner.generate_captions([image], row_seeds=seeds[2 * i : 2 * i + 2], **options)[0]
        for i, image in enumerate(images)
    ]
    assert batched == alone
    assert len({text for captions in batched for text in captions}) > 4
    reseeded = captioner.generate_captions(images, row_seeds=[s + 100 for s in seeds], **options)
    assert reseeded != batched


def test_the_nucleus_among_candidates_is_blips_nucleus_row_by_row():
    """Rows whose 64 likeliest tokens hold the top-p mass draw among them, the others from
    the whole sorted vocabulary: the same tokens as BLIP's sampler, alone or in a batch."""
    import torch

    from capfilt.models.blip import KeyedNucleusSampler
    from capfilt.models.vlm import CaptionNucleusSampler

    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(4, 1000, generator=generator)  # the nucleus reaches past 64 tokens
    peaked = 8 * torch.randn(4, 1000, generator=generator)  # the nucleus is a few tokens
    scores = torch.cat([flat, peaked])
    in_top = scores.softmax(dim=-1).topk(64).values.sum(dim=-1)
    assert (in_top[:4] < 0.9).all() and (in_top[4:] >= 0.9).all()
    seeds = torch.arange(100, 108)
    prompt = torch.zeros(8, 5, dtype=torch.long)
    for step in range(3):
        generated = torch.zeros(8, step, dtype=torch.long)
        mine = CaptionNucleusSampler(0.9, seeds)
        mine(prompt, scores)  # the first call marks where the caption starts
        chosen = mine(torch.cat([prompt, generated], dim=1), scores).argmax(dim=-1)
        blip = KeyedNucleusSampler(0.9, seeds)(generated, scores).argmax(dim=-1)
        assert chosen.tolist() == blip.tolist()
        for row in range(8):
            alone = CaptionNucleusSampler(0.9, seeds[row : row + 1])
            alone(prompt[row : row + 1], scores[row : row + 1])
            one = alone(torch.cat([prompt, generated], dim=1)[row : row + 1], scores[row : row + 1])
            assert one.argmax(dim=-1).item() == chosen[row].item()


def test_family_defaults_and_blip_provenance_unchanged(tiny_captioner):
    blip = CaptionOptions().for_family("blip")
    assert (blip.prompt, blip.max_length, blip.engine, blip.repetition_penalty) == (
        "a picture of ",
        20,
        "fast",
        1.1,
    )
    llava = CaptionOptions(prompt="Describe it in detail.", max_length=300).for_family("llava")
    assert (llava.prompt, llava.max_length, llava.engine) == ("Describe it in detail.", 300, "hf")
    assert CaptionOptions().for_family("blip-2").prompt == ""
    recorded = CaptionStage(CaptionOptions(model=str(tiny_captioner))).provenance_options()
    assert (recorded["prompt"], recorded["max_length"], recorded["engine"]) == (
        "a picture of ",
        20,
        "fast",
    )
    assert recorded["repetition_penalty"] == 1.1


def _refused_before_loading(monkeypatch, tmp_path, *args):
    """Run `capfilt caption` over a small dataset where loading any weights fails the test."""
    import transformers

    def no_weights(*_, **__):
        raise AssertionError("weights were loaded before the check")

    for cls in ("AutoModelForImageTextToText", "BlipForConditionalGeneration"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_weights)
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=1, per_shard=3)
    result = invoke("caption", root, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not Dataset(str(root)).shards("captions")
    return " ".join(result.output.split())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_without_vllm_is_one_line_naming_the_extra(monkeypatch, tmp_path, checkpoints):
    output = _refused_before_loading(
        monkeypatch, tmp_path, "--model", checkpoints["llava-tiny"], "--engine", "vllm"
    )
    assert "pip install 'capfilt[vllm]'" in output


def test_engines_of_the_other_family_are_refused(
    monkeypatch, tmp_path, checkpoints, tiny_captioner
):
    output = _refused_before_loading(
        monkeypatch, tmp_path, "--model", checkpoints["idefics3-tiny"], "--engine", "fast"
    )
    assert "--engine fast is BLIP's" in output and "'idefics3' model" in output
    output = _refused_before_loading(
        monkeypatch, tmp_path / "b", "--model", tiny_captioner, "--engine", "vllm"
    )
    assert "--engine vllm runs BLIP-2 and image-text-to-text models" in output
    output = _refused_before_loading(
        monkeypatch,
        tmp_path / "c",
        "--model",
        checkpoints["llava-tiny"],
        "--engine",
        "vllm",
        "--decoding",
        "beam",
    )
    assert "--engine vllm samples or decodes greedily" in output


def test_a_model_that_cannot_caption_or_holds_pickles_is_refused_in_one_line(
    monkeypatch, tmp_path, checkpoints
):
    import torch
    from transformers import CLIPConfig, CLIPModel

    clip = tmp_path / "clip"
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=100), vision_config=dict(small, image_size=32)
    )
    CLIPModel(config).save_pretrained(clip, safe_serialization=True)
    output = _refused_before_loading(monkeypatch, tmp_path / "a", "--model", clip)
    assert "is a CLIPModel, which does not generate text from an image" in output

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    llava = json.loads((checkpoints["llava-tiny"] / "config.json").read_text())
    (pickles / "config.json").write_text(json.dumps(llava))
    torch.save({}, pickles / "pytorch_model.bin")
    output = _refused_before_loading(monkeypatch, tmp_path / "b", "--model", pickles)
    assert "holds only pickled weights (pytorch_model.bin)" in output


def test_batches_of_decoded_images_concatenate():
    from capfilt.images.batches import ImageBatch

    first = ImageBatch(["a", "b"], ["image a"], [0, None], [None, "cannot decode image"])
    second = ImageBatch(["c"], ["image c"], [0], [None])
    batch = ImageBatch.concat([first, second], device="cpu")
    assert batch.pixel_values == ["image a", "image c"]
    assert batch.pixel_index == [0, None, 1] and batch.keys == ["a", "b", "c"]
    assert batch.pin_memory().pixel_values == ["image a", "image c"]


# --- bench ---------------------------------------------------------------------------------------
def run_bench(*args) -> dict:
    result = invoke("bench", *args, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


@pytest.mark.parametrize("family", TINY_VLMS)
def test_bench_caption_of_each_family_against_plain_transformers(family):
    report = run_bench("caption", "--arch", family, "--images", 2, "--batch-size", 2)
    assert report["model"] == f"random-weights {family}"
    assert report["level"].startswith("end to end") and report["engine"] == "hf"
    assert report["family"] == family.removesuffix("-tiny").replace("blip2", "blip-2")
    assert report["captions_per_image"] == 1 and report["new_tokens"] == 20
    assert report["gflops_per_image"] > 0
    for side in ("plain_hf", "capfilt"):
        assert report[side]["error"] is None and report[side]["images_per_s"] > 0
    assert report["speedup"] == pytest.approx(
        report["capfilt"]["images_per_s"] / report["plain_hf"]["images_per_s"]
    )


def test_bench_caption_of_a_vlm_checkpoint_from_decoded_images(checkpoints):
    model = checkpoints["idefics3-tiny"]
    report = run_bench(
        "caption",
        "--model",
        model,
        "--level",
        "model",
        "--images",
        2,
        "--new-tokens",
        4,
        "--captions-per-image",
        2,
    )
    assert report["model"].startswith(str(model)) and report["level"].startswith("model")
    assert report["prompt"] == DEFAULT_INSTRUCTION and report["captions_per_image"] == 2
    assert report["prompt_tokens"] > 10  # the chat template and the image's tokens
    result = invoke("bench", "filter", "--arch", "llava-tiny")
    assert result.exit_code == 2 and "are for `bench caption`" in result.output


def test_remote_code_of_a_vlm_checkpoint_is_never_run(monkeypatch, tmp_path, checkpoints):
    import shutil

    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "remote"
    shutil.copytree(checkpoints["llava-tiny"], folder)
    (folder / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=1, per_shard=2)
    args = ["caption", root, "--model", folder, "--max-length", 6, "--threads", 1]
    result = invoke(*args)
    assert result.exit_code == 0, result.output  # transformers' own LLaVA, not the folder's code
    config["model_type"] = "evil_vlm"  # a family only its own code knows
    (folder / "config.json").write_text(json.dumps(config))
    output = _refused_before_loading(monkeypatch, tmp_path / "b", "--model", folder)
    assert "only with the checkpoint's own code, which capfilt never runs" in output
    assert not marker.exists()
