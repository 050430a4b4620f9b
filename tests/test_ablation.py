"""`capfilt ablate`: pipelines/ablation.toml end to end on a very small toy web, and the
paper-layout tables built from its evaluations.

No direction is asserted (two training steps learn nothing); the test checks that every row
of the four tables comes from its own run, made the way the row says.
"""

from __future__ import annotations

import json

import pytest
from conftest import single_torch_thread
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.layout import Dataset
from capfilt.demo.ablation import TABLES, ablation_results, directions, markdown, noise_ratio

SHORT = [
    "--images", "40", "--annotated-images", "12", "--heldout-images", "8",
    "--set", "pretrain_steps=2", "--set", "caption_steps=1", "--set", "filter_steps=1",
    "--set", "batch_size=4", "--set", "threshold=0.3",
]  # fmt: skip


@pytest.fixture(scope="module")
def short_ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation") / "a"
    with single_torch_thread():
        result = CliRunner().invoke(app, ["ablate", str(root), *SHORT])
    return root, result


def run_config(root, name: str) -> dict:
    return json.loads((root / "runs" / name / "config.json").read_text())


def test_the_short_ablation_runs_every_row(short_ablation):
    root, result = short_ablation
    assert result.exit_code == 0, result.output
    for table in TABLES:
        assert table.title in result.output
    results = json.loads((root / "ablation.json").read_text())
    rows = [row for table in results["tables"] for row in table["rows"]]
    assert len(rows) == sum(len(t.rows) for t in TABLES)
    for row in rows:  # every row has its own evaluation, and the paper's figures beside
        assert row["ours"] and {"i→t R@1", "t→i R@5", "CIDEr"} <= set(row["ours"]), row
        assert set(row["paper"]) == {"TR@1", "IR@1", "CIDEr"}
    assert (root / "ablation.md").read_text() == markdown(results)


def test_each_row_is_made_the_way_it_says(short_ablation):
    root, _ = short_ablation
    # Table 3: the sharing of each pretraining run; the default is BLIP's.
    for name, sharing in (
        ("noisy", "all-but-sa"),
        ("share-all", "all"),
        ("share-all-but-ca", "all-but-ca"),
        ("share-none", "none"),
    ):
        assert run_config(root, name)["model_config"]["sharing"] == sharing
    # Table 1: +F trains on the kept web captions only, +C and +C+F on web and synthetic.
    assert run_config(root, "f")["train_config"]["source"] == "web"
    assert run_config(root, "c")["train_config"]["source"] == "all"
    # +C read curated/ at threshold 0 (every pair), +C+F the generation at the threshold.
    assert run_config(root, "c")["examples"] >= run_config(root, "cf")["examples"]
    # Table 2: beam-searched captions in their own dataset; Table 4: the shared model's.
    beam = Dataset(str(root / "web-beam")).read_manifest()["runs"]
    caption = next(r for r in beam if r["stage"] == "caption")
    assert caption["options"]["decoding"] == "beam"
    shared = run_config(root, "shared")["train_config"]
    assert shared["task"] == "pretrain" and shared["finetuning"] is True
    assert (root / "models-shared" / "captioner").is_dir()
    assert (root / "models-shared" / "filter").is_dir()


def test_noise_ratio_is_the_share_of_synthetic_captions_dropped(short_ablation):
    root, _ = short_ablation
    web = Dataset(str(root / "web"))
    from capfilt.stages.query import run_query

    _, rows = run_query(
        web, "select count(*) filter (where itm_score < 0.3), count(*) from scores "
        "where source = 'synthetic' and itm_score is not null"
    )  # fmt: skip
    dropped, scored = rows[0]
    assert noise_ratio(web) == pytest.approx(dropped / scored)


def test_directions_name_the_best_rows():
    def row(label, ours, paper_tr1):
        return {"label": label, "ours": ours, "paper": {"TR@1": paper_tr1, "IR@1": 60}}

    table = {
        "rows": [
            row("a", {"i→t R@1": 0.1, "t→i R@1": 0.2}, 80),
            row("b", {"i→t R@1": 0.3, "t→i R@1": 0.4}, 70),
        ]
    }
    assert directions(table) == "best by mean R@1: paper a; here b (differs)"
    table["rows"][1]["ours"] = None  # a run not evaluated counts for nothing
    assert directions(table) == "best by mean R@1: paper a; here a (same)"


def test_a_missing_evaluation_is_a_blank_row(tmp_path):
    results = ablation_results(tmp_path)
    assert all(row["ours"] is None for t in results["tables"] for row in t["rows"])
    assert "| noisy web | - |" in markdown(results)
