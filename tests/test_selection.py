"""`capfilt filter`'s selection rules: a top fraction by a score column, an SQL --where, and
the threshold, combined with AND, recorded, and re-applied from scores/ without a model.

The scores are set by hand: a dataset is scored once by the tiny filter (so that scores/ has
its real provenance), then its scores/ shards are rewritten with known values, as a rescoring
would, their provenance following the new file.
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
from conftest import write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import parquet as io
from capfilt.core import provenance
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.stages.curate import Selection, curate, describe_selection, top_count
from capfilt.stages.filter import FilterOptions, filter_dataset

# Scores before clip_score existed, and with it: the columns written here, not the filter's.
OLD_COLUMNS = [
    ("key", "string"),
    ("text_id", "int32"),
    ("source", "string"),
    ("text", "string"),
    ("itm_score", "float32"),
    ("itc_score", "float32"),
    ("model", "string"),
]
NEW_COLUMNS = [*OLD_COLUMNS, ("clip_score", "float32")]
# clip_score of the 15 pairs (5 images × web + 2 synthetic) of each shard; ties at 0.28.
CLIP = {
    0: [0.31, 0.30, 0.29, 0.28, 0.28, 0.28, 0.27, 0.26, 0.25, 0.24, 0.23, 0.22, 0.21, 0.20, 0.19],
    1: [0.18, 0.17, 0.16, 0.15, 0.14, 0.13, 0.12, 0.11, 0.10, 0.09, 0.08, 0.07, 0.06, None, None],
}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def schema_of(columns):
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in columns])


def f32(value: float) -> float:
    """`value` as a float32 score reads back."""
    import numpy as np

    return float(np.float32(value))


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory, tiny_filter):
    """Two images/ shards of 5 decodable images each, scored by the tiny filter."""
    root = tmp_path_factory.mktemp("selection") / "ds"
    write_images_dataset(root, n_shards=2, per_shard=6)
    options = FilterOptions(threshold=0.0, model=str(tiny_filter), num_workers=0)
    filter_dataset(str(root), options, progress=False)
    return root


def rewrite_scores(ds: Dataset, shard: int, table) -> None:
    """Replace a scores/ shard as a rescoring would: its provenance follows the new file."""
    folder = ds.folder("scores")
    record = provenance.read(folder, shard)

    def keep_record(fingerprint: str) -> None:
        provenance.write(folder, shard, dataclasses.replace(record, file=fingerprint))

    io.write_table_atomic(ds.fs, folder.shard_path(shard), table, before_rename=keep_record)


def known_scores(ds: Dataset, shard: int, clip: list | None, columns=NEW_COLUMNS):
    """A scores/ table of the shard's images with set scores: web and two synthetic pairs per
    image, ITM spread over [0, 1], ITC half of it, clip_score from `clip`."""
    keys = sorted(set(ds.read_shard("scores", shard, ["key"])["key"].to_pylist()))
    assert len(keys) == 5
    rows = []
    for i, key in enumerate(keys):
        for text_id in range(3):
            j = 3 * i + text_id
            itm = round(((7 * j + 3 * shard) % 15) / 14, 3)
            rows.append(
                dict(
                    key=key,
                    text_id=text_id,
                    source="web" if text_id == 0 else "synthetic",
                    text=f"caption {j}",
                    itm_score=itm,
                    itc_score=itm / 2,
                    model="tiny-filter",
                    clip_score=None if clip is None else clip[j],
                )
            )
    return io.rows_to_table(rows, schema_of(columns))


@pytest.fixture
def known(scored_once, tmp_path):
    """`scored_once` copied, its scores/ rewritten with CLIP scores (`CLIP`)."""
    root = tmp_path / "ds"
    shutil.copytree(scored_once, root)
    ds = Dataset(str(root))
    for shard in (0, 1):
        rewrite_scores(ds, shard, known_scores(ds, shard, CLIP[shard]))
    return ds


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a scorer fails the test."""
    from capfilt.models.blip import ItmScorer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded to apply a selection rule")

    monkeypatch.setattr(ItmScorer, "load", refuse)


def kept_pairs(ds: Dataset) -> set[tuple[str, int]]:
    return {(r["key"], r["text_id"]) for r in ds.read_stage("curated").to_pylist()}


def all_scores(ds: Dataset):
    import pyarrow as pa

    return pa.concat_tables(
        [ds.read_shard("scores", s) for s in ds.shards("scores")], promote_options="default"
    )


