"""`capfilt evaluate`: retrieval recall by ITC similarity, with repeated texts counted as hits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import single_torch_thread, write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import CapfiltError
from capfilt.training import evaluate as evaluate_module
from capfilt.training.evaluate import (
    EvaluateConfig,
    evaluate_retrieval,
    load_retrieval_set,
    recall_at_k,
)
from capfilt.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two shards of 10 rows: 16 downloaded images (seed 3 repeats some captions), 4 failed."""
    root = tmp_path_factory.mktemp("evaluate") / "ds"
    truths = write_images_dataset(root, n_shards=2, per_shard=10, seed=3)
    return root, truths


@pytest.fixture(scope="module")
def tiny_run(scenes, tmp_path_factory):
    root, _ = scenes
    out = tmp_path_factory.mktemp("runs") / "run"
    with single_torch_thread():
        train(
            TrainConfig(
                datasets=(str(root),),
                out=str(out),
                preset="tiny",
                vocab_size=200,
                batch_size=4,
                max_steps=2,
                save_every=2,
                queue_size=16,
                warmup_steps=0,
                num_workers=0,
                progress=False,
                seed=1,
            )
        )
    return out


def test_recall_at_k_counts_any_gold_column_in_the_top_k():
    similarity = torch.tensor(
        [
            [0.9, 0.8, 0.1],  # gold: column 1 → rank 2
            [0.1, 0.9, 0.5],  # gold: column 1 → rank 1
            [0.7, 0.6, 0.5],  # gold: columns 1 and 2 → first hit at rank 2
            [0.3, 0.2, 0.1],  # gold: column 2 → rank 3
        ]
    )
    gold = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    assert recall_at_k(similarity, gold, ks=(1, 2, 3)) == {"R@1": 0.25, "R@2": 0.75, "R@3": 1.0}


def test_retrieval_set_dedups_texts_and_skips_failed_rows(scenes):
    root, truths = scenes
    data = load_retrieval_set(str(root))
    assert data.keys == [key for key, _ in truths]
    assert data.texts == list(dict.fromkeys(caption for _, caption in truths))
    assert len(data.texts) < len(data.keys)  # some images share a caption
    assert data.skipped == {"image not downloaded": 4}
    expected = {(i, data.texts.index(caption)) for i, (_, caption) in enumerate(truths)}
    assert data.gold == expected


def test_retrieval_set_rejects_an_unknown_text_column(scenes):
    with pytest.raises(CapfiltError, match="no column 'true_caption'.*--caption-col"):
        load_retrieval_set(str(scenes[0]), caption_col="true_caption")


def test_perfect_features_give_recall_one_even_with_repeated_texts(scenes, tiny_run, monkeypatch):
    """Features that put each image exactly on its caption's direction must score R@1 = 1."""

    def oracle_features(encoder, data, batch_size):
        text_feat = torch.eye(len(data.texts))
        image_feat = torch.zeros(len(data.images), len(data.texts))
        for image, text in data.gold:
            image_feat[image, text] = 1.0
        return image_feat, text_feat

    monkeypatch.setattr(evaluate_module, "itc_features", oracle_features)
    result = evaluate_retrieval(str(tiny_run), str(scenes[0]), EvaluateConfig())
    assert result.image_to_text["R@1"] == 1.0
    assert result.text_to_image["R@1"] == 1.0


def test_cli_evaluate_prints_and_writes_json(scenes, tiny_run, tmp_path):
    root, truths = scenes
    out = tmp_path / "eval" / "r.json"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(tiny_run), str(root), "--json", "--out", str(out), "--max-images", "12"],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads(out.read_text())
    assert printed["images"] == 12 and printed["step"] == 2
    assert set(printed["image_to_text"]) == {"R@1", "R@5", "R@10"}
    for direction in ("image_to_text", "text_to_image"):
        recalls = list(printed[direction].values())
        assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls)

    table = CliRunner().invoke(app, ["evaluate", str(tiny_run), str(root)])
    assert table.exit_code == 0 and "image → text" in table.output and "R@10" in table.output


def test_cli_evaluate_reports_a_folder_without_a_model_in_one_line(scenes, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), str(scenes[0])])
    assert result.exit_code == 2
    assert "no complete checkpoint" in result.output and "Traceback" not in result.output


def test_an_exported_blip_filter_is_evaluated_by_its_itc_heads(scenes, tiny_filter):
    result = CliRunner().invoke(app, ["evaluate", str(tiny_filter), str(scenes[0]), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # transformers' loading bar goes to stderr
    assert printed["step"] is None and printed["images"] == 16
    assert 0.0 <= printed["text_to_image"]["R@1"] <= printed["text_to_image"]["R@10"] <= 1.0
