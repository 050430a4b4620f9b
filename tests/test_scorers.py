"""CLIP and SigLIP similarity in `capfilt filter` (clip_score, siglip_score), and the record of
captions cut to a model's text window (truncated)."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import shutil

import pytest
from conftest import SCENE_TEXTS, draw_scene, write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet
from capfilt.core.layout import Dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BAD_KEY = "000000001"
# 40 words: more than ITM's 35 tokens, CLIP's 77 and SigLIP's 64 once tokenized.
LONG_CAPTION = " ".join(["a red circle beside a blue square on a white table"] * 4)
NEW_COLUMNS = ("clip_score", "siglip_score", "truncated")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from capfilt.models.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"), SCENE_TEXTS * 3, seed=2)


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    from capfilt.models.tiny_clip import build_tiny_siglip

    return build_tiny_siglip(tmp_path_factory.mktemp("siglip"), SCENE_TEXTS * 3, seed=3)


def plain_scores(kind: str, folder, images: list, texts: list[str], window: int):
    """(len(images), len(texts)) scores by plain transformers: CLIP's cosine
    (logits_per_image / logit_scale), SigLIP's sigmoid(logits_per_image)."""
    import torch
    from transformers import AutoProcessor, CLIPModel, SiglipModel

    processor = AutoProcessor.from_pretrained(str(folder))
    network = {"clip": CLIPModel, "siglip": SiglipModel}[kind].from_pretrained(str(folder)).eval()
    inputs = processor(
        text=texts,
        images=images,
        padding="max_length" if kind == "siglip" else True,
        truncation=True,
        max_length=window,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = network(**inputs).logits_per_image  # (I, T)
    if kind == "clip":
        return logits / network.logit_scale.exp()
    return torch.sigmoid(logits)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scores_match_plain_transformers_pair_by_pair(kind, tiny_clip, tiny_siglip):
    import torch

    from capfilt.models.clip import SimilarityScorer

    folder = {"clip": tiny_clip, "siglip": tiny_siglip}[kind]
    scorer = SimilarityScorer.load(kind, str(folder), precision="fp32", device="cpu")
    assert scorer.window == {"clip": 77, "siglip": 64}[kind]
    images = [draw_scene("red", "circle"), draw_scene("blue", "square", size=70)]
    texts = ["a red circle", "A photo of a BLUE square", "", "naïve café – 東京", LONG_CAPTION]
    index = [i for i in range(len(images)) for _ in texts]  # every image with every text
    pairs = texts * len(images)
    tokens, truncated = scorer.tokenize_cpu(pairs)
    got = scorer.score(scorer.encode_images(images), index, pairs, tokens)
    want = plain_scores(kind, folder, images, texts, scorer.window).reshape(-1)
    assert got.dtype == torch.float32 and got.shape == (len(pairs),)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert len(set(got.tolist())) > len(texts)  # the random model tells pairs apart
    lengths = [len(ids) for ids in scorer.tokenizer(pairs)["input_ids"]]
    assert truncated.tolist() == [n > scorer.window for n in lengths]
    assert truncated.tolist()[len(texts) - 1] is True  # the long caption
    if kind == "siglip":
        assert tokens["input_ids"].shape[1] == 64  # padded to its window, as SigLIP trained
        assert 0 < got.min() and got.max() < 1
    else:
        assert -1 <= got.min() and got.max() <= 1
    # A batch of short texts alone: SigLIP's still padded to its window (it pools the last
    # position), CLIP's to the longest; the same scores either way.
    short = texts[:2]
    alone = scorer.score(scorer.encode_images(images[:1]), [0, 0], short)
    assert torch.allclose(alone, want[:2], atol=1e-4, rtol=0), (alone - want[:2]).abs().max()
    # The pixel tensor of its own image processor gives the same scores as the PIL images.
    pixels = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    again = scorer.score(scorer.encode_images(pixels), index, pairs)
    assert torch.allclose(again, got, atol=1e-6)


def test_itm_truncation_is_marked_from_the_same_tokenization(tiny_filter):
    import torch

    from capfilt.models.blip import ItmScorer

    scorer = ItmScorer.load(str(tiny_filter), precision="fp32", device="cpu", max_text_tokens=8)
    texts = ["a red circle", "a b c d e f", "a b c d e f g", LONG_CAPTION, ""]
    input_ids, attention_mask, truncated = scorer.tokenize_marking_truncation(texts)
    lengths = [len(ids) for ids in scorer.tokenizer(texts)["input_ids"]]
    assert lengths[1] == 8 and lengths[2] == 9  # exactly the window, and one past it
    assert truncated.tolist() == [False, False, True, True, False]
    want = scorer.tokenizer(texts, padding="longest", truncation=True, max_length=8)
    assert torch.equal(input_ids, torch.tensor(want["input_ids"]))
    assert torch.equal(attention_mask, torch.tensor(want["attention_mask"]))


def _long_web_caption(root, key: str) -> None:
    """Give image `key` of images/ shard 0 the long caption (before anything else runs)."""
    import pyarrow as pa

    ds = Dataset(str(root))
    table = ds.read_shard("images", 0)
    captions = [
        LONG_CAPTION if k == key else c
        for k, c in zip(table["key"].to_pylist(), table["caption"].to_pylist(), strict=True)
    ]
    index = table.column_names.index("caption")
    table = table.set_column(index, "caption", pa.array(captions, pa.string()))
    ds.write_shard("images", 0, table)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_captioner):
    """images/ (one undecodable image, one long web caption) with two captions per image."""
    from capfilt.models.blip import Captioner
    from capfilt.stages.caption import CaptionOptions, caption_dataset

    root = tmp_path_factory.mktemp("scorers") / "ds"
    write_images_dataset(root, n_shards=2, per_shard=4, bad_keys=(BAD_KEY,))
    _long_web_caption(root, "000000000")
    captioner = Captioner.load(str(tiny_captioner), precision="fp32", device="cpu")
    config = CaptionOptions(model=str(tiny_captioner), num_captions=2, max_length=10, num_workers=0)
    caption_dataset(str(root), config, captioner=captioner, progress=False)
    return root


