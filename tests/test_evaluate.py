"""`capfilt evaluate`: retrieval recall by ITC similarity, with repeated texts counted as hits,
and COCO captioning scores of the models that caption."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import single_torch_thread, write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import CapfiltError
from capfilt.training import caption_metrics as metrics_module
from capfilt.training import evaluate as evaluate_module
from capfilt.training.caption_metrics import caption_metrics
from capfilt.training.evaluate import (
    EvaluateConfig,
    RetrievalSet,
    distinct_images,
    evaluate_model,
    load_retrieval_set,
    recall_at_k,
)
from capfilt.training.loop import TrainConfig, train

# BLEU-4 and CIDEr only: METEOR's jar takes 10 s or more to start (test_caption_metrics.py).
FAST_METRICS = ["--caption-metrics", "bleu4,cider"]


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


@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory):
    from capfilt.training.export import export_run

    out = tmp_path_factory.mktemp("export") / "blip"
    export_run(tiny_run, out)
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
    assert data.references == [[caption] for _, caption in truths]
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
    result = evaluate_model(str(tiny_run), str(scenes[0]), EvaluateConfig(captioning=False))
    assert result.image_to_text["R@1"] == 1.0
    assert result.text_to_image["R@1"] == 1.0


def test_cli_evaluate_prints_and_writes_json(scenes, tiny_run, tmp_path):
    root, truths = scenes
    out = tmp_path / "eval" / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            *(str(tiny_run), str(root), "--json", "--out", str(out), "--max-images", "12"),
            *FAST_METRICS,
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads(out.read_text())
    assert printed["images"] == 12 and printed["step"] == 2
    assert set(printed["image_to_text"]) == {"R@1", "R@5", "R@10"}
    for direction in ("image_to_text", "text_to_image"):
        recalls = list(printed[direction].values())
        assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls)

    captioning = printed["captioning"]
    # A toy scene's picture is drawn from its caption: equal captions, equal image bytes.
    scenes_drawn = len({caption for _, caption in truths[:12]})
    assert captioning["images"] == scenes_drawn < 12 and captioning["references"] == 12
    assert 0.0 <= captioning["bleu4"] <= 1.0 and captioning["cider"] >= 0.0
    assert "meteor" not in captioning and "spice" not in captioning  # not asked for
    assert captioning["decoding"] == dict(
        method="beam",
        num_beams=3,
        min_length=5,
        max_length=20,
        prompt="",  # a pretraining run's LM had no prompt
        precision="fp32",
        device=captioning["decoding"]["device"],  # cpu here, cuda where there is one
    )
    assert printed["not_scored"] == {}

    table = CliRunner().invoke(app, ["evaluate", str(tiny_run), str(root), *FAST_METRICS])
    assert table.exit_code == 0, table.output
    assert "image → text" in table.output and "R@10" in table.output
    assert "BLEU-4" in table.output and "CIDEr" in table.output


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
    assert printed["captioning"] is None  # a filter has no text decoder
    assert "ITM filter" in printed["not_scored"]["captioning"]


def test_distinct_images_are_told_apart_by_their_bytes_and_keep_every_text():
    """COCO's annotation file becomes one row, with its own key, per caption of an image."""
    data = RetrievalSet(
        keys=["a", "b", "c", "d"],
        images=[b"cat", b"dog", b"cat", b"cat"],
        texts=[],
        gold=set(),
        skipped={},
        references=[["a cat"], ["a dog"], ["a small cat", "a kitten"], ["a cat"]],
    )
    keys, images, references = distinct_images(data)
    assert keys == ["a", "b"] and images == [b"cat", b"dog"]
    assert references == [["a cat", "a small cat", "a kitten", "a cat"], ["a dog"]]


def recorded_captioning(monkeypatch, model, dataset, **options):
    """evaluate_model's result, and the predictions and references it scored."""
    seen = {}

    def record(predictions, references, *args, **kwargs):
        seen.update(predictions=predictions, references=references)
        return caption_metrics(predictions, references, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "caption_metrics", record)
    config = EvaluateConfig(caption_metrics=("bleu4", "cider"), **options)
    return evaluate_model(str(model), str(dataset), config), seen


def test_captions_are_the_models_own_whatever_the_references(
    scenes, tiny_run, tmp_path, monkeypatch
):
    import pyarrow as pa

    from capfilt.core.layout import Dataset

    root, truths = scenes
    other = Dataset(str(tmp_path / "other"))
    for shard in (0, 1):
        table = Dataset(str(root)).read_shard("images", shard)
        wrong = pa.array([f"nothing like {text}" for text in table["caption"].to_pylist()])
        other.write_shard("images", shard, table.set_column(2, "caption", wrong))
    _, first = recorded_captioning(monkeypatch, tiny_run, root, max_images=6)
    _, second = recorded_captioning(monkeypatch, tiny_run, tmp_path / "other", max_images=6)
    assert first["references"] != second["references"]
    assert first["predictions"] == second["predictions"]
    distinct = {}  # the first key of each scene drawn
    for key, caption in truths[:6]:
        distinct.setdefault(caption, key)
    assert list(first["predictions"]) == list(distinct.values())
    assert all(isinstance(text, str) for text in first["predictions"].values())


