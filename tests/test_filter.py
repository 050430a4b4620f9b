"""`capfilt filter`: scores of web and synthetic captions, curated/ at a threshold."""

from __future__ import annotations

import pytest
from conftest import write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.stages.caption import CaptionOptions, caption_dataset
from capfilt.stages.filter import FilterOptions, filter_dataset

BAD_KEY = "000000001"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_captioner):
    """A dataset with images/ (one undecodable image) and two synthetic captions per image."""
    from capfilt.models.blip import Captioner

    root = tmp_path_factory.mktemp("filter") / "ds"
    truths = write_images_dataset(root, n_shards=2, per_shard=5, bad_keys=(BAD_KEY,))
    captioner = Captioner.load(str(tiny_captioner), precision="fp32", device="cpu")
    config = CaptionOptions(model=str(tiny_captioner), num_captions=2, max_length=10, num_workers=0)
    caption_dataset(str(root), config, captioner=captioner, progress=False)
    return root, truths


@pytest.fixture(scope="module")
def scored(tmp_path_factory, captioned, tiny_filter):
    """`captioned` copied and filtered once through the CLI at threshold 0.5 (auto: [ENC])."""
    import shutil

    source, truths = captioned
    root = tmp_path_factory.mktemp("scored") / "ds"
    shutil.copytree(source, root)
    result = invoke(
        "filter",
        root,
        "--threshold",
        0.5,
        "--model",
        tiny_filter,
        "--batch-size",
        3,
    )  # --workers left at its default: threads on the CPU
    assert result.exit_code == 0, result.output
    return root, truths, result.output


def test_filter_scores_web_and_every_synthetic_caption(scored, tiny_filter):
    root, truths, output = scored
    ds = Dataset(str(root))
    assert ds.shards("scores") == ds.shards("curated") == [0, 1]
    scores = ds.read_stage("scores").to_pylist()
    captions = {
        (r["key"], r["caption_id"]): r["text"]
        for r in ds.read_stage("captions").to_pylist()
        if r["status"] == "success"
    }
    web = dict(truths)
    by_key: dict[str, list] = {}
    for row in scores:
        by_key.setdefault(row["key"], []).append(row)
    assert set(by_key) == set(web)  # failed downloads are not scored

    for key, rows in by_key.items():
        rows.sort(key=lambda r: r["text_id"])
        assert rows[0]["text_id"] == 0 and rows[0]["source"] == "web"
        assert rows[0]["text"] == web[key]
        if key == BAD_KEY:  # undecodable: its web caption is a row with no scores
            assert len(rows) == 1 and rows[0]["itm_score"] is None
            continue
        assert [r["text_id"] for r in rows] == [0, 1, 2]
        for row in rows[1:]:
            assert row["source"] == "synthetic"
            assert row["text"] == captions[(key, row["text_id"] - 1)]
        for row in rows:
            assert 0 <= row["itm_score"] <= 1 and -1 <= row["itc_score"] <= 1
            assert row["model"] == str(tiny_filter)

    curated = ds.read_stage("curated").to_pylist()
    expected = {
        (r["key"], r["text_id"])
        for r in scores
        if r["itm_score"] is not None and r["itm_score"] >= 0.5
    }
    assert {(r["key"], r["text_id"]) for r in curated} == expected

    run = ds.read_manifest()["runs"][-1]
    assert run["stage"] == "filter" and run["itm_token"] == "enc"
    assert run["model"]["path"] == str(tiny_filter.resolve())
    assert run["options"]["threshold"] == 0.5
    assert run["options"]["num_workers"] is None  # the default: threads on the CPU
    assert run["decoding_workers"] == 0
    assert run["counts"]["errors"] == 1
    assert "synthetic" in output and "ITM token" in output


