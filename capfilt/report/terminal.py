"""The report's summary tables in the terminal."""

from __future__ import annotations

from capfilt.core.text import printable
from capfilt.report.figures import rate
from capfilt.report.html import metric_text, percent, score_text


def print_summary(summary: dict, console) -> None:
    """The report's figures as rich tables."""
    from rich.table import Table
    from rich.text import Text

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for i, name in enumerate(columns):
            t.add_column(name, justify="left" if i == 0 else "right")
        return t

    stages = table("Stages", "stage", "shards", "rows", "images")
    for stage, s in summary["stages"].items():
        if s["shards"]:
            stages.add_row(stage, str(s["shards"]), f"{s['rows']:,}", f"{s['images']:,}")
        else:
            stages.add_row(stage, "0", Text("not run", style="dim"), "")
    console.print(stages)

    fetch = summary["fetch"]
    if fetch:
        status = table("Fetch status", "status", "rows", "share")
        for name, n in fetch["status"].items():
            status.add_row(Text(printable(name)), f"{n:,}", percent(rate(n, fetch["rows"])))
        console.print(status)
        if fetch["error_kinds"]:
            kinds = table("Fetch errors by kind", "error kind", "rows")
            for kind, n in fetch["error_kinds"].items():
                kinds.add_row(Text(printable(kind)), f"{n:,}")
            console.print(kinds)

    captions = summary["captions"]
    if captions:
        t = table("Captions", "written", "errors", "images captioned")
        t.add_row(
            f"{captions['written']:,}",
            f"{captions['errors']:,}",
            f"{captions['images_captioned']:,}",
        )
        console.print(t)

    scores = summary["scores"]
    if scores:
        # Every score column with values: ITM, ITC, and CLIP, SigLIP where scores/ has them.
        columns = summary.get("score_columns") or {"itm_score": {"label": "ITM"}}
        t = table(
            f"Scores at {summary['selection']} ({summary['threshold_origin']})",
            "source",
            "pairs",
            *(f"mean {figures['label']}" for figures in columns.values()),
            "kept",
            "kept rate",
        )
        t.title = Text(printable(t.title), style="bold")  # a --where is the user's text
        for source, s in scores["by_source"].items():
            means = s.get("means") or {"itm_score": s["mean_itm"]}
            t.add_row(
                Text(printable(source)),
                f"{s['pairs']:,}",
                *(score_text(means.get(column)) for column in columns),
                f"{s['kept']:,}",
                percent(s["kept_rate"]),
            )
        blanks = [""] * len(columns)
        t.add_row(
            "all",
            f"{scores['pairs']:,}",
            *blanks,
            f"{scores['kept']:,}",
            percent(scores["kept_rate"]),
        )
        console.print(t)
        truncated = summary.get("truncated")
        if truncated and any(v["truncated"] for v in truncated.values()):
            cut = table("Texts cut to the scorer's window", "source", "truncated", "of pairs")
            for source, v in truncated.items():
                cut.add_row(Text(printable(source)), f"{v['truncated']:,}", f"{v['pairs']:,}")
            console.print(cut)

    truth = summary["truth"]
    if truth:
        t = table(
            "Filter against the truth (wrong web captions)",
            "wrong",
            "dropped",
            "caught",
            "precision",
            "recall",
            "ranking AUC",
        )
        auc = truth.get("auc")
        t.add_row(
            f"{truth['wrong']:,}",
            f"{truth['dropped']:,}",
            f"{truth['caught']:,}",
            percent(truth["precision"]),
            percent(truth["recall"]),
            "-" if auc is None else f"{auc:.3f}",
        )
        console.print(t)

    dedup = summary.get("dedup")
    if dedup:
        t = table(
            f"Duplicates: {dedup['kept']:,} of {dedup['images']:,} images kept",
            "left out because",
            "images",
        )
        for reason, n in dedup["by_reason"].items():
            t.add_row(Text(printable(reason)), f"{n:,}")
        if not dedup["by_reason"]:
            t.add_row(Text("nothing left out", style="dim"), "")
        for root, n in dedup["contaminated_by"].items():
            t.add_row(Text(printable(f"contaminated by {root}")), f"{n:,}")
        console.print(t)

    compared = summary.get("models")
    if compared:
        console.print(models_table(compared, "Models trained on this data"))


def models_table(compared: dict, title: str):
    """Models side by side, one metric a row (recall and BLEU in %, CIDEr × 100); with two
    models, the change from the first to the second."""
    from rich.table import Table
    from rich.text import Text

    labels = list(compared["models"])
    change = len(labels) == 2
    t = Table(title=title, title_justify="left", title_style="bold")
    t.add_column("metric")
    for label in labels:
        t.add_column(Text(printable(label)), justify="right")
    if change:
        t.add_column("change", justify="right")
    for name in compared["metrics"]:
        values = [compared["models"][label].get(name) for label in labels]
        cells = [metric_text(name, v) for v in values]
        if change:
            cells.append("-" if None in values else f"{100 * (values[1] - values[0]):+.1f}")
        t.add_row(name, *cells)
    return t
