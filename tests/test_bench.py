"""`capfilt bench`: a smoke run of each workload on the tiny architecture, and the FLOP counts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from capfilt.bench import BenchConfig
from capfilt.cli import app
from capfilt.core.errors import CapfiltError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_bench_cli(*args: str) -> dict:
    result = CliRunner().invoke(app, ["bench", *args, "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_bench_caption_end_to_end_json():
    report = run_bench_cli("caption", "--arch", "tiny", "--images", "4", "--new-tokens", "6")
    assert report["workload"] == "caption"
    assert report["level"].startswith("end to end")
    assert report["model"] == "random-weights BLIP tiny"
    assert report["images"] == 4 and report["new_tokens"] == 6
    for side in ("plain_hf", "capfilt"):
        assert report[side]["error"] is None
        assert report[side]["images_per_s"] > 0
        assert report[side]["tflops"] > 0
    assert report["speedup"] == pytest.approx(
        report["capfilt"]["images_per_s"] / report["plain_hf"]["images_per_s"]
    )
    assert report["gflops_per_image"] > 0 and report["bound_tflops"] > 0


def test_bench_filter_of_a_checkpoint_counts_pairs(tiny_filter):
    report = run_bench_cli(
        "filter",
        "--model",
        str(tiny_filter),
        "--level",
        "model",
        "--images",
        "4",
        "--captions-per-image",
        "3",
        "--batch-size",
        "2",
    )
    assert report["level"].startswith("model")
    assert report["model"].startswith(str(tiny_filter))
    assert report["texts_per_image"] == 4
    for side in ("plain_hf", "capfilt"):
        assert report[side]["pairs_per_s"] == pytest.approx(4 * report[side]["images_per_s"])


def test_bench_pretrain_times_both_training_steps():
    report = run_bench_cli("pretrain", "--images", "8", "--batch-size", "4")
    assert report["level"].startswith("model") and report["images"] == 8
    for side in ("plain_hf", "capfilt"):
        assert report[side]["error"] is None and report[side]["images_per_s"] > 0
    assert report["speedup"] > 0 and report["mfu"] > 0


def test_bench_pretrain_data_times_the_input_pipeline_per_worker_count():
    report = run_bench_cli(
        "pretrain", "--level", "data", "--images", "40", "--batch-size", "8", "--workers", "2"
    )
    assert [row["workers"] for row in report["data"]] == [0, 1, 2]
    for row in report["data"]:
        assert row["images"] == 40 - 8  # one epoch after the first batch
        assert row["images_per_s"] > 0 and row["first_batch_s"] > 0
    assert report["data"][2]["images_per_s_per_worker"] == pytest.approx(
        report["data"][2]["images_per_s"] / 2
    )
    assert report["model_images_per_s"] > 0
    fastest = max(row["images_per_s"] for row in report["data"])
    assert report["bound"] == ("model" if fastest > report["model_images_per_s"] else "data")
    printed = CliRunner().invoke(
        app,
        [
            "bench",
            "pretrain",
            "--level",
            "data",
            "--images",
            "16",
            "--batch-size",
            "8",
            "--workers",
            "1",
            "--threads",
            "1",
        ],
    )
    assert printed.exit_code == 0, printed.output
    assert "per worker" in printed.output and "training step" in printed.output


def test_bench_rejects_bad_options():
    result = CliRunner().invoke(app, ["bench", "caption", "--arch", "huge"])
    assert result.exit_code == 2
    assert "--arch" in result.output and "'huge' is not one of" in result.output
    result = CliRunner().invoke(app, ["bench", "caption", "--images", "0"])
    assert result.exit_code == 2 and "--images must be at least 1" in result.output
    with pytest.raises(CapfiltError, match="--arch must be one of tiny, small, base, large"):
        BenchConfig(workload="caption", arch="huge")
    with pytest.raises(CapfiltError, match="needs --images of 2 batches or more"):
        BenchConfig(workload="filter", level="data", images=8, batch_size=8)


def test_bench_small_arch_runs_both_sides_end_to_end():
    """The second architecture of the CPU ratios: width 128, 4 + 4 layers, 96 px."""
    report = run_bench_cli(
        "filter", "--arch", "small", "--images", "4", "--captions-per-image", "3"
    )
    assert report["model"] == "random-weights BLIP small"
    assert report["plain_hf"]["images_per_s"] > 0 and report["capfilt"]["images_per_s"] > 0


def test_bench_caption_data_times_the_stage_input_per_worker_count():
    report = run_bench_cli(
        "caption", "--level", "data", "--images", "24", "--batch-size", "8", "--workers", "2"
    )
    assert report["level"].startswith("data: the stage's input path")
    assert [row["workers"] for row in report["data"]] == [0, 1, 2]
    for row in report["data"]:
        assert row["images"] == 24 - 8 and row["images_per_s"] > 0
    rates = {row["workers"]: row["images_per_s"] for row in report["data"]}
    assert report["scaling_1_to_2"] == pytest.approx(rates[2] / rates[1])


def test_the_cores_are_split_between_decoding_and_the_model_on_a_cpu(monkeypatch):
    import os

    import torch

    from capfilt.images.batches import CpuShare, cpu_share, decode_ahead, sharing_cores

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_share(cpu, None, None) == CpuShare(torch=2, decode=None)  # measured
    assert cpu_share(cpu, 0, 3) == CpuShare(torch=3, decode=1)  # --threads decides
    assert cpu_share(cpu, 1, None) == CpuShare(torch=1, decode=0)  # a worker process decodes
    assert cpu_share(gpu, None, None) is None
    before = torch.get_num_threads()
    with sharing_cores(CpuShare(torch=2, decode=None)):
        # Cheap decoding beside the model: inline, the model keeps both cores.
        assert decode_ahead(0.01, 0.1) == 0 and torch.get_num_threads() == 2
        # Decoding as slow as the model: a thread decodes ahead, torch takes the other core.
        assert decode_ahead(0.1, 0.1) == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_share(cpu, 4, None) == CpuShare(torch=12, decode=0)


def test_the_first_batch_decides_how_the_rest_is_decoded(monkeypatch):
    """`image_batches` decodes the first batch inline, times it and the caller's use of it,
    and hands the two times to `decode_ahead`."""
    import time

    from conftest import draw_scene, jpeg_bytes

    import capfilt.images.batches as batches
    from capfilt.models.tiny import image_processor

    seen = []
    monkeypatch.setattr(batches, "decode_ahead", lambda d, m: seen.append((d, m)) or 0)
    rows = batches.ShardImages(
        [str(i) for i in range(6)], [jpeg_bytes(draw_scene("red", "circle"))] * 6
    )
    got = []
    for batch in batches.image_batches(rows, image_processor(32), 2, decode_threads=None):
        got += batch.keys
        time.sleep(0.05)  # the model's turn
    assert got == [str(i) for i in range(6)]
    ((decoding, model),) = seen
    assert 0 < decoding < 0.05 <= model


@pytest.mark.parametrize(
    "arch, bound_images_per_s",
    # DESIGN.md's FLOP bounds at 790 TFLOP/s with 20 new tokens per caption.
    [("base", 5900), ("large", 1900)],
)
def test_caption_flops_agree_with_the_design_bounds(arch, bound_images_per_s):
    from transformers import BlipConfig

    from capfilt.bench import ARCH_SHAPES, BLIP_VOCAB, caption_flops

    shapes = ARCH_SHAPES[arch]
    config = BlipConfig(
        text_config=dict(shapes["text"], vocab_size=BLIP_VOCAB),
        vision_config=shapes["vision"],
    )
    flops = caption_flops(config, captions=1, prompt_len=1, new_tokens=20)
    assert 790e12 / flops == pytest.approx(bound_images_per_s, rel=0.05)


def test_stage_models_on_the_fast_path_write_the_same_rows(
    images_dataset, tiny_captioner, tiny_filter
):
    """The caption and filter stages give the same rows with the fast path inside them."""
    import dataclasses

    import torch

    from capfilt.core.layout import Dataset
    from capfilt.models.blip import Captioner, ItmScorer
    from capfilt.stages.caption import CaptionOptions, caption_shard
    from capfilt.stages.filter import FilterOptions, score_shard

    images = Dataset(str(images_dataset)).read_shard("images", 0)
    fast_captioner = Captioner.load(str(tiny_captioner), "fp32", "cpu", engine="fast")
    greedy = CaptionOptions(
        model=str(tiny_captioner), decoding="greedy", batch_size=4, num_workers=0
    )
    plain = caption_shard(
        Captioner.load(str(tiny_captioner), "fp32", "cpu", engine="hf"), images, greedy
    )
    assert plain.num_rows > 0
    assert caption_shard(fast_captioner, images, greedy).equals(plain)

    # Nucleus sampling on the fast path: keyed by the stage's per-caption seeds, so the
    # captions do not depend on the batch size.
    nucleus = dataclasses.replace(greedy, decoding="nucleus", num_captions=3, seed=5)
    sampled = caption_shard(fast_captioner, images, nucleus)
    assert sampled.num_rows == 3 * plain.num_rows
    rebatched = dataclasses.replace(nucleus, batch_size=3)
    assert caption_shard(fast_captioner, images, rebatched).equals(sampled)
    assert len(set(sampled["text"].to_pylist())) > 1

    filter_config = FilterOptions(
        threshold=0.5, model=str(tiny_filter), batch_size=4, num_workers=0, itm_token="enc"
    )
    expected = score_shard(
        ItmScorer.load(str(tiny_filter), "fp32", "cpu", "enc", engine="hf"),
        images,
        plain,
        filter_config,
    ).to_pydict()
    got = score_shard(
        ItmScorer.load(str(tiny_filter), "fp32", "cpu", "enc", engine="fast"),
        images,
        plain,
        filter_config,
    ).to_pydict()
    for column in ("key", "text_id", "source", "text"):
        assert got[column] == expected[column]
    assert "synthetic" in got["source"]
    for column in ("itm_score", "itc_score"):
        assert [v is None for v in got[column]] == [v is None for v in expected[column]]
        pairs = [
            (g, e) for g, e in zip(got[column], expected[column], strict=True) if e is not None
        ]
        assert torch.allclose(torch.tensor(pairs)[:, 0], torch.tensor(pairs)[:, 1], atol=1e-4)


def test_gpu_suite_dry_run_records_each_step(tmp_path, monkeypatch):
    """The GPU suite's plumbing, on the tiny model and the CPU: parity and a bench step."""
    import sys

    from capfilt import bench_suite

    out = tmp_path / "out"
    argv = ["bench_suite", "--out", str(out), "--dry-run", "--only", "parity", "filter-large-model"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench_suite.main() == 0
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps[0] == "environment"
    assert "parity-caption" in steps and "parity-filter" in steps
    for record in records:
        assert "error" not in record, record.get("traceback")
        if record["step"] == "parity-caption":
            assert record["identical"]
        if record["step"] == "parity-filter":
            assert record["itm_max_abs_diff"] < 1e-4 and record["itc_max_abs_diff"] < 1e-4
    (bench,) = [r for r in records if r["step"] == "filter-large-model"]
    assert bench["result"]["model"] == "random-weights BLIP tiny"
    assert bench["result"]["capfilt"]["images_per_s"] > 0
