"""capfilt report: figures against a dataset whose scores are set by hand, the HTML, the CLI,
and the SQL examples of the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _report_fixtures import BAD_KEY, DUPLICATE, HOSTILE, write_scored_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.report.figures import SOURCES, SWEEP_THRESHOLDS, error_kind, thumbnail_uri
from capfilt.report.html import histogram_svg
from capfilt.stages.query import run_query
from capfilt.stages.report import build_report


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return write_scored_dataset(tmp_path_factory.mktemp("report") / "ds")


@pytest.fixture(scope="module")
def report(scored):
    return build_report(Dataset(scored.root))


def _kept(itm: float, threshold: float) -> bool:
    # scores/ stores float32, so compare as DuckDB does: the float32 value widened to double
    return float(np.float32(itm)) >= threshold


def test_summary_counts_every_stage(report, scored):
    s = report.summary
    assert s["threshold"] == 0.5 and s["threshold_origin"] == "curated/"
    assert {k: v["rows"] for k, v in s["stages"].items()} == {
        "images": 20,
        "captions": 32,
        "scores": 45,
        "curated": len(scored.kept(0.5)),
    }
    assert s["fetch"]["success"] == 16 and s["fetch"]["failed"] == 4
    assert s["fetch"]["status"] == {"success": 16, "failed_to_download": 4}
    assert s["fetch"]["error_kinds"] == {"HTTP 404": 3, "connection refused": 1}
    assert s["captions"]["written"] == 30 and s["captions"]["errors"] == 2
    assert s["captions"]["images_captioned"] == 15
    assert s["captions"]["error_messages"] == {"cannot identify image file": 2}


def test_scores_per_source_match_the_hand_set_scores(report, scored):
    by_source = report.summary["scores"]["by_source"]
    assert list(by_source) == ["web", "synthetic"]
    web_itm = [itm for _, itm in scored.web.values()]
    syn_itm = list(scored.synthetic.values())
    for source, values in (("web", web_itm), ("synthetic", syn_itm)):
        figures = by_source[source]
        kept = sum(_kept(v, 0.5) for v in values)
        assert figures["pairs"] == len(values)
        assert figures["kept"] == kept
        assert figures["kept_rate"] == pytest.approx(kept / len(values), abs=1e-4)
        assert figures["mean_itm"] == pytest.approx(np.mean(values), abs=1e-3)
    assert report.summary["curated"]["pairs"] == report.summary["scores"]["kept"]


def test_sweep_and_histograms_follow_the_scores(report, scored):
    sweep = report.summary["sweep"]
    assert [e["threshold"] for e in sweep] == list(SWEEP_THRESHOLDS)
    for entry in sweep:
        t = entry["threshold"]
        web = sum(_kept(v, t) for _, v in scored.web.values())
        syn = sum(_kept(v, t) for v in scored.synthetic.values())
        assert entry["by_source"]["web"]["kept"] == web
        assert entry["by_source"]["synthetic"]["kept"] == syn
        assert entry["kept"] == web + syn
    histograms = report.summary["histograms"]
    assert sum(histograms["web"]) == len(scored.web)
    assert sum(histograms["synthetic"]) == len(scored.synthetic)
    assert histograms["web"][18] == 2  # the two web captions at ITM 0.92


def test_precision_and_recall_of_catching_wrong_web_captions(report, scored):
    truth = report.summary["truth"]
    expected = scored.expected_truth(0.5)
    assert (truth["wrong"], truth["dropped"], truth["caught"]) == (6, 9, 5)
    assert {k: truth[k] for k in expected} == expected
    assert truth["precision"] == pytest.approx(5 / 9, abs=1e-4)
    assert truth["recall"] == pytest.approx(5 / 6, abs=1e-4)
    assert truth["by_kind"]["shape"] == {"wrong": 2, "caught": 1, "recall": 0.5}
    # Ranking AUC, by counting every (right, wrong) pair of web captions; ties count half.
    right = [itm for is_wrong, itm in scored.web.values() if not is_wrong]
    wrong = [itm for is_wrong, itm in scored.web.values() if is_wrong]
    pairs = [(r > w) + 0.5 * (r == w) for r in right for w in wrong]
    assert truth["auc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
    at_07 = next(e for e in report.summary["sweep"] if e["threshold"] == 0.7)
    e07 = scored.expected_truth(0.7)
    assert at_07["precision"] == pytest.approx(e07["caught"] / e07["dropped"], abs=1e-4)
    assert at_07["recall"] == pytest.approx(e07["caught"] / e07["wrong"], abs=1e-4)


def test_summary_json_holds_the_same_figures(report):
    written = json.loads(Path(report.summary_path).read_text())
    expected = json.loads(json.dumps(report.summary, default=str))
    # other tests rewrite the report at the same threshold; only the time may differ
    written.pop("generated"), expected.pop("generated")
    assert written == expected and written["truth"]["caught"] == 5


def test_html_is_self_contained_and_escapes_hostile_text(report):
    page = Path(report.html_path).read_text()
    assert "<script" not in page.lower()
    assert HOSTILE not in page
    assert html_escaped(HOSTILE) in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # every src/href is inline data; the only URL is the SVG namespace
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:image/jpeg;base64,"), attr[:60]
    # ITM per source with the threshold; every other score column (ITC here) without one.
    assert page.count('<svg class="histogram"') == 4
    assert page.count('data-column="itm_score"') == page.count('data-column="itc_score"') == 2
    assert page.count('class="threshold"') == 4  # a line and its label per ITM histogram
    assert page.count("<img ") == len(re.findall(r'src="data:image/jpeg;base64,', page)) > 10
    assert "55.6 %" in page and "83.3 %" in page  # precision and recall
    assert '<tr class="current"><td>0.5</td>' in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_examples_show_borderline_pairs_on_both_sides(scored, tmp_path):
    import capfilt.report.figures as report_module
    from capfilt.core.sql import connect

    con = connect(Dataset(scored.root))
    columns = {r[0] for r in con.execute("DESCRIBE images").fetchall()}
    examples = report_module.pick_examples(con, 0.5, 2, columns)
    web = examples["web"]
    assert [round(r["itm_score"], 2) for r in web["kept_borderline"]] == [0.51, 0.51]
    assert [round(r["itm_score"], 2) for r in web["dropped_borderline"]] == [0.49, 0.49]
    assert [round(r["itm_score"], 2) for r in web["kept_top"]] == [0.92, 0.92]
    assert [round(r["itm_score"], 2) for r in web["dropped_bottom"]] == [0.05, 0.05]
    wrong = [r for r in web["dropped_bottom"] if r["caption_is_wrong"]]
    assert wrong and all(r["true_caption"] for r in wrong)
    pairs = [(r["key"], r["text_id"]) for g in examples.values() for rs in g.values() for r in rs]
    assert len(pairs) == len(set(pairs))
    # few pairs on a side: the groups split them instead of showing one pair twice
    few = report_module.pick_examples(con, 0.9, 6, columns)["web"]
    assert len(few["kept_top"]) + len(few["kept_borderline"]) == 2


def test_report_of_a_dataset_with_only_images(images_dataset):
    result = build_report(Dataset(str(images_dataset)))
    s = result.summary
    assert s["scores"] is None and s["captions"] is None and s["truth"] is None
    assert s["threshold_origin"] == "default" and s["fetch"]["success"] == 10
    page = Path(result.html_path).read_text()
    assert "run capfilt caption" in page and 'id="samples"' in page
    assert page.count('src="data:image/jpeg;base64,') == 10


def test_report_without_truth_columns_leaves_out_precision(tmp_path):
    scored = write_scored_dataset(tmp_path / "ds")
    ds = Dataset(scored.root)
    for shard in ds.shards("images"):
        table = ds.read_shard("images", shard)
        ds.write_shard(
            "images", shard, table.drop_columns(["true_caption", "caption_is_wrong", "wrong_kind"])
        )
    result = build_report(ds)
    assert result.summary["truth"] is None
    assert "precision" not in result.summary["sweep"][0]
    page = Path(result.html_path).read_text()
    assert 'id="truth"' not in page and "wrong caption" not in page
    assert result.summary["scores"]["by_source"]["web"]["kept"] == 6


def test_threshold_option_overrides_the_filter_run(scored):
    result = build_report(Dataset(scored.root), threshold=0.7)
    assert result.summary["threshold_origin"] == "option"
    expected = scored.expected_truth(0.7)
    assert result.summary["truth"]["caught"] == expected["caught"]
    assert "the figures below are at 0.70" in Path(result.html_path).read_text()
    build_report(Dataset(scored.root))  # leave the module's report at the filter threshold
    with pytest.raises(CapfiltError, match="between 0 and 1"):
        build_report(Dataset(scored.root), threshold=1.5)


def test_report_names_and_applies_the_keep_best_rule(tmp_path):
    """curated/ made with --keep-best 1: the report names the rule and counts what it keeps."""
    import capfilt.report.figures as report_module
    from capfilt.core.sql import connect
    from capfilt.stages.curate import CurateStage
    from capfilt.stages.filter import FilterOptions
    from capfilt.stages.runner import run_stage

    scored = write_scored_dataset(tmp_path / "ds")
    ds = Dataset(scored.root)
    run_stage(CurateStage(FilterOptions(threshold=0.5, keep_best=1)), ds, progress=False)
    curated = {(r["key"], r["text_id"]): r for r in ds.read_stage("curated").to_pylist()}
    assert len(curated) < len(scored.kept(0.5))  # the threshold alone keeps more

    result = build_report(ds)
    s = result.summary
    rule = "threshold 0.50, best 1 synthetic per image"
    assert s["keep_best"] == 1 and s["selection"] == rule
    kept = {source: sum(r["source"] == source for r in curated.values()) for source in SOURCES}
    assert {k: v["kept"] for k, v in s["scores"]["by_source"].items()} == kept
    assert s["scores"]["kept"] == s["curated"]["pairs"] == len(curated)
    keys = {key for key, _ in scored.synthetic}
    for entry in s["sweep"]:  # each threshold, best 1: an image keeps one if any passes
        t = entry["threshold"]
        best = sum(any(_kept(scored.synthetic[(k, c)], t) for c in range(2)) for k in keys)
        assert entry["by_source"]["synthetic"]["kept"] == best
    page = Path(result.html_path).read_text()
    assert rule in page and "the best of its image's synthetic captions" in page

    con = connect(ds)
    columns = {r[0] for r in con.execute("DESCRIBE images").fetchall()}
    examples = report_module.pick_examples(con, 0.5, 6, columns, keep_best=1)["synthetic"]
    rows = [r for group in examples.values() for r in group]
    assert all(r["kept"] == ((r["key"], r["text_id"]) in curated) for r in rows)
    assert any(not r["kept"] and r["itm_score"] >= 0.5 for r in rows)  # not the best one

    out = CliRunner().invoke(app, ["report", scored.root])
    assert out.exit_code == 0, out.output
    assert f"Scores at {rule} (curated/)" in " ".join(out.output.split())


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("HTTP Error 404: Not Found", "HTTP 404"),
        ("<urlopen error [Errno 111] Connection refused>", "connection refused"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno -2] Name or service not known>", "DNS lookup failed"),
        ("image decoding error", "image decoding"),
        (None, "(no message)"),
        ("weird failure at http://x.example/123456.jpg", "weird failure at <url>"),
    ],
)
def test_error_kind_groups_messages(message, kind):
    assert error_kind(message) == kind


def test_thumbnails_shrink_images_and_survive_broken_bytes():
    from io import BytesIO

    from conftest import draw_scene, jpeg_bytes
    from PIL import Image

    uri = thumbnail_uri(jpeg_bytes(draw_scene("red", "circle", size=400)))
    import base64

    img = Image.open(BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert img.format == "JPEG" and max(img.size) == 128
    assert thumbnail_uri(b"<html>not an image</html>") is None
    assert thumbnail_uri(None) is None


def test_histogram_svg_draws_threshold_and_one_bar_per_bin():
    svg = histogram_svg("web <b>", [0, 3, 1, 0], 0.5)
    assert svg.count('<rect class="bin') == 4
    assert svg.count('class="bin kept"') == 2 and "web &lt;b&gt;" in svg
    assert 'class="threshold"' in svg


def test_cli_report_prints_tables_and_opens_the_browser(scored, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url))
    result = CliRunner().invoke(app, ["report", scored.root, "--open"])
    assert result.exit_code == 0, result.output
    assert "Fetch errors by kind" in result.output and "55.6 %" in result.output
    generation = Dataset(scored.root).current_generation("reports")
    report = Path(scored.root, "reports", f"gen-{generation:06d}", "report.html")
    assert opened == [report.resolve().as_uri()]
    assert str(report) in result.output.replace("\n", "")
    missing = CliRunner().invoke(app, ["report", scored.root + "-nope"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


# --- the README's SQL examples ------------------------------------------------------------
README = Path(__file__).resolve().parent.parent / "README.md"


def sql_examples() -> dict[str, str]:
    """The ```sql blocks of the README's curator section, by the heading above them."""
    text = README.read_text().split("## SQL a curator runs", 1)[1]
    text = re.split(r"^## ", text, flags=re.M)[0]
    found = {}
    for heading, body in re.findall(r"^### (.+?)\n.*?```sql\n(.*?)```", text, re.S | re.M):
        found[heading.strip()] = body
    return found


def test_sql_docs_have_the_curator_queries():
    assert set(sql_examples()) >= {
        "Kept rate per source",
        "The 20 lowest-scoring web captions",
        "Synthetic captions that pass where the web caption fails",
        "Duplicate images by sha256",
    }


def test_sql_docs_queries_run_and_answer_right(scored):
    ds = Dataset(scored.root)
    answers = {}
    for heading, sql in sql_examples().items():
        if "dedup" in sql:  # run on a deduplicated dataset: tests/test_dedup.py
            continue
        columns, rows = run_query(ds, sql)
        answers[heading] = [dict(zip(columns, row, strict=True)) for row in rows]
        assert rows, heading

    rates = {r["source"]: r for r in answers["Kept rate per source"]}
    assert (rates["web"]["pairs"], rates["web"]["kept"]) == (15, 6)
    assert rates["web"]["kept_rate"] == pytest.approx(0.4)
    assert rates["synthetic"]["kept"] == 21

    lowest = answers["The 20 lowest-scoring web captions"]
    assert len(lowest) == 15  # fewer than 20 web captions are scored
    assert [r["itm_score"] for r in lowest] == sorted(r["itm_score"] for r in lowest)
    assert lowest[0]["web_caption"] == HOSTILE and lowest[0]["url"].startswith("http://")

    rescued = answers["Synthetic captions that pass where the web caption fails"]
    web_dropped = {k for k, (_, itm) in scored.web.items() if not _kept(itm, 0.5)}
    assert {r["key"] for r in rescued} <= web_dropped
    assert {r["key"] for r in rescued} == {
        k for (k, _), itm in scored.synthetic.items() if k in web_dropped and _kept(itm, 0.5)
    }
    assert all(r["synthetic_itm"] >= 0.5 > r["web_itm"] for r in rescued)

    # toy scenes of the same colour and shape are the same bytes, and DUPLICATE copies one
    images = Dataset(scored.root).read_stage("images", ["key", "sha256", "status"]).to_pylist()
    groups: dict[str, list[str]] = {}
    for row in images:
        if row["status"] == "success":
            groups.setdefault(row["sha256"], []).append(row["key"])
    expected = sorted(sorted(keys) for keys in groups.values() if len(keys) > 1)
    duplicates = answers["Duplicate images by sha256"]
    assert sorted(r["keys"] for r in duplicates) == expected
    assert any(set(DUPLICATE) <= set(r["keys"]) for r in duplicates)
    errors = {r["error_message"]: r["rows"] for r in answers["Fetch errors by message"]}
    assert errors["HTTP Error 404"] == 3
    assert BAD_KEY not in {r["key"] for r in lowest}