# --- the top fraction --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fraction", "kept", "cutoff"),
    [
        (0.1, 3, 0.29),  # ⌈2.8⌉ = 3 of the 28 pairs with a clip_score
        (0.15, 6, 0.28),  # ⌈4.2⌉ = 5: the 5th is 0.28, so are the 6th: ties are kept
        (0.25, 7, 0.27),  # exactly 7
        (1.0, 28, 0.06),  # every pair that has a clip_score, none of those without
    ],
)
def test_top_fraction_keeps_the_top_of_the_whole_dataset_with_ties(
    known, tiny_filter, no_model, fraction, kept, cutoff
):
    result = invoke(
        "filter", known.root, "--top-fraction", fraction, "--by", "clip_score",
        "--model", tiny_filter,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "not loaded" in result.output
    curated = known.read_stage("curated").to_pylist()
    assert len(curated) == kept
    assert all(r["clip_score"] >= f32(cutoff) for r in curated)
    # The pairs at the top of the whole dataset, across both shards (all of them in shard 0).
    expected = {
        (r["key"], r["text_id"])
        for r in all_scores(known).to_pylist()
        if r["clip_score"] is not None and r["clip_score"] >= f32(cutoff)
    }
    assert kept_pairs(known) == expected
    rule = {"top_fraction": fraction, "by": "clip_score", "cutoff": f32(cutoff)}
    assert known.folder("curated").record["options"] == rule
    assert known.read_manifest()["runs"][-1]["selection"] == rule
    for shard in known.shards("curated"):
        assert provenance.read(known.folder("curated"), shard).options == rule
    # curated/ carries every score column, so the set can be queried by clip_score.
    assert {"itc_score", "clip_score"} <= set(curated[0])


def test_top_count_is_exact_decimal_arithmetic():
    assert [top_count(f, 10) for f in (0.1, 0.3, 0.7, 1.0)] == [1, 3, 7, 10]
    assert top_count(0.001, 10) == 1 and top_count(0.5, 0) == 0
    assert top_count(0.3, 28) == 9 and top_count(0.15, 28) == 5


def test_curate_alone_takes_the_top_of_its_table_and_keeps_ties():
    rows = [
        dict(key=k, text_id=0, source="web", text="t", itm_score=0.5, clip_score=c)
        for k, c in zip("abcdef", [0.9, 0.5, 0.5, 0.5, 0.1, None], strict=True)
    ]
    table = io.rows_to_table(rows, schema_of(NEW_COLUMNS))
    kept = curate(table, Selection(top_fraction=0.4, by="clip_score"))
    assert kept["key"].to_pylist() == ["a", "b", "c", "d"]  # ⌈0.4·5⌉ = 2: 0.5, tied thrice
    kept = curate(table, Selection(top_fraction=0.2, by="clip_score", threshold=0.6))
    assert kept.num_rows == 0  # AND: the top pair is below the threshold


def test_a_rescored_shard_that_moves_the_cutoff_makes_every_curated_shard_stale(
    known, tiny_filter, no_model
):
    from capfilt.stages.status import dataset_status

    args = ("--top-fraction", 0.1, "--by", "clip_score", "--model", tiny_filter)
    assert invoke("filter", known.root, *args).exit_code == 0
    assert len(kept_pairs(known)) == 3
    assert dataset_status(known).folder("curated").up_to_date
    generation = known.current_generation("curated")

    # Shard 1 rescored: its best pair now tops the dataset, and the cut-off of the top 3
    # moves from 0.29 to 0.30, so curated/ shard 0 (whose scores did not change) is stale too.
    moved = list(CLIP[1])
    moved[0] = 0.95
    rewrite_scores(known, 1, known_scores(known, 1, moved))
    curated = dataset_status(known).folder("curated")
    assert curated.stale == [0, 1]
    why = next(reason for reason, shards in curated.reasons.items() if shards == [0])
    assert "cut-off" in why and "0.29" in why and "0.3" in why

    result = invoke("filter", known.root, *args)
    assert result.exit_code == 0, result.output
    assert known.current_generation("curated") == generation + 1
    kept = known.read_stage("curated").to_pylist()
    assert sorted(r["clip_score"] for r in kept) == [f32(0.30), f32(0.31), f32(0.95)]
    assert known.folder("curated").record["options"]["cutoff"] == f32(0.30)
    assert dataset_status(known).folder("curated").up_to_date


def test_under_accelerate_every_process_curates_by_the_same_cutoff(known, tiny_filter, tmp_path):
    """Two processes, one curated/ shard each: the cut-off the main process found is the
    one both apply, and curated/ is what one process makes."""
    import os
    import subprocess

    from conftest import accelerate_launch_on_cpu

    alone = Dataset(str(tmp_path / "alone"))
    shutil.copytree(known.root, alone.root)
    rule = ("--top-fraction", "0.25", "--by", "clip_score", "--where", "text_id >= 0")
    launch = [*accelerate_launch_on_cpu(2), "-m", "capfilt", "filter", known.root, *rule]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*launch, "--model", str(tiny_filter)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not loaded" in done.stdout
    assert invoke("filter", alone.root, *rule, "--model", tiny_filter).exit_code == 0

    assert known.read_manifest()["runs"][-1]["processes"] == 2
    assert kept_pairs(known) == kept_pairs(alone) and len(kept_pairs(known)) == 7
    folder = known.folder("curated")
    cutoffs = {provenance.read(folder, s).options["cutoff"] for s in known.shards("curated")}
    assert cutoffs == {f32(0.27)}
    assert {provenance.read(folder, s).run for s in (0, 1)} == {folder.record["run"]}


def test_a_cutoff_is_the_same_whatever_the_shard_order(known):
    """The cut-off is exact over the values: it does not depend on how they are read."""
    import numpy as np

    from capfilt.stages.curate import cutoff_of, score_cutoff

    values = np.array([v for shard in (0, 1) for v in CLIP[shard] if v is not None], np.float32)
    found = score_cutoff(known.folder("scores"), "clip_score", 0.3)
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(values).astype(np.float64)
        assert cutoff_of(shuffled, 0.3) == found
    assert found == f32(sorted(values, reverse=True)[top_count(0.3, len(values)) - 1])


def test_keep_best_reranks_by_clip_as_laion_coco_did(known, tiny_filter, no_model):
    from capfilt.stages.report import build_report

    result = invoke(
        "filter", known.root, "--threshold", 0, "--keep-best", 1, "--best-by", "clip_score",
        "--model", tiny_filter,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rule = {"threshold": 0.0, "keep_best": 1, "best_by": "clip_score"}
    assert known.folder("curated").record["options"] == rule
    synthetic: dict = {}
    for r in all_scores(known).to_pylist():
        if r["source"] == "synthetic":
            synthetic.setdefault(r["key"], []).append(r)
    expected = set()
    for key, rows in synthetic.items():  # the highest CLIP; none last; a tie: the earlier
        ranked = sorted(rows, key=lambda r: (r["clip_score"] is None, -(r["clip_score"] or 0)))
        expected.add((key, ranked[0]["text_id"]))
    kept = {p for p in kept_pairs(known) if p[1] > 0}
    assert kept == expected
    # Not the ITM best: on these scores the two rankings differ for some image.
    by_itm = {
        (k, max(rows, key=lambda r: r["itm_score"])["text_id"]) for k, rows in synthetic.items()
    }
    assert by_itm != expected
    summary = build_report(known).summary
    assert summary["scores"]["kept"] == summary["curated"]["pairs"]
    assert summary["selection"] == "threshold 0.00, best 1 synthetic per image by clip_score"

    # Ranked by CLIP among the pairs at the threshold: the report ranks as curate does, at
    # its threshold and at each threshold of its sweep.
    result = invoke(
        "filter", known.root, "--threshold", 0.5, "--keep-best", 1, "--best-by", "clip_score",
        "--model", tiny_filter,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = build_report(known).summary
    kept = len(kept_pairs(known))
    assert summary["scores"]["kept"] == summary["curated"]["pairs"] == kept
    at_half = next(e for e in summary["sweep"] if e["threshold"] == 0.5)
    assert at_half["kept"] == kept
    assert build_report(known, threshold=0.3).summary["scores"]["kept"] > kept


# --- where -------------------------------------------------------------------------------------
def test_where_keeps_exactly_the_rows_duckdbs_where_gives(known, tiny_filter, no_model):
    import duckdb

    condition = "itm_score >= 0.5 AND clip_score > 0.2 AND source = 'synthetic'"
    result = invoke("filter", known.root, "--where", condition, "--model", tiny_filter)
    assert result.exit_code == 0, result.output
    scores = all_scores(known)
    con = duckdb.connect()
    con.register("scores", scores)
    expected = set(con.execute(f"SELECT key, text_id FROM scores WHERE {condition}").fetchall())
    assert 0 < len(expected) < scores.num_rows
    assert kept_pairs(known) == expected
    assert known.folder("curated").record["options"] == {"where": condition}

    # With a threshold and a top fraction too: the three AND, then --keep-best.
    result = invoke(
        "filter", known.root, "--where", "source = 'synthetic'", "--threshold", 0.3,
        "--top-fraction", 0.5, "--by", "clip_score", "--keep-best", 1, "--model", tiny_filter,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cutoff = known.folder("curated").record["options"]["cutoff"]
    passing = [
        r
        for r in scores.to_pylist()
        if r["source"] == "synthetic"
        and r["itm_score"] >= 0.3
        and r["clip_score"] is not None
        and r["clip_score"] >= cutoff
    ]
    best: dict = {}
    for r in sorted(passing, key=lambda r: (-r["itm_score"], r["text_id"])):
        best.setdefault(r["key"], (r["key"], r["text_id"]))
    assert kept_pairs(known) == set(best.values())
    words = "threshold 0.3, top 50% by clip_score (cut-off"
    assert words in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("condition", "problem"),
    [
        ("1; DROP TABLE x", "holds ';'"),
        ("read_csv('/etc/passwd') IS NOT NULL", "calls read_csv()"),
        ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "holds SELECT"),
        ("no_such_score > 0.5", "names the column no_such_score"),
        ("itm_score", "is a FLOAT value, not a condition"),
        ("itm_score >=", "is not a condition DuckDB can run"),
    ],
)
def test_a_bad_where_fails_in_one_line_before_a_model_loads(known, condition, problem):
    result = invoke("filter", known.root, "--where", condition, "--model", "/no/such/model")
    assert result.exit_code == 2, result.output
    assert problem in result.output and "--where" in result.output
    assert "Traceback" not in result.output and "/no/such/model" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_where_reads_no_file_even_past_the_word_checks(tmp_path):
    """The sandbox under the checks: a file read refused by DuckDB itself, in one line."""
    import pyarrow as pa

    from capfilt.core.sql import where_rows

    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    table = pa.table({"itm_score": pa.array([0.5], pa.float32())})
    with pytest.raises(CapfiltError, match="--where") as raised:
        where_rows(table, f"itm_score < (SELECT count(*) FROM '{secret}')")
    assert "\n" not in str(raised.value)


# --- no rule, bad --by, a rule change without a model ------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "capfilt filter needs a rule: --threshold T, --top-fraction F --by COLUMN or"),
        (("--by", "clip_score"), "--by clip_score goes with --top-fraction F"),
        (("--threshold", 0.5, "--best-by", "clip_score"), "--best-by clip_score goes with"),
        (("--threshold", 0.5, "--keep-best", 1, "--best-by", "x"), "--best-by x: not a score"),
        (("--top-fraction", 0), "--top-fraction must be in (0, 1], got 0"),
        (("--top-fraction", 0.3, "--by", "nosuch"), "--by nosuch: not a score column"),
        (("--top-fraction", 0.3, "--by", "siglip_score"), "pass --siglip-model MODEL"),
    ],
)
def test_rule_errors_are_one_line_before_a_model_loads(known, args, message):
    result = invoke("filter", known.root, *args, "--model", "/no/such/model")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1


