"""Trust: every way a user could once get a wrong training set without a word, now refused,
redone or switched whole (issue 11). Each test replays one scenario as a user types it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal

import pytest
from conftest import write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.layout import Dataset
from capfilt.stages.status import dataset_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_OPTIONS = ["--workers", "0", "--batch-size", "4", "--max-length", "10"]


def invoke(*args) -> CliRunner:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def fingerprints(ds: Dataset, stage: str) -> dict:
    folder = ds.folder(stage)
    return {s: folder.fingerprint(s) for s in folder.shards()}


@pytest.fixture(scope="module")
def other_captioner(tmp_path_factory, tiny_tokenizer):
    """A captioner of the same shape as `tiny_captioner`, other weights."""
    from capfilt.models.tiny import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("other"), tiny_tokenizer, "captioner", seed=5)


@pytest.fixture
def captioned(tmp_path, tiny_captioner):
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=3, per_shard=4)
    ok("caption", root, "--model", tiny_captioner, *MODEL_OPTIONS)
    return root


# --- caption with another model or other options ---------------------------------------------
def test_another_model_or_other_options_are_refused_naming_them(
    captioned, tiny_captioner, other_captioner
):
    ds = Dataset(str(captioned))
    before = fingerprints(ds, "captions")
    runs = ds.read_manifest()["runs"]

    result = invoke(
        "caption", captioned, "--model", other_captioner, "--num-captions", "5", *MODEL_OPTIONS
    )
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # the terminal wraps the line
    assert "3 of the 3 shards of captions/" in message and "other options" in message
    assert "--num-captions 1 → 5" in message
    assert f"--model {tiny_captioner} → {other_captioner}" in message
    assert "--overwrite" in message and "Traceback" not in result.output
    # Nothing written, nothing recorded as if the new options had been used.
    assert fingerprints(ds, "captions") == before
    assert ds.read_manifest()["runs"] == runs

    # The options the shards were made with: every shard is done, and the run says so.
    out = ok("caption", captioned, "--model", tiny_captioner, *MODEL_OPTIONS)
    assert "shards skipped (done before) │ 3" in out
    run = ds.read_manifest()["runs"][-1]
    assert run["counts"]["shards_skipped"] == 3 and "shards" not in run["counts"]
    assert run["provenance_options"] == runs[-1]["provenance_options"]

    # --overwrite redoes them with the new options, and says so in the manifest.
    ok(
        "caption",
        captioned,
        "--model",
        other_captioner,
        "--num-captions",
        "2",
        "--overwrite",
        *MODEL_OPTIONS,
    )
    assert ds.read_stage("captions").num_rows == 2 * 4 * 3  # 4 images per shard, 3 shards
    run = ds.read_manifest()["runs"][-1]
    assert run["provenance_options"]["num_captions"] == 2
    assert run["provenance_options"]["model"] == str(other_captioner.resolve())
    assert all(f.up_to_date for f in dataset_status(ds).folders if f.folder == "captions")


def test_same_weights_under_another_path_are_another_model_only_by_path(
    captioned, tiny_captioner, tmp_path
):
    """Weights changed under the same path are another revision: refused, not reused."""
    import shutil

    copy = tmp_path / "captioner"
    shutil.copytree(tiny_captioner, copy)
    ok("caption", captioned, "--model", copy, "--overwrite", *MODEL_OPTIONS)
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    result = invoke("caption", captioned, "--model", copy, *MODEL_OPTIONS)
    assert result.exit_code == 2 and "model_revision" in result.output


# --- two writers at once -----------------------------------------------------------------------
def _hold_lock(root: str, held, release) -> None:
    from capfilt.core.locks import folder_locks

    with folder_locks(Dataset(root), ("captions",), "capfilt caption ds --num-captions 10"):
        held.set()
        release.wait(60)


def test_a_second_caption_run_is_refused_while_the_first_writes(captioned, tiny_captioner):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(captioned), held, release))
    holder.start()
    try:
        assert held.wait(60)
        ds = Dataset(str(captioned))
        before = fingerprints(ds, "captions")
        result = invoke(
            "caption", captioned, "--model", tiny_captioner, "--overwrite", *MODEL_OPTIONS
        )
        message = " ".join(result.output.split())
        assert result.exit_code == 2
        assert "captions/ of" in message and "is being written by" in message
        assert "`capfilt caption ds --num-captions 10`" in message
        assert f"pid {holder.pid}" in message
        assert fingerprints(ds, "captions") == before
        # Readers are never blocked.
        assert "captions" in ok("status", captioned)
        ok("query", captioned, "select count(*) from captions")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.join()
    ok("caption", captioned, "--model", tiny_captioner, "--overwrite", *MODEL_OPTIONS)


# --- a threshold change that fails half-way ------------------------------------------------------
def test_a_threshold_change_that_fails_half_way_leaves_the_old_curated_whole(
    captioned, tiny_filter, monkeypatch
):
    from capfilt.stages import curate

    ok("filter", captioned, "--threshold", "0.4", "--model", tiny_filter, *MODEL_OPTIONS[:4])
    ds = Dataset(str(captioned))
    kept = ds.read_stage("curated").to_pylist()
    assert kept and all(r["itm_score"] >= 0.4 for r in kept)

    derived = []
    real = curate.curate

    def disk_full_on_the_second_shard(scores, rule, keep_best=None):
        derived.append(rule.threshold)
        if len(derived) == 2:
            raise OSError(28, "No space left on device")
        return real(scores, rule, keep_best)

    monkeypatch.setattr(curate, "curate", disk_full_on_the_second_shard)
    result = invoke("filter", captioned, "--threshold", "0.1", "--model", tiny_filter)
    assert result.exit_code != 0 and derived == [0.1, 0.1]
    # Readers still see the 0.4 generation, whole.
    assert ds.folder("curated").record["options"] == {"threshold": 0.4}
    assert ds.read_stage("curated").to_pylist() == kept
    report = ok("report", captioned)
    assert "0.40" in report and "0.10" not in report.split("threshold")[1][:20]
    monkeypatch.setattr(curate, "curate", real)

    ok("filter", captioned, "--threshold", "0.1", "--model", tiny_filter)
    assert ds.folder("curated").record["options"] == {"threshold": 0.1}
    assert all(r["itm_score"] >= 0.1 for r in ds.read_stage("curated").to_pylist())
    assert len(ds.generations("curated")) == 2  # the new one and the one it replaced


# --- captions deleted under scores ---------------------------------------------------------------
def test_deleted_captions_are_not_kept_in_scores_or_curated(captioned, tiny_filter):
    ok("filter", captioned, "--threshold", "0.0", "--model", tiny_filter, *MODEL_OPTIONS[:4])
    ds = Dataset(str(captioned))
    assert "synthetic" in set(ds.read_stage("curated")["source"].to_pylist())
    shutil.rmtree(captioned / "captions")

    status = dataset_status(ds)
    assert status.folder("scores").stale == [0, 1, 2]
    assert any(
        "captions/ shard it was made from is gone" in r for r in status.folder("scores").reasons
    )
    out = ok("filter", captioned, "--threshold", "0.6", "--model", tiny_filter, *MODEL_OPTIONS[:4])
    assert "redone" in out and "captions/ shard it was made from is gone" in " ".join(out.split())
    assert set(ds.read_stage("scores")["source"].to_pylist()) == {"web"}
    assert set(ds.read_stage("curated")["source"].to_pylist()) <= {"web"}


# --- export-data into the dataset ----------------------------------------------------------------
def test_export_data_refuses_the_dataset_and_its_folders(captioned, tiny_filter):
    ok("filter", captioned, "--threshold", "0.0", "--model", tiny_filter, *MODEL_OPTIONS[:4])
    ds = Dataset(str(captioned))
    before = {stage: fingerprints(ds, stage) for stage in ("images", "captions", "curated")}
    for out in (captioned, captioned / "curated", captioned / "new"):
        result = invoke("export-data", captioned, "--out", out, "--overwrite")
        assert result.exit_code == 2 and "inside the dataset" in result.output, result.output
    assert {stage: fingerprints(ds, stage) for stage in before} == before
    assert json.loads((captioned / "capfilt.json").read_text())["runs"]


# --- a re-fetch that changes what each key means -----------------------------------------------
@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from _web import local_web

    with local_web(tmp_path_factory.mktemp("trustweb"), n=16, wrong_fraction=0.0) as served:
        yield served


def test_refetch_of_a_shuffled_list_makes_every_later_stage_redo_its_shards(
    web, tmp_path, tiny_captioner, tiny_filter
):
    from _web import write_list

    rows = web.rows(broken=False)
    urls = write_list(rows, tmp_path / "urls.csv", "csv")
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    urls_shuffled = write_list(shuffled, tmp_path / "urls_shuffled.csv", "csv")
    root = tmp_path / "ds"
    fetch = ["--shard-size", "4", "--image-size", "32", "--threads", "4"]
    fetch += ["--allow-private-addresses"]
    ok("fetch", urls, root, *fetch)
    ok("caption", root, "--model", tiny_captioner, *MODEL_OPTIONS)
    ok("filter", root, "--threshold", "0.0", "--model", tiny_filter, *MODEL_OPTIONS[:4])

    refused = invoke("fetch", urls_shuffled, root, *fetch)
    assert refused.exit_code == 2 and "another source" in refused.output
    out = " ".join(ok("fetch", urls_shuffled, root, *fetch, "--overwrite").split())
    assert (
        "images/ changed" in out and "captions/ (4 shards)" in out and "scores/ (4 shards)" in out
    )
    ds = Dataset(str(root))
    status = dataset_status(ds)
    assert status.folder("images").done == [0, 1, 2, 3]
    assert status.folder("captions").stale == [0, 1, 2, 3]
    assert status.folder("scores").stale == [0, 1, 2, 3]
    assert status.folder("curated").stale == [0, 1, 2, 3]

    # Filtering now would score old synthetic captions against the new images: refused.
    result = invoke("filter", root, "--threshold", "0.0", "--model", tiny_filter)
    assert result.exit_code == 2 and "run `capfilt caption" in result.output
    # So would shipping or training on the old curated/ texts joined to the new images.
    result = invoke("export-data", root, "--out", tmp_path / "export")
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "curated/ shards" in message and "stale" in message
    assert not (tmp_path / "export").exists()
    from capfilt.core.errors import CapfiltError
    from capfilt.training.stream import Picking, build_plan

    with pytest.raises(CapfiltError, match="curated/ .* is stale"):
        build_plan((str(root),), (1.0,), Picking("all", 30))
    out = ok("caption", root, "--model", tiny_captioner, *MODEL_OPTIONS)
    assert "shards captioned             │ 4" in out
    ok("filter", root, "--threshold", "0.0", "--model", tiny_filter, *MODEL_OPTIONS[:4])
    assert all(f.up_to_date for f in dataset_status(ds).folders if f.folder != "reports")

    # Every curated web row carries the caption of its own image, as listed now.
    web_caption = {r["key"]: r["caption"] for r in ds.read_stage("images").to_pylist()}
    curated_web = [r for r in ds.read_stage("curated").to_pylist() if r["source"] == "web"]
    assert curated_web and all(r["text"] == web_caption[r["key"]] for r in curated_web)


# --- capfilt status --------------------------------------------------------------------------
def test_status_lists_done_stale_and_pending_shards_with_their_reasons(
    captioned, tiny_captioner, tiny_filter
):
    ds = Dataset(str(captioned))
    (captioned / "captions" / "00002.parquet").unlink()
    out = ok("status", captioned)
    assert "captions/" in out and "00002" in out and "not captioned yet" in out
    assert "scores/" in out and "not run" in out

    data = json.loads(ok("status", captioned, "--json"))
    captions = next(f for f in data["folders"] if f["folder"] == "captions")
    assert captions["done"] == [0, 1] and captions["pending"] == [2]
    assert captions["options"]["num_captions"] == 1

    ok("caption", captioned, "--model", tiny_captioner, *MODEL_OPTIONS)
    ok("filter", captioned, "--threshold", "0.5", "--model", tiny_filter, *MODEL_OPTIONS[:4])
    ok("report", captioned)
    assert "every stage is up to date" in ok("status", captioned)

    # Captions redone by hand with another seed: scores, curated and the report are stale.
    ok(
        "caption",
        captioned,
        "--model",
        tiny_captioner,
        "--seed",
        "9",
        "--overwrite",
        *MODEL_OPTIONS,
    )
    status = dataset_status(ds)
    assert status.folder("scores").stale == [0, 1, 2]
    assert status.folder("curated").stale == [0, 1, 2]  # its scores will change
    assert status.folder("reports").stale == [0]
    out = " ".join(ok("status", captioned).split())
    assert "captions/ changed since" in out
