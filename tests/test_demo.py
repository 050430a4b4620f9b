"""`capfilt demo`: the whole loop of pipelines/demo.toml on a very small toy web.

No quality is asserted here (a few training steps learn nothing); the test checks that every
stage of the real pipeline file produces its outputs and that the demo prints its figures.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import single_torch_thread
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.demo.loop import DemoConfig, demo_figures, make_toy_data
from capfilt.stages.report import read_summary

SMALL = [
    "--images", "40", "--annotated-images", "12", "--heldout-images", "8",
    "--set", "pretrain_steps=2", "--set", "caption_steps=1", "--set", "filter_steps=1",
    "--set", "batch_size=4",
    # Everything kept, so the second pretraining surely has a batch to train on.
    "--set", "threshold=0.0",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    with single_torch_thread():
        result = CliRunner().invoke(app, ["demo", str(root), *SMALL])
    return root, result


def test_every_stage_of_the_demo_pipeline_writes_its_outputs(small_demo):
    root, result = small_demo
    assert result.exit_code == 0, result.output
    web = Dataset(str(root / "web"))
    for stage in ("images", "captions", "scores", "curated"):
        assert web.has_stage(stage), stage
    for name in ("annotated", "heldout"):
        assert Dataset(str(root / name)).has_stage("images")
    for run in ("web", "captioner", "filter", "capfilt"):
        assert list((root / "runs" / run).glob("step-*/metadata.json")), run
    assert (root / "models" / "captioner" / "config.json").is_file()
    assert (root / "models" / "filter" / "config.json").is_file()
    summary = read_summary(Dataset(str(root / "web")))
    truth = summary["truth"]
    assert truth["wrong"] == 12  # 30 % of 40
    assert {"precision", "recall", "caught", "dropped"} <= set(truth)
    for name in ("web", "capfilt"):
        evaluation = json.loads((root / "eval" / f"{name}.json").read_text())
        assert evaluation["images"] == 8 and "R@1" in evaluation["text_to_image"]


def test_running_the_demo_again_resumes_it(small_demo):
    """Every stage finds its shards done: the toy web is served on the port of the first run,
    so its URL list is the same source."""
    root, first = small_demo
    assert first.exit_code == 0, first.output
    web = Dataset(str(root / "web"))
    runs_before = len(web.read_manifest()["runs"])
    generations = web.current_generation("curated")
    with single_torch_thread():
        again = CliRunner().invoke(app, ["demo", str(root), *SMALL])
    assert again.exit_code == 0, again.output
    assert "14/14" in again.output
    runs = web.read_manifest()["runs"][runs_before:]
    assert [r["stage"] for r in runs] == ["fetch", "caption", "filter"]
    assert all(r["counts"].get("shards", 0) == 0 for r in runs if r["stage"] != "fetch")
    assert runs[0]["counts"]["shards_done"] == 0
    assert web.current_generation("curated") == generations  # nothing changed: no switch


def test_the_demo_prints_its_figures(small_demo):
    root, result = small_demo
    output = result.output
    assert "14/14" in output  # every stage of pipelines/demo.toml ran
    assert "filter vs the truth" in output and "precision" in output and "recall" in output
    assert "Synthetic captions" in output
    assert "noisy web" in output and "after CapFilt" in output and "R@1" in output
    figures = demo_figures(root)
    assert set(figures.retrieval) == {"noisy web", "after CapFilt"}
    assert len(figures.caption_samples) == 8 and 0.0 <= figures.synthetic_correct <= 1.0


def test_toy_data_of_another_size_clears_the_old_outputs(tmp_path):
    config = DemoConfig(images=6, annotated_images=3, heldout_images=3)
    make_toy_data(tmp_path, config)
    stale = tmp_path / "runs" / "web" / "step-9"
    stale.mkdir(parents=True)
    make_toy_data(tmp_path, config)  # the same sizes: a re-run resumes
    assert stale.exists()
    data = make_toy_data(tmp_path, DemoConfig(images=8, annotated_images=3, heldout_images=3))
    assert not stale.exists()
    assert (
        len(data.web_pairs) == 8 and len(list((tmp_path / "toy" / "web" / "images").iterdir())) == 8
    )
    captions = (tmp_path / "toy" / "annotated" / "captions.csv").read_text().splitlines()
    assert captions[0] == "file_name,caption" and len(captions) == 4


def test_the_demo_never_clears_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "precious.txt").write_text("keep me")
    with pytest.raises(CapfiltError, match="new or empty folder"):
        make_toy_data(tmp_path, DemoConfig(images=6, annotated_images=3, heldout_images=3))
    assert (tmp_path / "runs" / "precious.txt").read_text() == "keep me"


def test_bad_demo_sizes_are_clear_errors():
    with pytest.raises(CapfiltError, match="wrong-fraction"):
        DemoConfig(wrong_fraction=1.5)
    with pytest.raises(CapfiltError, match="at least 2"):
        DemoConfig(heldout_images=1)


def test_identical_texts_are_never_drawn_as_itm_negatives():
    """Toy (and web) captions repeat: a 'negative' with the positive's own text would teach
    ITM that a matching caption does not match, and the demo's filter would learn nothing."""
    from capfilt.models.med import sample_hard_negatives

    texts = torch.tensor([0, 0, 0, 1, 2, 2])  # a text id per pair
    same = texts[:, None] == texts[None, :]
    sim = torch.zeros(6, 6)
    for _ in range(20):
        neg_image, neg_text = sample_hard_negatives(sim, sim, same)
        assert (texts[neg_text] != texts).all() and (texts[neg_image] != texts).all()
    # A batch of one repeated text has no true negative; the others are used rather than fail.
    one_text = torch.ones(3, 3, dtype=torch.bool)
    neg_image, _ = sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), one_text)
    assert (neg_image != torch.arange(3)).all()