def test_a_new_rule_rederives_curated_and_status_names_it(known, tiny_filter, no_model):
    from capfilt.stages.status import dataset_status

    mtimes = [known.fs.modified(known.shard_path("scores", s)) for s in (0, 1)]
    result = invoke("filter", known.root, "--top-fraction", 0.1, "--by", "clip_score",
                    "--model", tiny_filter)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mean CLIP" in result.output  # the run's table: every score column
    note = dataset_status(known).folder("curated").note
    assert "top 10% by clip_score (cut-off 0.29)" in note
    run = known.read_manifest()["runs"][-1]
    assert run["rescored"] is False and run["options"]["top_fraction"] == 0.1
    assert run["options"]["threshold"] is None

    # Back to the threshold alone: recorded as before the other rules existed.
    assert invoke("filter", known.root, "--threshold", 0.5, "--model", tiny_filter).exit_code == 0
    assert known.folder("curated").record["options"] == {"threshold": 0.5}
    assert dataset_status(known).folder("curated").note.endswith("threshold 0.5")
    assert [known.fs.modified(known.shard_path("scores", s)) for s in (0, 1)] == mtimes


def test_describe_selection_reads_every_rule():
    assert describe_selection({"threshold": 0.5}) == "threshold 0.5"
    assert describe_selection({"threshold": 0.5, "keep_best": 2}) == (
        "threshold 0.5, best 2 synthetic per image"
    )
    rule = {"top_fraction": 0.3, "by": "clip_score", "cutoff": 0.28125, "where": "source = 'web'"}
    assert describe_selection(rule) == (
        "top 30% by clip_score (cut-off 0.2812), where source = 'web'"
    )
    assert Selection.from_record(rule).record() == rule
    assert Selection.from_record({"by": "x"}) is None  # no condition: no rule