def test_new_threshold_rederives_curated_without_a_model(scored, tiny_filter):
    root, _, _ = scored
    ds = Dataset(str(root))
    scores = ds.read_stage("scores").to_pylist()
    itm = sorted(r["itm_score"] for r in scores if r["itm_score"] is not None)
    threshold = itm[len(itm) // 2]  # keeps about half of the pairs
    mtimes = [ds.fs.modified(ds.shard_path("scores", s)) for s in (0, 1)]
    generation = ds.current_generation("curated")

    result = invoke("filter", root, "--threshold", threshold, "--model", tiny_filter)
    assert result.exit_code == 0, result.output
    assert "not loaded" in result.output
    assert ds.current_generation("curated") == generation + 1  # switched in whole
    kept = ds.read_stage("curated").to_pylist()
    assert len(kept) == sum(1 for v in itm if v >= threshold)
    assert 0 < len(kept) < len(itm)
    assert all(r["itm_score"] >= threshold for r in kept)
    assert [ds.fs.modified(ds.shard_path("scores", s)) for s in (0, 1)] == mtimes
    run = ds.read_manifest()["runs"][-1]
    assert run["rescored"] is False and "device" not in run["model"]  # never loaded
    assert run["threshold"] == threshold

    # Another model is refused before anything is loaded or written: the scores are not its.
    result = invoke("filter", root, "--threshold", threshold, "--model", "/no/such/model")
    assert result.exit_code == 2 and "made with other options" in result.output
    assert "/no/such/model" in result.output and "--overwrite" in result.output
    assert ds.read_manifest()["runs"][-1] == run  # nothing recorded

    # The bogus model is used, and fails clearly, as soon as there is something to score.
    ds.fs.rm(ds.shard_path("scores", 1))
    result = invoke(
        "filter", root, "--threshold", threshold, "--model", "/no/such/model", "--overwrite"
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def test_query_answers_after_filter(scored):
    root, _, _ = scored
    result = invoke(
        "query",
        root,
        "select source, count(*), avg(itm_score) from scores group by 1",
        "--format",
        "csv",
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "source,count_star(),avg(itm_score)"
    assert {line.split(",")[0] for line in lines[1:]} == {"web", "synthetic"}


def test_without_captions_only_web_captions_are_scored(tmp_path, tiny_filter):
    root = tmp_path / "ds"
    truths = write_images_dataset(root, n_shards=1, per_shard=4)
    result = filter_dataset(
        str(root),
        FilterOptions(threshold=0.0, model=str(tiny_filter), num_workers=0),
        progress=False,
    )
    rows = Dataset(str(root)).read_stage("scores").to_pylist()
    assert {(r["key"], r["text_id"], r["source"]) for r in rows} == {
        (key, 0, "web") for key, _ in truths
    }
    assert result.sources["web"].kept == len(truths)  # threshold 0 keeps every scored pair
    assert result.sources["synthetic"].pairs == 0


def test_itm_token_cls_and_enc_are_recorded_and_differ(captioned, tiny_filter, tmp_path):
    import shutil

    source, _ = captioned
    results = {}
    for token in ("cls", "enc"):
        root = tmp_path / token
        shutil.copytree(source, root)
        filter_dataset(
            str(root),
            FilterOptions(threshold=0.5, model=str(tiny_filter), itm_token=token, num_workers=0),
            progress=False,
        )
        ds = Dataset(str(root))
        assert ds.read_manifest()["runs"][-1]["itm_token"] == token
        results[token] = ds.read_stage("scores").to_pylist()
    pairs = list(zip(results["cls"], results["enc"], strict=True))
    assert all(a["key"] == b["key"] and a["text_id"] == b["text_id"] for a, b in pairs)
    scored_pairs = [(a, b) for a, b in pairs if a["itm_score"] is not None]
    assert any(abs(a["itm_score"] - b["itm_score"]) > 1e-6 for a, b in scored_pairs)
    assert all(abs(a["itc_score"] - b["itc_score"]) < 1e-6 for a, b in scored_pairs)


def test_scores_are_redone_when_captions_changed(captioned, tiny_filter, tiny_captioner, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(captioned[0], root)
    ds = Dataset(str(root))
    config = FilterOptions(threshold=0.5, model=str(tiny_filter), num_workers=0)
    filter_dataset(ds, config, progress=False)
    old = ds.read_shard("scores", 0)
    # Captioned again with other options (one caption per image): every scores/ shard is
    # stale, so the next filter run scores them again, and says so.
    caption_dataset(
        ds,
        CaptionOptions(
            model=str(tiny_captioner), num_captions=1, seed=99, max_length=10, overwrite=True
        ),
        progress=False,
    )
    result = filter_dataset(ds, config, progress=False)
    assert (result.scored.shards_done, result.scored.shards_skipped) == (2, 0)
    assert result.scored.shards_redone == 2
    assert "captions/ changed since" in result.scored.plan.checks[0].why
    new = ds.read_shard("scores", 0)
    assert new.num_rows < old.num_rows  # one synthetic caption per image now, not two

    # captions/ shard 1 deleted: its scores keep no synthetic caption that captions/ lacks.
    ds.fs.rm(ds.shard_path("captions", 1))
    result = filter_dataset(ds, config, progress=False)
    assert (result.scored.shards_done, result.scored.shards_skipped) == (1, 1)
    assert "captions/ shard it was made from is gone" in result.scored.plan.checks[1].why
    assert set(ds.read_shard("scores", 1)["source"].to_pylist()) == {"web"}
    assert set(ds.read_shard("curated", 1)["source"].to_pylist()) <= {"web"}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(threshold=1.5), "--threshold must be in \\[0, 1\\], got 1.5"),
        (dict(threshold=-0.1), "--threshold must be in \\[0, 1\\], got -0.1"),
        (dict(threshold=0.5, itm_token="sep"), "--itm-token must be one of"),
        (dict(threshold=0.5, batch_size=0), "--batch-size must be at least 1"),
        (dict(threshold=0.5, keep_best=0), "--keep-best must be at least 1, got 0"),
        (dict(threshold=0.5, keep_best=1.5), "--keep-best must be a whole number, got 1.5"),
    ],
)
def test_filter_config_validation(options, message):
    with pytest.raises(CapfiltError, match=message):
        FilterOptions(**options)


def test_fast_decode_is_recorded_and_scores_every_pair(captioned, tiny_filter, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(captioned[0], root)
    ds = Dataset(str(root))
    exact_root = tmp_path / "exact"
    shutil.copytree(captioned[0], exact_root)
    exact = Dataset(str(exact_root))
    base = dict(threshold=0.5, model=str(tiny_filter), num_workers=0)
    filter_dataset(ds, FilterOptions(**base, fast_decode=True), progress=False)
    filter_dataset(exact, FilterOptions(**base), progress=False)
    assert ds.read_manifest()["runs"][-1]["options"]["fast_decode"] is True
    assert exact.read_manifest()["runs"][-1]["options"]["fast_decode"] is False
    fast_rows, exact_rows = (
        ds.read_stage("scores").to_pylist(),
        exact.read_stage("scores").to_pylist(),
    )
    assert [(r["key"], r["text_id"]) for r in fast_rows] == [
        (r["key"], r["text_id"]) for r in exact_rows
    ]
    assert [r["itm_score"] is None for r in fast_rows] == [
        r["itm_score"] is None for r in exact_rows
    ]


def test_ahead_tokenization_equals_the_tokenizer_call(tiny_filter):
    import torch

    from capfilt.models.blip import ItmScorer

    scorer = ItmScorer.load(str(tiny_filter), precision="fp32", device="cpu", max_text_tokens=12)
    texts = [
        "a red circle",
        "",
        "A Photo of a BLUE square on a white background, taken outdoors at noon",
        "naïve café – 東京 ü",
        "x " * 40,
    ]
    want = scorer.tokenizer(
        texts, padding="longest", truncation=True, max_length=12, return_tensors="pt"
    )
    input_ids, attention_mask = scorer.tokenize_cpu(texts)
    assert scorer._backend  # the fast path was taken
    assert torch.equal(input_ids, want.input_ids)
    assert torch.equal(attention_mask, want.attention_mask)
    assert input_ids.shape[1] == 12
    one = scorer.tokenize_cpu(["a red circle"])[0]
    assert torch.equal(one, scorer.tokenizer(["a red circle"], return_tensors="pt").input_ids)


def test_gpu_decode_scores_like_the_pil_path_or_asks_for_torchvision(
    tmp_path, captioned, tiny_filter
):
    """--gpu-decode through `capfilt filter` (the CPU device here) gives the PIL path's scores;
    without torchvision it is a one-line error."""
    import shutil

    source, _ = captioned
    scores = {}
    for gpu_decode in (True, False):
        root = tmp_path / f"ds-{gpu_decode}"
        shutil.copytree(source, root)
        args = ["filter", root, "--threshold", 0.5, "--model", tiny_filter, "--batch-size", 3]
        result = invoke(*args, "--workers", 2, *(["--gpu-decode"] if gpu_decode else []))
        if gpu_decode:
            try:
                import torchvision  # noqa: F401
            except ImportError:
                assert result.exit_code == 2 and "--gpu-decode needs torchvision" in result.output
                return
        assert result.exit_code == 0, result.output
        rows = Dataset(str(root)).read_stage("scores").to_pylist()
        scores[gpu_decode] = {(r["key"], r["text_id"]): r["itm_score"] for r in rows}
    expected, got = scores[False], scores[True]
    assert got.keys() == expected.keys()
    for pair, score in expected.items():
        assert (score is None) == (got[pair] is None), pair
        assert score is None or abs(score - got[pair]) < 1e-5, pair


# --- --keep-best: generate several captions, keep the best of each image ----------------------
def expected_curated(scores, threshold: float, keep_best: int | None = None) -> set:
    """(key, text_id) of the pairs the rule keeps, computed with pandas from a scores/ table."""
    frame = scores.to_pandas()
    frame = frame[frame["itm_score"].astype("float64") >= threshold]
    web = frame[frame["source"] == "web"]
    synthetic = frame[frame["source"] == "synthetic"]
    if keep_best is not None:
        ranked = synthetic.sort_values(
            ["key", "itm_score", "text_id"], ascending=[True, False, True]
        )
        synthetic = ranked.groupby("key").head(keep_best)
    return set(zip(web["key"], web["text_id"], strict=True)) | set(
        zip(synthetic["key"], synthetic["text_id"], strict=True)
    )


def pairs_of(table) -> set:
    return set(zip(table["key"].to_pylist(), table["text_id"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def reranked(tmp_path_factory, tiny_captioner, tiny_filter):
    """Four synthetic captions per image, then the best 2 of each image kept, as a user types
    it: `capfilt caption ds --num-captions 4`, `capfilt filter ds --threshold 0 --keep-best 2`."""
    root = tmp_path_factory.mktemp("reranked") / "ds"
    write_images_dataset(root, n_shards=2, per_shard=5, seed=7)
    result = invoke(
        "caption", root, "--model", tiny_captioner, "--num-captions", 4, "--max-length", 10
    )
    assert result.exit_code == 0, result.output
    result = invoke("filter", root, "--threshold", 0, "--keep-best", 2, "--model", tiny_filter)
    assert result.exit_code == 0, result.output
    return root, result.output


def test_keep_best_keeps_the_top_synthetic_captions_of_each_image(reranked):
    from capfilt.stages.status import dataset_status

    root, output = reranked
    ds = Dataset(str(root))
    scores, curated = ds.read_stage("scores"), ds.read_stage("curated")
    synthetic_per_image: dict = {}
    for key, source in zip(scores["key"].to_pylist(), scores["source"].to_pylist(), strict=True):
        synthetic_per_image[key] = synthetic_per_image.get(key, 0) + (source == "synthetic")
    assert set(synthetic_per_image.values()) == {4}  # several to choose from

    assert pairs_of(curated) == expected_curated(scores, 0.0, keep_best=2)
    kept = curated.to_pylist()
    for key in synthetic_per_image:
        assert sum(r["key"] == key and r["source"] == "synthetic" for r in kept) == 2
    # The web caption is judged by the threshold alone: every scored one is kept at 0.
    web = {(r["key"], r["text_id"]) for r in kept if r["source"] == "web"}
    assert web == {
        (r["key"], r["text_id"])
        for r in scores.to_pylist()
        if r["source"] == "web" and r["itm_score"] is not None
    }
    # The rule is curated/'s provenance; the run and `status` name it.
    rule = {"threshold": 0.0, "keep_best": 2}
    assert ds.folder("curated").record["options"] == rule
    assert ds.read_manifest()["runs"][-1]["options"]["keep_best"] == 2
    assert "threshold 0, best 2 synthetic per image" in output
    note = dataset_status(ds).folder("curated").note
    assert note.endswith("threshold 0, best 2 synthetic per image")

    # Ranking within one scores/ shard is ranking the whole image: every key is in one shard,
    # the images/ shard of the same number.
    shard_of: dict = {}
    for shard in ds.shards("scores"):
        keys = set(ds.read_shard("scores", shard, ["key"])["key"].to_pylist())
        assert keys <= set(ds.read_shard("images", shard, ["key"])["key"].to_pylist())
        for key in keys:
            assert shard_of.setdefault(key, shard) == shard

    # query's view and export-data read curated/ as it is.
    result = invoke("query", root, "select count(*) AS n from curated", "--format", "csv")
    assert result.exit_code == 0 and result.output.split() == ["n", str(curated.num_rows)]


def test_export_data_ships_the_kept_best(reranked, tmp_path):
    import pyarrow.parquet as pq

    from capfilt.stages.export_data import export_data

    root, _ = reranked
    ds = Dataset(str(root))
    export_data(ds, "parquet", str(tmp_path / "out"))
    assert pairs_of(pq.read_table(tmp_path / "out")) == pairs_of(ds.read_stage("curated"))


def test_another_keep_best_rederives_curated_without_a_model(
    reranked, tiny_filter, tmp_path, monkeypatch
):
    import shutil

    from capfilt.models.blip import ItmScorer

    root = tmp_path / "ds"
    shutil.copytree(reranked[0], root)
    ds = Dataset(str(root))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded to re-derive curated/")

    monkeypatch.setattr(ItmScorer, "load", no_model)
    scores = ds.read_stage("scores")
    synthetic = sorted(r["itm_score"] for r in scores.to_pylist() if r["source"] == "synthetic")
    threshold = synthetic[len(synthetic) // 3]  # some images keep several, some fewer
    mtimes = [ds.fs.modified(ds.shard_path("scores", s)) for s in ds.shards("scores")]
    generation = ds.current_generation("curated")

    # Changing --keep-best and the threshold: a new generation from scores/ alone.
    model = ("--model", tiny_filter)  # the scores' model; nothing loads it
    result = invoke("filter", root, "--threshold", threshold, "--keep-best", 1, *model)
    assert result.exit_code == 0, result.output
    assert "not loaded" in result.output
    assert ds.current_generation("curated") == generation + 1
    curated = ds.read_stage("curated")
    assert pairs_of(curated) == expected_curated(scores, threshold, keep_best=1)
    # Best first: no kept synthetic caption scores below one of its image dropped above T.
    kept = pairs_of(curated)
    for key in set(scores["key"].to_pylist()):
        mine = [
            r
            for r in scores.to_pylist()
            if r["key"] == key and r["source"] == "synthetic" and r["itm_score"] >= threshold
        ]
        chosen = [r["itm_score"] for r in mine if (key, r["text_id"]) in kept]
        assert len(chosen) == min(1, len(mine))
        assert all(c >= r["itm_score"] for c in chosen for r in mine)
    assert len(expected_curated(scores, threshold)) > len(kept)  # keep-best dropped some
    run = ds.read_manifest()["runs"][-1]
    assert run["rescored"] is False and run["keep_best"] == 1
    assert ds.folder("curated").record["options"] == {"threshold": threshold, "keep_best": 1}

    # No --keep-best: every pair at the threshold again, recorded as before the option existed.
    result = invoke("filter", root, "--threshold", threshold, *model)
    assert result.exit_code == 0, result.output
    assert ds.current_generation("curated") == generation + 2
    assert pairs_of(ds.read_stage("curated")) == expected_curated(scores, threshold)
    assert ds.folder("curated").record["options"] == {"threshold": threshold}
    result = invoke("filter", root, "--threshold", threshold, *model)
    assert "up to date" in result.output
    assert ds.current_generation("curated") == generation + 2
    assert [ds.fs.modified(ds.shard_path("scores", s)) for s in ds.shards("scores")] == mtimes


def test_default_curate_is_the_threshold_alone(scored):
    """Without --keep-best, curated/'s pairs and provenance are what they were before the
    option, so a curated/ derived by an older capfilt stays done; curated/ carries the other
    score columns of scores/ after CURATED_SCHEMA's."""
    import pyarrow.compute as pc

    from capfilt.core import parquet as io
    from capfilt.core.provenance import read
    from capfilt.stages.curate import curate

    root, _, _ = scored
    ds = Dataset(str(root))
    folder = ds.folder("curated")
    threshold = folder.record["options"]["threshold"]  # other tests change it
    assert folder.record["options"] == {"threshold": threshold}
    for shard in ds.shards("scores"):
        scores = ds.read_shard("scores", shard)
        at_threshold = pc.fill_null(pc.greater_equal(scores["itm_score"], threshold), False)
        before = scores.filter(at_threshold).select(io.CURATED_SCHEMA.names)
        base = io.CURATED_SCHEMA.names
        curated = curate(scores, threshold)
        assert curated.select(base).equals(before.cast(io.CURATED_SCHEMA))
        assert folder.read_shard(shard).select(base).equals(before.cast(io.CURATED_SCHEMA))
        extra = [name for name in scores.column_names if name not in (*base, "model")]
        assert "itc_score" in extra and curated.column_names == [*base, *extra]
        assert curated.select(extra).equals(scores.filter(at_threshold).select(extra))
        assert read(folder, shard).options == {"threshold": threshold}


def test_keep_best_below_one_fails_in_one_line_before_a_model_loads(scored):
    root, _, _ = scored
    for value in ("0", "-2"):
        result = invoke(
            "filter", root, "--threshold", 0.5, "--keep-best", value, "--model", "/no/such/model"
        )
        assert result.exit_code == 2
        assert f"--keep-best must be at least 1, got {value}" in result.output
        assert "does not exist" not in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_curate_ranks_synthetic_captions_per_image_and_breaks_ties_by_caption():
    from capfilt.core import parquet as io
    from capfilt.stages.curate import curate

    plan = {"a": (0.9, [0.3, 0.8, 0.8, 0.5, None]), "b": (0.1, [0.2, 0.95]), "c": (None, [])}
    rows = []
    for key, (web, synthetic) in plan.items():
        rows.append(dict(key=key, text_id=0, source="web", text="w", itm_score=web))
        rows += [
            dict(key=key, text_id=i + 1, source="synthetic", text=f"s{i}", itm_score=itm)
            for i, itm in enumerate(synthetic)
        ]
    scores = io.rows_to_table(rows, io.SCORES_SCHEMA)

    def kept(keep_best):
        return [(r["key"], r["text_id"]) for r in curate(scores, 0.4, keep_best).to_pylist()]

    everything = [("a", 0), ("a", 2), ("a", 3), ("a", 4), ("b", 2)]
    assert kept(None) == kept(3) == everything  # in scores/ order
    assert kept(1) == [("a", 0), ("a", 2), ("b", 2)]  # 0.8 twice: the earlier caption
    assert kept(2) == [("a", 0), ("a", 2), ("a", 3), ("b", 2)]
    assert curate(scores.slice(0, 0), 0.4, 1).num_rows == 0