@pytest.fixture(scope="module")
def scored(tmp_path_factory, captioned, tiny_filter, tiny_clip, tiny_siglip):
    """`captioned` filtered once through the CLI with both extra scorers."""
    root = tmp_path_factory.mktemp("scored") / "ds"
    shutil.copytree(captioned, root)
    result = invoke(
        "filter", root, "--threshold", 0.5, "--model", tiny_filter, "--batch-size", 3,
        "--clip-model", tiny_clip, "--siglip-model", tiny_siglip,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def test_filter_writes_clip_and_siglip_scores_for_web_and_synthetic(scored, tiny_clip, tiny_siglip):
    ds = Dataset(str(scored))
    scores = ds.read_stage("scores")
    assert scores.schema.field("clip_score").type == "float"
    assert scores.schema.field("siglip_score").type == "float"
    assert scores.schema.field("truncated").type == "bool"
    rows = scores.to_pylist()
    assert {r["source"] for r in rows} == {"web", "synthetic"}
    for row in rows:
        if row["key"] == BAD_KEY:  # undecodable: no score of any model, nothing read
            assert row["itm_score"] is row["clip_score"] is row["siglip_score"] is None
            assert row["truncated"] is None
            continue
        assert -1 <= row["clip_score"] <= 1 and 0 < row["siglip_score"] < 1
        assert row["truncated"] is (row["text"] == LONG_CAPTION)
    assert any(r["text"] == LONG_CAPTION and r["truncated"] for r in rows)

    # The column is each model's score of the pair: plain transformers on the decoded JPEG.
    images = {r["key"]: r["jpg"] for r in ds.read_stage("images", ["key", "jpg"]).to_pylist()}
    some = [r for r in rows if r["clip_score"] is not None][:6]
    for kind, folder, window in (("clip", tiny_clip, 77), ("siglip", tiny_siglip, 64)):
        for row in some:
            image = _decoded(images[row["key"]])
            want = plain_scores(kind, folder, [image], [row["text"]], window)[0, 0].item()
            assert abs(row[f"{kind}_score"] - want) < 1e-4, (kind, row["key"], row["text_id"])

    # Each extra scorer's checkpoint and revision is in the provenance, like the BLIP model's.
    from capfilt.core.provenance import read
    from capfilt.models.blip import content_revision

    options = read(ds.folder("scores"), 0).options
    assert options["clip_model"] == str(tiny_clip.resolve())
    assert options["clip_model_revision"] == content_revision(tiny_clip.resolve())
    assert options["siglip_model"] == str(tiny_siglip.resolve())
    assert options["siglip_model_revision"] == content_revision(tiny_siglip.resolve())
    assert "clip_model" not in read(ds.folder("embeddings"), 0).options
    run = ds.read_manifest()["runs"][-1]
    assert run["clip_model"]["path"] == str(tiny_clip.resolve())
    assert run["siglip_model"]["text_window"] == 64


def _decoded(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_the_same_options_again_do_nothing_and_another_model_is_refused(
    scored, tiny_filter, tiny_clip, tiny_siglip, tmp_path
):
    root = tmp_path / "ds"
    shutil.copytree(scored, root)
    ds = Dataset(str(root))
    mtimes = [ds.fs.modified(ds.shard_path("scores", s)) for s in ds.shards("scores")]
    base = ["filter", root, "--threshold", 0.5, "--model", tiny_filter]
    result = invoke(*base, "--clip-model", tiny_clip, "--siglip-model", tiny_siglip)
    assert result.exit_code == 0, result.output
    assert "not loaded" in result.output
    assert [ds.fs.modified(ds.shard_path("scores", s)) for s in ds.shards("scores")] == mtimes
    # Leaving out a scorer the scores were made with is another set of scores: refused.
    result = invoke(*base, "--clip-model", tiny_clip)
    assert result.exit_code == 2 and "--siglip-model" in result.output
    assert "--overwrite" in result.output


def test_adding_a_scorer_rescores_a_dataset_scored_without_it(
    captioned, tiny_filter, tiny_clip, tmp_path
):
    root = tmp_path / "ds"
    shutil.copytree(captioned, root)
    ds = Dataset(str(root))
    base = ["filter", root, "--threshold", 0.5, "--model", tiny_filter]
    assert invoke(*base).exit_code == 0
    before = ds.read_stage("scores")
    assert before.column("clip_score").null_count == before.num_rows
    assert before.column("siglip_score").null_count == before.num_rows
    # ITM's truncation is recorded without any extra scorer.
    long_rows = [r for r in before.to_pylist() if r["text"] == LONG_CAPTION]
    assert long_rows and all(r["truncated"] for r in long_rows)

    result = invoke(*base, "--clip-model", tiny_clip)  # scores/ made without it: stale
    assert result.exit_code == 2, result.output
    assert "--clip-model" in result.output and "--overwrite" in result.output
    result = invoke(*base, "--clip-model", tiny_clip, "--overwrite")
    assert result.exit_code == 0, result.output
    after = ds.read_stage("scores")
    scored_rows = after.num_rows - after.column("itm_score").null_count
    assert after.num_rows - after.column("clip_score").null_count == scored_rows > 0
    assert after.column("siglip_score").null_count == after.num_rows
    assert after.column("itm_score").to_pylist() == before.column("itm_score").to_pylist()
    result = invoke(*base, "--clip-model", tiny_clip)
    assert result.exit_code == 0 and "not loaded" in result.output


def test_each_vision_encoder_runs_once_per_image_whatever_the_captions(
    captioned, tiny_filter, tiny_clip, tiny_siglip
):
    """Three captions per image (web + two synthetic): each model's vision tower sees each
    decodable image once, through the threads and through the worker processes."""
    from capfilt.models.blip import ItmScorer
    from capfilt.models.clip import SimilarityScorer
    from capfilt.stages.filter import FilterOptions, score_shard

    ds = Dataset(str(captioned))
    images, captions = ds.read_shard("images", 0), ds.read_shard("captions", 0)
    decodable = sum(
        s == "success" and k != BAD_KEY
        for k, s in zip(images["key"].to_pylist(), images["status"].to_pylist(), strict=True)
    )
    itm = ItmScorer.load(str(tiny_filter), precision="fp32", device="cpu")
    similarity = {
        "clip": SimilarityScorer.load("clip", str(tiny_clip), "fp32", "cpu"),
        "siglip": SimilarityScorer.load("siglip", str(tiny_siglip), "fp32", "cpu"),
    }
    seen = {kind: 0 for kind in similarity}

    def counter(kind):
        def hook(module, args, kwargs, output):
            seen[kind] += kwargs["pixel_values"].shape[0]

        return hook

    handles = [
        s.network.vision_model.register_forward_hook(counter(kind), with_kwargs=True)
        for kind, s in similarity.items()
    ]
    try:
        tables = []
        for workers in (0, 1):
            config = FilterOptions(
                threshold=0.5, model=str(tiny_filter), batch_size=2, num_workers=workers
            )
            seen.update(clip=0, siglip=0)
            tables.append(score_shard(itm, images, captions, config, similarity=similarity))
            assert seen == {"clip": decodable, "siglip": decodable}, workers
    finally:
        for handle in handles:
            handle.remove()
    threads, workers = tables
    pairs = threads.num_rows - threads.column("clip_score").null_count
    assert pairs == 3 * decodable  # every caption of every image scored from one pass
    for name in ("clip_score", "siglip_score", "itm_score"):
        a, b = threads.column(name).to_pylist(), workers.column(name).to_pylist()
        assert all((x is None) == (y is None) for x, y in zip(a, b, strict=True))
        assert all(x is None or abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "flag, folder, message",
    [
        ("--clip-model", "siglip", "is a 'siglip' model, not CLIP"),
        ("--siglip-model", "clip", "is a 'clip' model, not SigLIP"),
        ("--clip-model", "filter", "is a 'blip' model, not CLIP"),
        ("--siglip-model", "missing", "does not exist"),
        ("--clip-model", "pickles", "pickled weights"),
        ("--gpu-decode --clip-model", "clip", "--gpu-decode cannot be combined with --clip-model"),
        ("--siglip-model", "siglip2", "is a SigLIP 2 model"),
        ("--siglip-model", "sentencepiece", "pip install sentencepiece"),
    ],
)
def test_a_wrong_scorer_fails_in_one_line_before_any_model_loads(
    flag, folder, message, tmp_path, tiny_filter, tiny_clip, tiny_siglip, monkeypatch
):
    from capfilt.models.blip import ItmScorer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the scorer was checked")

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"not really")
    (pickles / "config.json").write_text('{"model_type": "clip"}')
    siglip2 = tmp_path / "siglip2"
    shutil.copytree(tiny_siglip, siglip2)
    (siglip2 / "config.json").write_text('{"model_type": "siglip2"}')
    # A released SigLIP checkpoint's tokenizer: SentencePiece, an optional package.
    released = tmp_path / "released-siglip"
    shutil.copytree(tiny_siglip, released)
    config = json.loads((released / "tokenizer_config.json").read_text())
    (released / "tokenizer_config.json").write_text(
        json.dumps(dict(config, tokenizer_class="SiglipTokenizer"))
    )
    if folder == "sentencepiece" and importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here")
    folders = {
        "siglip2": siglip2,
        "sentencepiece": released,
        "siglip": tiny_siglip,
        "clip": tiny_clip,
        "filter": tiny_filter,
        "missing": tmp_path / "no-such-model",
        "pickles": pickles,
    }
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=1, per_shard=2)
    monkeypatch.setattr(ItmScorer, "load", no_model)
    result = invoke(
        "filter", root, "--threshold", 0.5, "--model", tiny_filter, *flag.split(), folders[folder]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and flag.split()[-1] in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def _as_old_capfilt_wrote_it(ds: Dataset, shard: int) -> None:
    """Rewrite scores/ shard `shard` without the columns issue 16 added, with its provenance
    pointing at the new file: a shard as an older capfilt left it."""
    from capfilt.core import provenance

    folder = ds.folder("scores")
    table = ds.read_shard("scores", shard)
    table = table.drop_columns([c for c in NEW_COLUMNS if c in table.column_names])
    fingerprint = parquet.write_table_atomic(ds.fs, folder.shard_path(shard), table)
    record = provenance.read(folder, shard)
    provenance.write(folder, shard, dataclasses.replace(record, file=fingerprint))


def test_scores_written_before_the_new_columns_still_work(captioned, tiny_filter, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(captioned, root)
    ds = Dataset(str(root))
    assert invoke("filter", root, "--threshold", 0.5, "--model", tiny_filter).exit_code == 0
    _as_old_capfilt_wrote_it(ds, 0)  # shard 1 keeps the new schema: a mixed folder
    for shard in ds.shards("scores"):
        parquet.check_schema(ds.fs, ds.folder("scores").shard_path(shard), "scores")
    mixed = ds.read_stage("scores")  # the old shard's rows have the new columns as nulls
    assert set(NEW_COLUMNS) <= set(mixed.column_names)
    old_rows = ds.read_shard("scores", 0).num_rows
    assert mixed.column("truncated").slice(0, old_rows).null_count == old_rows

    # A new rule re-derives curated/ from the old shard without a model.
    result = invoke("filter", root, "--threshold", 0.3, "--model", tiny_filter)
    assert result.exit_code == 0, result.output
    assert "not loaded" in result.output
    result = invoke(
        "query", root, "select count(*) AS n, count(truncated) AS t from scores", "--format", "csv"
    )
    assert result.exit_code == 0, result.output
    n, t = result.output.split()[1].split(",")
    assert int(n) == mixed.num_rows and int(t) == mixed.num_rows - old_rows
    for command in (["report", root], ["status", root]):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
    _as_old_capfilt_wrote_it(ds, 1)  # every shard old: no view column is missing
    result = invoke("query", root, "select avg(itm_score) from scores", "--format", "csv")
    assert result.exit_code == 0, result.output
    result = invoke("report", root)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_carries_the_same_images_for_every_image_processor(workers, tiny_clip):
    """Threads, and worker processes each making a chunk of a batch put together again: each
    batch's `more_pixels` are its decoded images through the other processor, in the rows of
    its `pixel_values`."""
    import torch
    from transformers import AutoProcessor

    from capfilt.images.batches import ShardImages, image_batches
    from capfilt.models.tiny import image_processor

    scenes = [draw_scene(c, s, size=40 + 8 * i) for i, (c, s) in enumerate(
        [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")] * 9
    )]  # fmt: skip
    data = [io.BytesIO() for _ in scenes]
    for scene, buf in zip(scenes, data, strict=True):
        scene.save(buf, format="PNG")
    encoded = [buf.getvalue() for buf in data]
    encoded[3] = b"not an image"
    rows = ShardImages([f"k{i}" for i in range(len(encoded))], encoded)
    clip = AutoProcessor.from_pretrained(str(tiny_clip)).image_processor
    batches = list(
        image_batches(
            rows,
            image_processor(64),
            32,
            workers,
            device=torch.device("cpu"),
            more_processors={"clip": clip},
            split_batches=True,
        )
    )
    assert [len(b) for b in batches] == [32, 4]
    for start, batch in zip((0, 32), batches, strict=True):
        ok = [i for i, row in enumerate(batch.pixel_index) if row is not None]
        if start == 0:
            assert batch.pixel_index[3] is None  # undecodable: in neither tensor
        images = [scenes[start + i].convert("RGB") for i in ok]
        want = clip(images=images, return_tensors="pt")["pixel_values"]
        got = batch.more_pixels["clip"]
        assert got.shape[0] == batch.pixel_values.shape[0] == len(ok)
        rows_of = [batch.pixel_index[i] for i in ok]
        assert torch.equal(got[rows_of], want)