# --- old and new shards ------------------------------------------------------------------------
def test_old_and_new_shards_mix_in_query_and_rules(known, tiny_filter, no_model):
    """Shard 0 scored before clip_score existed, shard 1 after: query reads clip_score over
    both (null in the old one), and a rule on it keeps none of the old shard's pairs."""
    rewrite_scores(known, 0, known_scores(known, 0, None, OLD_COLUMNS))
    import pyarrow.parquet as pq

    assert "clip_score" not in pq.read_schema(known.shard_path("scores", 0)).names
    result = invoke(
        "query", known.root,
        "SELECT count(*) AS pairs, count(clip_score) AS with_clip, max(clip_score) AS top "
        "FROM scores", "--format", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs, with_clip, top = result.output.strip().splitlines()[1].split(",")
    assert (int(pairs), int(with_clip), float(top)) == (30, 13, f32(0.18))

    result = invoke("filter", known.root, "--where", "clip_score > 0.15", "--model", tiny_filter)
    assert result.exit_code == 0, result.output
    assert {r["clip_score"] for r in known.read_stage("curated").to_pylist()} == {
        f32(0.18),
        f32(0.17),
        f32(0.16),
    }
    result = invoke("filter", known.root, "--top-fraction", 0.2, "--by", "clip_score",
                    "--model", tiny_filter)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(known.read_stage("curated")) == math.ceil(0.2 * 13)
    assert set(known.shards("curated")) == {0, 1}  # shard 0's curated/ is there, empty
    assert known.read_shard("curated", 0).num_rows == 0


# --- the report ----------------------------------------------------------------------------------
def test_report_shows_every_score_column_and_the_rule(known, tiny_filter, no_model):
    from pathlib import Path

    from capfilt.stages.report import build_report

    args = ("--top-fraction", 0.1, "--by", "clip_score", "--model", tiny_filter)
    assert invoke("filter", known.root, *args).exit_code == 0
    report = build_report(known)
    s = report.summary
    assert s["rule"]["by"] == "clip_score" and s["threshold"] is None
    assert s["selection"].startswith("top 10% by clip_score")
    clip = s["score_columns"]["clip_score"]
    assert clip["label"] == "CLIP"
    assert sum(sum(v["histogram"]) for v in clip["by_source"].values()) == 28
    web_clip = [v for v in CLIP[0][::3] + CLIP[1][::3] if v is not None]
    assert clip["by_source"]["web"]["mean"] == pytest.approx(sum(web_clip) / len(web_clip), 1e-3)
    # The report judges pairs by curated/'s rule: it keeps what curated/ keeps.
    assert s["scores"]["kept"] == s["curated"]["pairs"] == 3
    page = Path(report.html_path).read_text()
    assert page.count('data-column="clip_score"') == 2  # web and synthetic
    assert page.count('data-column="itc_score"') == 2
    # The cut-off drawn on the two CLIP histograms; no ITM threshold in this rule.
    assert page.count('<line class="threshold"') == 2
    assert page.count('<text class="threshold"') == page.count(">cut-off 0.29</text>") == 2
    assert "top 10 % of the scored pairs" in page

    out = invoke("report", known.root)
    assert out.exit_code == 0, out.output
    assert "mean CLIP" in out.output and "top 10% by clip_score" in " ".join(out.output.split())


def test_report_has_no_clip_histogram_without_clip_scores(known):
    from capfilt.stages.report import build_report

    for shard in (0, 1):
        rewrite_scores(known, shard, known_scores(known, shard, None, OLD_COLUMNS))
    from capfilt.stages.curate import CurateStage
    from capfilt.stages.runner import run_stage

    # A rule on clip_score, which no shard has: null everywhere, in curated/ as in the report.
    rule = Selection(where="clip_score > 0.1 OR itm_score >= 0.5")
    run_stage(CurateStage(rule), known, progress=False, record=False)
    summary = build_report(known).summary
    assert "clip_score" not in summary["score_columns"]
    assert set(summary["score_columns"]) == {"itm_score", "itc_score"}
    expected = sum(r["itm_score"] >= 0.5 for r in all_scores(known).to_pylist())
    assert summary["scores"]["kept"] == summary["curated"]["pairs"] == expected > 0