def test_an_export_is_scored_on_both_and_captions_as_its_run_does(
    scenes, tiny_run, tiny_export, monkeypatch
):
    root, _ = scenes
    # One prompt for both: a pretraining run's default is none, an export's BLIP's.
    same = dict(max_images=8, prompt="a picture of ")
    from_run, run_seen = recorded_captioning(monkeypatch, tiny_run, root, **same)
    result, export_seen = recorded_captioning(monkeypatch, tiny_export, root, **same)
    assert result.image_to_text is not None and result.step is None
    assert result.captioning["references"] == 8 and result.not_scored == {}
    assert 0.0 <= result.captioning["bleu4"] <= 1.0 and result.captioning["cider"] >= 0.0
    # the export holds the run's weights: the same captions, whichever folder is evaluated
    assert export_seen["predictions"] == run_seen["predictions"]
    assert result.captioning["bleu4"] == from_run.captioning["bleu4"]


def test_a_blip_captioner_is_scored_on_captioning_only(scenes, tiny_captioner):
    root, truths = scenes
    result = CliRunner().invoke(
        app, ["evaluate", str(tiny_captioner), str(root), "--json", *FAST_METRICS]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["image_to_text"] is None and printed["text_to_image"] is None
    assert "BLIP captioner" in printed["not_scored"]["retrieval"]
    assert printed["captioning"]["images"] == len({caption for _, caption in truths})
    assert 0.0 <= printed["captioning"]["bleu4"] <= 1.0 and printed["captioning"]["cider"] >= 0

    nothing = CliRunner().invoke(
        app, ["evaluate", str(tiny_captioner), str(root), "--no-captioning"]
    )
    assert nothing.exit_code == 2 and "nothing to evaluate" in nothing.output


def test_an_export_without_filter_gets_captioning_only(scenes, tiny_run, tmp_path):
    from capfilt.training.export import export_run

    export_run(tiny_run, tmp_path / "blip", kinds=("captioner",))
    config = EvaluateConfig(max_images=4, caption_metrics=("cider",))
    result = evaluate_model(str(tmp_path / "blip"), str(scenes[0]), config)
    assert result.image_to_text is None and "no filter/" in result.not_scored["retrieval"]
    assert result.captioning["cider"] >= 0.0
    with pytest.raises(CapfiltError, match="nothing to evaluate"):
        evaluate_model(str(tmp_path / "blip"), str(scenes[0]), config.replace(captioning=False))


def run_as(tiny_run, folder, **train_config):
    """A copy of the tiny run whose metadata says it was trained with `train_config`."""
    shutil.copytree(tiny_run, folder)
    for metadata in folder.glob("step-*/metadata.json"):
        record = json.loads(metadata.read_text())
        record["train_config"].update(train_config)
        metadata.write_text(json.dumps(record))
    return folder


def test_an_itm_finetuned_run_gets_retrieval_only(scenes, tiny_run, tmp_path):
    run = run_as(tiny_run, tmp_path / "itm", task="itm")
    result = evaluate_model(str(run), str(scenes[0]), EvaluateConfig(max_images=4))
    assert result.captioning is None and result.image_to_text is not None
    assert "ITM-finetuned" in result.not_scored["captioning"]


def test_a_caption_finetuned_run_is_prompted_with_its_own_prompt(scenes, tiny_run, tmp_path):
    run = run_as(tiny_run, tmp_path / "caption", task="caption", prompt="a photo of ")
    config = EvaluateConfig(max_images=4, caption_metrics=("bleu4",))
    result = evaluate_model(str(run), str(scenes[0]), config)
    assert result.captioning["decoding"]["prompt"] == "a photo of "
    given = evaluate_model(str(run), str(scenes[0]), config.replace(prompt="an image of "))
    assert given.captioning["decoding"]["prompt"] == "an image of "
    # Pretraining's LM had no prompt before its texts: a pretraining run is evaluated without.
    pretrained = evaluate_model(str(tiny_run), str(scenes[0]), config)
    assert pretrained.captioning["decoding"]["prompt"] == ""


def test_caption_options_are_checked_before_any_model_loads(scenes, tiny_run):
    result = CliRunner().invoke(
        app, ["evaluate", str(tiny_run), str(scenes[0]), "--caption-metrics", "bleu4,rouge"]
    )
    assert result.exit_code == 2 and "--caption-metrics takes some of" in result.output
    result = CliRunner().invoke(
        app, ["evaluate", str(tiny_run), str(scenes[0]), "--min-length", "30"]
    )
    assert result.exit_code == 2 and "--min-length (30) is larger" in result.output
