"""Shards shared between processes: `accelerate launch -m capfilt caption` against one process."""

from __future__ import annotations

import os
import shutil
import subprocess

from conftest import accelerate_launch_on_cpu, write_images_dataset

from capfilt.core.distributed import Processes, sum_counts
from capfilt.core.layout import Dataset
from capfilt.stages.caption import CaptionOptions, caption_dataset


def test_each_shard_belongs_to_exactly_one_process():
    shards = [0, 1, 2, 3, 4, 7, 10]
    parts = [Processes(rank, 3).my_shards(shards) for rank in range(3)]
    assert sorted(s for part in parts for s in part) == shards
    assert parts == [[0, 3], [1, 4, 7, 10], [2]]
    assert Processes().my_shards(shards) == shards and Processes().is_main


def test_sum_counts_adds_nested_counts():
    gathered = [dict(images=3, kept={"web": 1}), dict(images=4, kept={"web": 2, "synthetic": 5})]
    assert sum_counts(gathered) == dict(images=7, kept={"web": 3, "synthetic": 5})


def test_accelerate_launch_two_processes_write_each_row_once(tmp_path, tiny_captioner, tiny_filter):
    """Two processes caption and filter three shards; each row is written once."""
    root = tmp_path / "launched"
    write_images_dataset(root, n_shards=3, per_shard=4, bad_keys=("000010001",))
    single = tmp_path / "single"
    shutil.copytree(root, single)
    options = ["--num-captions", "2", "--max-length", "10", "--seed", "5", "--workers", "0"]

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    launch = [
        *accelerate_launch_on_cpu(2),
        "-m",
        "capfilt",
        "caption",
        str(root),
        "--model",
        str(tiny_captioner),
        *options,
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("captions written") == 1  # only the main process prints

    config = CaptionOptions(
        model=str(tiny_captioner),
        num_captions=2,
        max_length=10,
        seed=5,
        num_workers=0,
        device="cpu",
    )
    caption_dataset(str(single), config, progress=False)

    launched, alone = Dataset(str(root)), Dataset(str(single))
    assert launched.shards("captions") == [0, 1, 2]
    rows = launched.read_stage("captions").to_pylist()
    keys = [(r["key"], r["caption_id"]) for r in rows]
    assert len(keys) == len(set(keys))
    # Seeds derive from keys, so even the sampled texts agree with the one-process run.
    assert sorted(rows, key=_row_id) == sorted(
        alone.read_stage("captions").to_pylist(), key=_row_id
    )

    runs = launched.read_manifest()["runs"]
    assert len(runs) == 1  # recorded once, by the main process
    assert runs[0]["processes"] == 2
    assert runs[0]["counts"]["shards"] == 3
    assert runs[0]["counts"]["captions"] == sum(1 for r in rows if r["status"] == "success")
    assert runs[0]["counts"]["errors"] == 1
    assert runs[0]["model"]["path"] == str(tiny_captioner.resolve())

    # filter too: scores/ from both processes, then curated/ derived after they all met.
    launch_filter = [
        *launch[: launch.index("caption")],
        "filter",
        str(root),
        "--model",
        str(tiny_filter),
        "--threshold",
        "0.45",
        "--workers",
        "0",
    ]
    done = subprocess.run(launch_filter, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert launched.shards("scores") == launched.shards("curated") == [0, 1, 2]
    scores = launched.read_stage("scores").to_pylist()
    pairs = [(r["key"], r["text_id"]) for r in scores]
    assert len(pairs) == len(set(pairs)) == len(rows) - 1 + len({r["key"] for r in rows})
    kept = {(r["key"], r["text_id"]) for r in launched.read_stage("curated").to_pylist()}
    assert kept == {
        (r["key"], r["text_id"])
        for r in scores
        if r["itm_score"] is not None and r["itm_score"] >= 0.45
    }
    run = launched.read_manifest()["runs"][-1]
    assert run["stage"] == "filter" and run["processes"] == 2
    assert sum(run["counts"]["pairs_by_source"].values()) == len(scores)


def _row_id(row: dict):
    return row["key"], row["caption_id"]
