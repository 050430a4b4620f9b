"""`capfilt ablate`: BLIP's CapFilt ablations (arXiv 2201.12086, Tables 1-4) in miniature.

`pipelines/ablation.toml` pretrains the tiny MED once per row on the toy web and evaluates
every run on held-out scenes (eval/NAME.json); this module lays the results out as the
paper's tables, with the paper's figures beside them for direction. The paper finetunes each
pretrained model on COCO before its retrieval (TR@1, IR@1) and captioning (CIDEr) columns;
the miniature evaluates the pretrained models as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from capfilt.core.layout import Dataset
from capfilt.core.text import printable
from capfilt.demo.loop import EVAL_DIR
from capfilt.report.figures import model_metrics
from capfilt.report.html import metric_text

DEFAULT_PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "ablation.toml"
RESULTS_FILE = "ablation.json"
MARKDOWN_FILE = "ablation.md"

# Our columns (names of report.figures.model_metrics) and the paper's (COCO finetuned).
COLUMNS = ("i→t R@1", "t→i R@1", "i→t R@5", "t→i R@5", "CIDEr")
PAPER_COLUMNS = ("TR@1", "IR@1", "CIDEr")


@dataclass(frozen=True)
class Row:
    label: str
    run: str  # eval/<run>.json
    paper: tuple[float, float, float]  # the paper's TR@1, IR@1, CIDEr (COCO, finetuned)
    dataset: str | None = None  # the dataset whose filter's noise ratio the row shows
    paper_noise: str | None = None  # the paper's noise ratio


@dataclass(frozen=True)
class Table:
    title: str
    rows: tuple[Row, ...]
    finding: str  # what the paper reports


# The paper's figures, from its Tables 1-4 (pretrained on 14M images, ViT-B/16). Its rows
# that are one run (Table 1's noisy row = Table 2's "none" = Table 3's "all but SA"; +C+F =
# nucleus = decoupled) are one run here too.
TABLES = (
    Table(
        "Table 1: the captioner (C) and the filter (F)",
        (
            Row("noisy web", "noisy", (78.4, 60.7, 127.8)),
            Row("+C", "c", (79.7, 62.0, 128.9)),
            Row("+F", "f", (79.1, 61.5, 128.2)),
            Row("+C+F", "cf", (80.6, 63.1, 129.7)),
        ),
        "each helps alone; both together help most",
    ),
    Table(
        "Table 2: synthetic captions by beam search or nucleus sampling (both filtered)",
        (
            Row("none (noisy web)", "noisy", (78.4, 60.7, 127.8)),
            Row("beam search", "beam", (79.6, 61.9, 128.9), "web-beam", "19 %"),
            Row("nucleus sampling", "cf", (80.6, 63.1, 129.7), "web", "25 %"),
        ),
        "nucleus sampling makes better data although the filter finds more of it noisy",
    ),
    Table(
        "Table 3: layers the text encoder and decoder share in pretraining",
        (
            Row("all", "share-all", (77.3, 59.5, 125.9)),
            Row("all but cross-attention", "share-all-but-ca", (77.5, 59.9, 126.1)),
            Row("all but self-attention", "noisy", (78.4, 60.7, 127.8)),
            Row("none", "share-none", (78.3, 60.5, 127.4)),
        ),
        "sharing all but self-attention is best, with fewer parameters than none",
    ),
    Table(
        "Table 4: captioner and filter sharing their parameters in finetuning",
        (
            Row("shared", "shared-cf", (79.8, 62.2, 129.0), "web-shared", "8 %"),
            Row("decoupled", "cf", (80.6, 63.1, 129.7), "web", "25 %"),
        ),
        "decoupled is better: a shared filter lets its own captioner's noise through "
        "(confirmation bias)",
    ),
)


def noise_ratio(dataset: Dataset) -> float | None:
    """The share of synthetic captions the filter dropped (the paper's noise ratio)."""
    from capfilt.stages.query import run_query

    if not (dataset.has_stage("scores") and dataset.has_stage("curated")):
        return None
    _, rows = run_query(
        dataset,
        "SELECT (SELECT count(*) FROM scores WHERE source = 'synthetic' "
        "AND itm_score IS NOT NULL), (SELECT count(*) FROM curated WHERE source = 'synthetic')",
    )
    scored, kept = rows[0]
    return None if not scored else 1 - kept / scored


def ablation_results(root: str | os.PathLike) -> dict:
    """Every table's rows: our figures (None where a run was not evaluated) and the paper's."""
    root = Path(root)
    runs: dict[str, dict | None] = {}
    noise: dict[str, float | None] = {}
    tables = []
    for table in TABLES:
        rows = []
        for row in table.rows:
            if row.run not in runs:
                path = root / EVAL_DIR / f"{row.run}.json"
                found = json.loads(path.read_text()) if path.exists() else None
                runs[row.run] = model_metrics(found) if found else None
            if row.dataset and row.dataset not in noise:
                noise[row.dataset] = noise_ratio(Dataset(str(root / row.dataset)))
            rows.append(
                {
                    "label": row.label,
                    "run": row.run,
                    "ours": runs[row.run],
                    "noise": noise.get(row.dataset) if row.dataset else None,
                    "paper": dict(zip(PAPER_COLUMNS, row.paper, strict=True)),
                    "paper_noise": row.paper_noise,
                }
            )
        tables.append({"title": table.title, "finding": table.finding, "rows": rows})
    return {"tables": tables}


def best_row(rows: list[dict], score) -> str | None:
    scored = [(score(r), r["label"]) for r in rows]
    scored = [(s, label) for s, label in scored if s is not None]
    return max(scored)[1] if scored else None


def _ours_mean_r1(row: dict) -> float | None:
    ours = row["ours"]
    if not ours or ours.get("i→t R@1") is None or ours.get("t→i R@1") is None:
        return None
    return (ours["i→t R@1"] + ours["t→i R@1"]) / 2


def _paper_mean_r1(row: dict) -> float:
    return (row["paper"]["TR@1"] + row["paper"]["IR@1"]) / 2


def directions(table: dict) -> str:
    """Which row is best by mean R@1 in the paper and here."""
    paper = best_row(table["rows"], _paper_mean_r1)
    ours = best_row(table["rows"], _ours_mean_r1)
    verdict = "same" if paper == ours else "differs"
    return f"best by mean R@1: paper {paper}; here {ours or '-'} ({verdict})"


def has_noise(table: dict) -> bool:
    """Whether a table of results shows noise ratios (ours or the paper's)."""
    return any(r["noise"] is not None or r["paper_noise"] for r in table["rows"])


def _cells(row: dict, with_noise: bool) -> list[str]:
    ours = row["ours"] or {}
    cells = [metric_text(name, ours.get(name)) for name in COLUMNS]
    if with_noise:
        cells.append("-" if row["noise"] is None else f"{100 * row['noise']:.0f} %")
    cells += [f"{row['paper'][name]:.1f}" for name in PAPER_COLUMNS]
    if with_noise:
        cells.append(row["paper_noise"] or "-")
    return cells


def _headers(with_noise: bool) -> list[str]:
    headers = list(COLUMNS)
    if with_noise:
        headers.append("noise")
    headers += [f"paper {name}" for name in PAPER_COLUMNS]
    if with_noise:
        headers.append("paper noise")
    return headers


def print_tables(results: dict, console) -> None:
    from rich.table import Table as RichTable
    from rich.text import Text

    for table in results["tables"]:
        with_noise = has_noise(table)
        out = RichTable("row", *_headers(with_noise), title=table["title"], title_justify="left")
        for row in table["rows"]:
            out.add_row(Text(printable(row["label"])), *_cells(row, with_noise))
        console.print(out)
        console.print(Text(f"paper: {table['finding']}; {directions(table)}"))


def markdown(results: dict) -> str:
    """The tables as Markdown (the README's copy)."""
    lines = []
    for table in results["tables"]:
        with_noise = has_noise(table)
        headers = ["", *_headers(with_noise)]
        lines += [f"**{table['title']}**", "", "| " + " | ".join(headers) + " |"]
        lines.append("|" + " --- |" * len(headers))
        for row in table["rows"]:
            lines.append("| " + " | ".join([row["label"], *_cells(row, with_noise)]) + " |")
        lines += ["", f"Paper: {table['finding']}; {directions(table)}.", ""]
    return "\n".join(lines)


def write_results(root: str | os.PathLike, results: dict) -> Path:
    root = Path(root)
    (root / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    path = root / MARKDOWN_FILE
    path.write_text(markdown(results))
    return path
