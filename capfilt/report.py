"""The dataset report: figures from DuckDB, rich tables for the terminal, one HTML file.

`build_report` gathers every figure once (`collect_summary`), picks kept and dropped examples
per source, and writes `reports/summary.json` and `reports/report.html`. The HTML file is
self-contained: thumbnails are base64 JPEG, histograms are inline SVG, the styles are inline,
there is no script, and a Content-Security-Policy forbids every request that is not a `data:`
image, so opening a report never touches the network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io as _io
import json
import re
from dataclasses import dataclass

from capfilt import io
from capfilt.errors import CapfiltError
from capfilt.layout import STAGES, Dataset

DEFAULT_THRESHOLD = 0.5
SWEEP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
HISTOGRAM_BINS = 20
THUMBNAIL_SIDE = 128
SOURCES = ("web", "synthetic")
EXAMPLE_GROUPS = (
    ("kept_top", "Kept: highest ITM"),
    ("kept_borderline", "Kept: just above the threshold"),
    ("dropped_borderline", "Dropped: just below the threshold"),
    ("dropped_bottom", "Dropped: lowest ITM"),
)


@dataclass
class Report:
    """What `build_report` wrote: the figures and where the two files are."""

    summary: dict
    html_path: str
    summary_path: str
    html_url: str


# --- threshold -----------------------------------------------------------------------------
def resolve_threshold(dataset: Dataset, threshold: float | None) -> tuple[float, str]:
    """The threshold to report at, and where it came from ('option', 'filter run', 'default')."""
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise CapfiltError(
                f"--threshold must be an ITM probability between 0 and 1, got {threshold}"
            )
        return float(threshold), "option"
    filter_threshold = last_filter_threshold(dataset)
    if filter_threshold is not None:
        return filter_threshold, "filter run"
    return DEFAULT_THRESHOLD, "default"


def last_filter_threshold(dataset: Dataset) -> float | None:
    """`options.threshold` of the last filter run in the manifest, if there is one."""
    runs = dataset.read_manifest().get("runs") or []
    for run in reversed(runs):
        if isinstance(run, dict) and run.get("stage") == "filter":
            value = (run.get("options") or {}).get("threshold")
            try:
                return float(value) if value is not None else None
            except (TypeError, ValueError):
                return None
    return None


# --- fetch error kinds ---------------------------------------------------------------------
# img2dataset stores the exception text; group messages that differ only in URL or numbers.
_ERROR_KINDS = (
    (re.compile(r"HTTP Error (\d{3})"), r"HTTP \1"),
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"Connection refused", re.I), "connection refused"),
    (
        re.compile(r"Connection reset|Remote end closed|RemoteDisconnected", re.I),
        "connection reset",
    ),
    (
        re.compile(
            r"Name or service not known|getaddrinfo|nodename nor servname|name resolution", re.I
        ),
        "DNS lookup failed",
    ),
    (re.compile(r"SSL|CERTIFICATE", re.I), "TLS/SSL error"),
    (re.compile(r"decod|cannot identify image|truncated", re.I), "image decoding"),
)


def error_kind(message: str | None) -> str:
    """A short, groupable kind for a fetch error message."""
    if not message:
        return "(no message)"
    for pattern, kind in _ERROR_KINDS:
        found = pattern.search(message)
        if found:
            return found.expand(kind) if "\\" in kind else kind
    first_line = message.strip().splitlines()[0] if message.strip() else message
    first_line = re.sub(r"https?://\S+", "<url>", first_line)
    first_line = re.sub(r"\d{3,}", "N", first_line)
    return first_line[:80]


# --- figures -------------------------------------------------------------------------------
def _columns(con, view: str) -> set[str]:
    return {row[0] for row in con.execute(f"DESCRIBE {view}").fetchall()}


def _rows(con, sql: str, params: list | None = None) -> list[dict]:
    result = con.execute(sql, params or [])
    names = [d[0] for d in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def collect_summary(dataset: Dataset, threshold: float, threshold_origin: str, con) -> dict:
    """Every figure of the report, as a JSON-ready dict (this is reports/summary.json)."""
    stages = {stage: dataset.shards(stage) for stage in STAGES}
    summary: dict = {
        "dataset": dataset.root,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_origin": threshold_origin,
        "filter_threshold": last_filter_threshold(dataset),
        "stages": {
            stage: {"shards": len(shards), "rows": 0, "images": 0}
            for stage, shards in stages.items()
        },
        "fetch": None,
        "captions": None,
        "scores": None,
        "curated": None,
        "sweep": [],
        "histograms": {},
        "truth": None,
    }
    for stage, shards in stages.items():
        if shards:
            rows, images = con.execute(
                f"SELECT count(*), count(DISTINCT key) FROM {stage}"
            ).fetchone()
            summary["stages"][stage].update(rows=rows, images=images)

    if stages["images"]:
        summary["fetch"] = _fetch_figures(con)
    if stages["captions"]:
        summary["captions"] = _caption_figures(con)
    if stages["scores"]:
        summary["scores"] = _score_figures(con, threshold)
        summary["sweep"] = _sweep(con)
        summary["histograms"] = _histograms(con)
        if stages["images"] and {"caption_is_wrong"} <= _columns(con, "images"):
            summary["truth"] = _truth_figures(con, threshold, summary["sweep"])
    if stages["curated"]:
        by_source = _rows(
            con,
            "SELECT source, count(*) AS pairs, count(DISTINCT key) AS images "
            "FROM curated GROUP BY source ORDER BY source <> 'web', source",
        )
        summary["curated"] = {
            "pairs": summary["stages"]["curated"]["rows"],
            "images": summary["stages"]["curated"]["images"],
            "by_source": {
                r["source"]: {"pairs": r["pairs"], "images": r["images"]} for r in by_source
            },
        }
    return summary


def _fetch_figures(con) -> dict:
    by_status = _rows(
        con, "SELECT status, count(*) AS n FROM images GROUP BY status ORDER BY n DESC, status"
    )
    messages = _rows(
        con,
        "SELECT error_message, count(*) AS n FROM images "
        "WHERE status IS DISTINCT FROM 'success' GROUP BY error_message",
    )
    kinds: dict[str, int] = {}
    for row in messages:
        kind = error_kind(row["error_message"])
        kinds[kind] = kinds.get(kind, 0) + row["n"]
    total = sum(r["n"] for r in by_status)
    success = sum(r["n"] for r in by_status if r["status"] == "success")
    return {
        "rows": total,
        "success": success,
        "failed": total - success,
        "success_rate": _rate(success, total),
        "status": {str(r["status"]): r["n"] for r in by_status},
        "error_kinds": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _caption_figures(con) -> dict:
    by_status = _rows(
        con, "SELECT status, count(*) AS n FROM captions GROUP BY status ORDER BY n DESC"
    )
    written = sum(r["n"] for r in by_status if r["status"] == "success")
    total = sum(r["n"] for r in by_status)
    images = con.execute(
        "SELECT count(DISTINCT key) FROM captions WHERE status = 'success'"
    ).fetchone()[0]
    errors = _rows(
        con,
        "SELECT error_message, count(*) AS n FROM captions "
        "WHERE status IS DISTINCT FROM 'success' GROUP BY error_message ORDER BY n DESC LIMIT 10",
    )
    models = [
        r[0] for r in con.execute("SELECT DISTINCT model FROM captions ORDER BY 1").fetchall()
    ]
    return {
        "rows": total,
        "written": written,
        "errors": total - written,
        "images_captioned": images,
        "status": {str(r["status"]): r["n"] for r in by_status},
        "error_messages": {str(r["error_message"]): r["n"] for r in errors},
        "models": [m for m in models if m is not None],
    }


def _score_figures(con, threshold: float) -> dict:
    rows = _rows(
        con,
        "SELECT source, count(*) AS pairs, count(itm_score) AS scored, "
        "avg(itm_score) AS mean_itm, avg(itc_score) AS mean_itc, "
        "count(*) FILTER (WHERE itm_score >= $1) AS kept, count(DISTINCT key) AS images "
        "FROM scores GROUP BY source ORDER BY source <> 'web', source",
        [threshold],
    )
    kept_images = con.execute(
        "SELECT count(DISTINCT key) FROM scores WHERE itm_score >= $1", [threshold]
    ).fetchone()[0]
    by_source = {}
    for r in rows:
        by_source[r["source"]] = {
            "pairs": r["pairs"],
            "scored": r["scored"],
            "images": r["images"],
            "mean_itm": None if r["mean_itm"] is None else round(r["mean_itm"], 4),
            "mean_itc": None if r["mean_itc"] is None else round(r["mean_itc"], 4),
            "kept": r["kept"],
            "kept_rate": _rate(r["kept"], r["pairs"]),
        }
    pairs = sum(s["pairs"] for s in by_source.values())
    kept = sum(s["kept"] for s in by_source.values())
    return {
        "pairs": pairs,
        "kept": kept,
        "kept_rate": _rate(kept, pairs),
        "images_with_a_kept_pair": kept_images,
        "by_source": by_source,
    }


def _sweep(con) -> list[dict]:
    """How many pairs each threshold of SWEEP_THRESHOLDS would keep, per source."""
    rows = _rows(
        con,
        "SELECT t.threshold, s.source, count(*) AS pairs, "
        "count(*) FILTER (WHERE s.itm_score >= t.threshold) AS kept "
        "FROM scores s, (SELECT unnest($1::DOUBLE[]) AS threshold) t "
        "GROUP BY ALL ORDER BY ALL",
        [list(SWEEP_THRESHOLDS)],
    )
    sweep: dict[float, dict] = {}
    for r in rows:
        t = round(r["threshold"], 4)
        entry = sweep.setdefault(t, {"threshold": t, "by_source": {}, "_pairs": 0})
        entry["by_source"][r["source"]] = {
            "kept": r["kept"],
            "kept_rate": _rate(r["kept"], r["pairs"]),
        }
        entry["_pairs"] += r["pairs"]
    for entry in sweep.values():
        entry["kept"] = sum(s["kept"] for s in entry["by_source"].values())
        entry["kept_rate"] = _rate(entry["kept"], entry.pop("_pairs"))
    return [sweep[t] for t in sorted(sweep)]


def _histograms(con) -> dict:
    """ITM score counts in HISTOGRAM_BINS equal bins over [0, 1], per source."""
    rows = _rows(
        con,
        "SELECT source, least(greatest(floor(itm_score * $1), 0), $1 - 1)::INTEGER AS bin, "
        "count(*) AS n FROM scores WHERE itm_score IS NOT NULL AND NOT isnan(itm_score) "
        "GROUP BY ALL",
        [HISTOGRAM_BINS],
    )
    histograms: dict[str, list[int]] = {}
    for r in rows:
        counts = histograms.setdefault(r["source"], [0] * HISTOGRAM_BINS)
        counts[r["bin"]] += r["n"]
    return {source: histograms[source] for source in sorted(histograms)}


def _truth_counts(con, threshold: float) -> dict:
    wrong, dropped, caught = con.execute(
        "SELECT count(*) FILTER (WHERE i.caption_is_wrong), "
        "count(*) FILTER (WHERE s.itm_score < $1), "
        "count(*) FILTER (WHERE i.caption_is_wrong AND s.itm_score < $1) "
        "FROM scores s JOIN images i USING (key) WHERE s.source = 'web'",
        [threshold],
    ).fetchone()
    return {
        "wrong": wrong,
        "dropped": dropped,
        "caught": caught,
        "precision": _rate(caught, dropped),
        "recall": _rate(caught, wrong),
    }


def _truth_figures(con, threshold: float, sweep: list[dict]) -> dict:
    """How well the filter catches the wrong web captions of a toy web (truth columns)."""
    web_pairs = con.execute("SELECT count(*) FROM scores WHERE source = 'web'").fetchone()[0]
    figures = {"web_pairs": web_pairs, **_truth_counts(con, threshold)}
    for entry in sweep:
        counts = _truth_counts(con, entry["threshold"])
        entry["precision"], entry["recall"] = counts["precision"], counts["recall"]
    if "wrong_kind" in _columns(con, "images"):
        kinds = _rows(
            con,
            "SELECT i.wrong_kind AS kind, count(*) AS wrong, "
            "count(*) FILTER (WHERE s.itm_score < $1) AS caught "
            "FROM scores s JOIN images i USING (key) "
            "WHERE s.source = 'web' AND i.caption_is_wrong GROUP BY ALL ORDER BY wrong DESC, kind",
            [threshold],
        )
        figures["by_kind"] = {
            str(k["kind"]): {
                "wrong": k["wrong"],
                "caught": k["caught"],
                "recall": _rate(k["caught"], k["wrong"]),
            }
            for k in kinds
        }
    return figures


# --- examples and thumbnails ---------------------------------------------------------------
def pick_examples(con, threshold: float, per_group: int, image_columns: set[str] | None) -> dict:
    """Kept and dropped pairs per source: the clearest ones and the ones nearest the threshold.

    Returns {source: {group: [row, ...]}} with the groups of EXAMPLE_GROUPS, each sorted by
    ITM score from high to low. When one side of the threshold has fewer than 2 × per_group
    pairs, its borderline and clearest groups split them, so no pair shows twice.
    """
    columns = "s.key, s.text_id, s.source, s.text, s.itm_score, s.itc_score"
    join = ""
    if image_columns is not None:
        join = "LEFT JOIN images i USING (key)"
        columns += ", i.caption AS web_caption"
        if "caption_is_wrong" in image_columns:
            columns += ", i.caption_is_wrong"
            columns += ", i.true_caption" if "true_caption" in image_columns else ""
    # (group, side of the threshold, order from the threshold outwards or from the far end)
    plan = (
        ("kept_top", ">=", "DESC", "far"),
        ("kept_borderline", ">=", "ASC", "near"),
        ("dropped_borderline", "<", "DESC", "near"),
        ("dropped_bottom", "<", "ASC", "far"),
    )
    examples: dict = {}
    for source in SOURCES:
        sizes = {}
        for side in (">=", "<"):
            total = con.execute(
                f"SELECT count(*) FROM scores WHERE source = $1 AND itm_score {side} $2",
                [source, threshold],
            ).fetchone()[0]
            near = min(per_group, (total + 1) // 2)
            sizes[side] = {"near": near, "far": min(per_group, total - near)}
        groups = {}
        for group, side, order, end in plan:
            rows = _rows(
                con,
                f"SELECT {columns} FROM scores s {join} "
                f"WHERE s.source = $1 AND s.itm_score {side} $2 "
                f"ORDER BY s.itm_score {order}, s.key {order}, s.text_id {order} LIMIT $3",
                [source, threshold, sizes[side][end]],
            )
            groups[group] = sorted(rows, key=lambda r: -r["itm_score"])
        if any(groups.values()):
            examples[source] = groups
    return examples


def sample_images(con, count: int) -> list[dict]:
    """Some fetched images with their web caption, for datasets that have no scores yet."""
    return _rows(
        con,
        "SELECT key, caption AS web_caption FROM images WHERE status = 'success' "
        "ORDER BY key LIMIT $1",
        [count],
    )


def thumbnails(con_with_images, keys: set[str]) -> dict[str, str | None]:
    """`data:` URIs of small JPEG thumbnails by key; None where the bytes are not an image."""
    if not keys:
        return {}
    rows = con_with_images.execute(
        "SELECT key, jpg FROM images WHERE key IN (SELECT unnest($1::VARCHAR[]))", [sorted(keys)]
    ).fetchall()
    found = {key: thumbnail_uri(jpg) for key, jpg in rows}
    return {key: found.get(key) for key in keys}


def thumbnail_uri(image_bytes: bytes | None, side: int = THUMBNAIL_SIDE) -> str | None:
    """A base64 JPEG `data:` URI of the image shrunk to fit side × side, or None."""
    if not image_bytes:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_io.BytesIO(image_bytes)) as img:
            img = img.convert("RGB")
            img.thumbnail((side, side))
            buf = _io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- the whole report ----------------------------------------------------------------------
def build_report(
    dataset: Dataset, threshold: float | None = None, examples_per_group: int = 6
) -> Report:
    """Gather the figures, write reports/summary.json and reports/report.html."""
    from capfilt.query import connect

    if not dataset.exists():
        raise CapfiltError(f"dataset folder {dataset.root!r} does not exist; check the path")
    if not any(dataset.has_stage(stage) for stage in STAGES):
        raise CapfiltError(
            f"{dataset.root!r} has no images/ shards yet; run `capfilt fetch` or "
            "`capfilt ingest` first"
        )
    threshold, origin = resolve_threshold(dataset, threshold)
    con = connect(dataset)
    summary = collect_summary(dataset, threshold, origin, con)

    image_columns = _columns(con, "images") if dataset.has_stage("images") else None
    examples: dict = {}
    samples: list[dict] = []
    if dataset.has_stage("scores"):
        examples = pick_examples(con, threshold, examples_per_group, image_columns)
    elif dataset.has_stage("images"):
        samples = sample_images(con, examples_per_group * 2)

    keys = {r["key"] for groups in examples.values() for rows in groups.values() for r in rows}
    keys |= {r["key"] for r in samples}
    thumbs: dict = {}
    if keys and dataset.has_stage("images"):
        thumbs = thumbnails(connect(dataset, with_images=True), keys)

    page = render_html(summary, examples, samples, thumbs)
    dataset.fs.makedirs(dataset.reports_dir(), exist_ok=True)
    summary_path = dataset.join("reports", "summary.json")
    html_path = dataset.join("reports", "report.html")
    summary_json = json.dumps(summary, indent=2, ensure_ascii=False, default=str)
    io.write_bytes_atomic(dataset.fs, summary_path, summary_json.encode("utf-8"))
    io.write_bytes_atomic(dataset.fs, html_path, page.encode("utf-8"))
    return Report(summary, html_path, summary_path, dataset.url("reports", "report.html"))


# --- HTML ----------------------------------------------------------------------------------
def _e(value) -> str:
    """Escape any value for HTML text and attributes (captions are hostile web text)."""
    return html.escape("" if value is None else str(value), quote=True)


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f} %"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  background:#f4f5f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px;font-weight:600}
header p{margin:4px 0 0;color:#b9c0cf;font-size:14px}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border-radius:10px;padding:16px 22px;margin:16px 0;
  box-shadow:0 1px 3px rgba(20,30,50,.08)}
h2{font-size:18px;margin:0 0 12px}
h3{font-size:16px;margin:18px 0 8px}
h4{font-size:14px;margin:14px 0 8px;color:#4a5262;font-weight:600}
.note{color:#5d6575;font-size:13px;margin:6px 0}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{flex:1 1 160px;border:1px solid #e3e6eb;border-radius:8px;padding:10px 14px}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#6b7383}
.card .n{font-size:26px;font-weight:600}
.card .sub{font-size:12px;color:#6b7383}
.card.missing .n{color:#a5acb8}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0 8px}
th,td{padding:4px 12px;border-bottom:1px solid #eceff3;text-align:right}
th{font-size:12px;color:#5d6575;font-weight:600;background:#f8f9fb}
th:first-child,td:first-child{text-align:left}
tr.current td{background:#fff4cf;font-weight:600}
.errbar{display:inline-block;height:10px;background:#d9534f;border-radius:2px;vertical-align:middle}
.hists{display:flex;gap:20px;flex-wrap:wrap}
svg.histogram{background:#fbfcfd;border:1px solid #e6e9ee;border-radius:8px}
svg.histogram text{font:11px system-ui,sans-serif;fill:#4a5262}
svg.histogram text.title{font-size:13px;font-weight:600;fill:#1d2330}
svg.histogram rect.bin.kept{fill:#2e9d4f}
svg.histogram rect.bin.dropped{fill:#b5bcc8}
svg.histogram line.threshold{stroke:#d32f2f;stroke-width:2;stroke-dasharray:5 3}
svg.histogram text.threshold{fill:#d32f2f;font-weight:600}
svg.histogram line.axis{stroke:#8a92a0}
svg.histogram line.grid{stroke:#e6e9ee}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(168px,1fr));gap:10px}
.ex{border:1px solid #e3e6eb;border-radius:8px;padding:8px;background:#fff}
.ex img,.ex .noimg{width:128px;height:128px;object-fit:contain;display:block;margin:0 auto 6px;
  background:#eef0f3;border-radius:4px}
.ex .noimg{display:flex;align-items:center;justify-content:center;text-align:center;
  font-size:12px;color:#7a8290;padding:8px}
.ex .text{font-size:14px;margin:2px 0 4px;overflow-wrap:anywhere}
.ex .meta{font-size:12px;color:#5d6575;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.badges{margin:2px 0}
.ex .meta b{color:#1d2330}
.badge{display:inline-block;font-size:11px;font-weight:600;padding:1px 6px;border-radius:8px;
  margin-right:4px}
.badge.kept{background:#dff3e4;color:#1b6b2d}
.badge.dropped{background:#fbe3e3;color:#a3201d}
.badge.wrong{background:#fff0c7;color:#7a5800}
.empty{color:#8a92a0;font-style:italic}
"""

# A report is opened from disk and may hold hostile text: allow nothing but inline styles and
# data: images, so even a markup mistake cannot run a script or reach the network.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def histogram_svg(source: str, counts: list[int], threshold: float) -> str:
    """An inline SVG histogram of ITM scores with the threshold drawn as a dashed line."""
    width, height = 520, 250
    left, right, top, bottom = 46, 14, 34, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    bins = len(counts)
    peak = max(counts) if counts and max(counts) > 0 else 1
    bar_w = plot_w / bins
    total = sum(counts)
    parts = [
        f'<svg class="histogram" data-source="{_e(source)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="ITM score histogram of {_e(source)} captions">',
        f'<text class="title" x="{left}" y="18">{_e(source)} captions (n = {total:,})</text>',
    ]
    for fraction in (0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_int(round(peak * fraction))}</text>"
        )
    for i, count in enumerate(counts):
        bar_h = plot_h * count / peak
        x, y = left + i * bar_w, top + plot_h - bar_h
        lo, hi = i / bins, (i + 1) / bins
        kind = "kept" if (lo + hi) / 2 >= threshold else "dropped"
        parts.append(
            f'<rect class="bin {kind}" x="{x + 0.5:.1f}" y="{y:.1f}" '
            f'width="{max(bar_w - 1, 1):.1f}" height="{bar_h:.1f}">'
            f"<title>ITM {lo:.2f}–{hi:.2f}: {count:,} pairs</title></rect>"
        )
    base = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + plot_w * tick
        parts.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}"/>'
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{tick:g}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">'
        "ITM score (probability that text matches image)</text>"
    )
    tx = left + plot_w * threshold
    anchor = "end" if threshold > 0.7 else "start"
    label_x = tx - 4 if anchor == "end" else tx + 4
    parts.append(
        f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{top - 6}" y2="{base}"/>'
        f'<text class="threshold" x="{label_x:.1f}" y="{top - 8}" text-anchor="{anchor}">'
        f"threshold {threshold:.2f}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _card(label: str, number: str, sub: str = "", missing: bool = False) -> str:
    cls = "card missing" if missing else "card"
    return (
        f'<div class="{cls}"><div class="label">{_e(label)}</div>'
        f'<div class="n">{_e(number)}</div><div class="sub">{_e(sub)}</div></div>'
    )


def _stages_html(summary: dict) -> str:
    stages = summary["stages"]
    fetch, captions, scores, curated = (
        summary["fetch"],
        summary["captions"],
        summary["scores"],
        summary["curated"],
    )
    cards = []
    if fetch:
        cards.append(
            _card(
                "images fetched",
                _int(fetch["success"]),
                f"of {fetch['rows']:,} rows · {_pct(fetch['success_rate'])} · "
                f"{stages['images']['shards']} shards",
            )
        )
    else:
        cards.append(_card("images", "not run", "run capfilt fetch", missing=True))
    if captions:
        cards.append(
            _card(
                "synthetic captions",
                _int(captions["written"]),
                f"{captions['errors']:,} errors · {captions['images_captioned']:,} images",
            )
        )
    else:
        cards.append(_card("captions", "not run", "run capfilt caption", missing=True))
    if scores:
        cards.append(
            _card(
                "pairs scored",
                _int(scores["pairs"]),
                f"{stages['scores']['images']:,} images",
            )
        )
    else:
        cards.append(_card("scores", "not run", "run capfilt filter", missing=True))
    if curated:
        cards.append(
            _card(
                "pairs kept (curated/)",
                _int(curated["pairs"]),
                f"{curated['images']:,} images",
            )
        )
    else:
        cards.append(_card("curated", "not run", "run capfilt filter", missing=True))
    return (
        '<section id="stages"><h2>Totals per stage</h2><div class="cards">'
        + "".join(cards)
        + "</div></section>"
    )


def _fetch_html(fetch: dict | None) -> str:
    if not fetch:
        return ""
    rows = "".join(
        f"<tr><td>{_e(status)}</td><td>{n:,}</td><td>{_pct(_rate(n, fetch['rows']))}</td></tr>"
        for status, n in fetch["status"].items()
    )
    out = [
        '<section id="fetch"><h2>Fetch</h2>',
        "<table><tr><th>status</th><th>rows</th><th>share</th></tr>",
        rows,
        "</table>",
    ]
    kinds = fetch["error_kinds"]
    if kinds:
        peak = max(kinds.values())
        out.append("<h3>Fetch errors by kind</h3><table>")
        out.append("<tr><th>error kind</th><th>rows</th><th></th></tr>")
        for kind, n in kinds.items():
            out.append(
                f"<tr><td>{_e(kind)}</td><td>{n:,}</td>"
                f'<td style="text-align:left"><span class="errbar" '
                f'style="width:{max(2, round(160 * n / peak))}px"></span></td></tr>'
            )
        out.append("</table>")
    else:
        out.append('<p class="note">No fetch errors.</p>')
    out.append("</section>")
    return "".join(out)


def _captions_html(captions: dict | None) -> str:
    if not captions:
        return ""
    out = ['<section id="captions"><h2>Captions</h2><table>']
    out.append("<tr><th>status</th><th>captions</th></tr>")
    out += [f"<tr><td>{_e(s)}</td><td>{n:,}</td></tr>" for s, n in captions["status"].items()]
    out.append("</table>")
    if captions["models"]:
        out.append(f'<p class="note">model: {_e(", ".join(captions["models"]))}</p>')
    if captions["error_messages"]:
        out.append("<h3>Most frequent caption errors</h3><table>")
        out.append("<tr><th>error</th><th>captions</th></tr>")
        out += [
            f"<tr><td>{_e(m)}</td><td>{n:,}</td></tr>"
            for m, n in captions["error_messages"].items()
        ]
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def _scores_html(summary: dict) -> str:
    scores = summary["scores"]
    if not scores:
        return ""
    threshold = summary["threshold"]
    out = ['<section id="scores"><h2>ITM scores</h2>']
    out.append(
        f'<p class="note">Threshold {threshold:.2f} ({_e(summary["threshold_origin"])}). '
        "A pair is kept when its ITM score is at least the threshold.</p>"
    )
    filter_threshold = summary.get("filter_threshold")
    if filter_threshold is not None and abs(filter_threshold - threshold) > 1e-9:
        out.append(
            f'<p class="note">curated/ was written by a filter run at threshold '
            f"{filter_threshold:.2f}; the figures below are at {threshold:.2f}.</p>"
        )
    out.append('<div class="hists">')
    for source in SOURCES:
        counts = summary["histograms"].get(source)
        if counts:
            out.append(histogram_svg(source, counts, threshold))
    out.append("</div>")
    out.append(
        "<table><tr><th>source</th><th>pairs</th><th>images</th><th>mean ITM</th>"
        "<th>mean ITC</th><th>kept</th><th>kept rate</th></tr>"
    )
    for source, s in scores["by_source"].items():
        out.append(
            f"<tr><td>{_e(source)}</td><td>{s['pairs']:,}</td><td>{s['images']:,}</td>"
            f"<td>{_score(s['mean_itm'])}</td><td>{_score(s['mean_itc'])}</td>"
            f"<td>{s['kept']:,}</td><td>{_pct(s['kept_rate'])}</td></tr>"
        )
    out.append(
        f"<tr><td>all</td><td>{scores['pairs']:,}</td><td></td><td></td><td></td>"
        f"<td>{scores['kept']:,}</td><td>{_pct(scores['kept_rate'])}</td></tr></table>"
    )
    out.append(
        f'<p class="note">{scores["images_with_a_kept_pair"]:,} images keep at least one '
        "pair.</p></section>"
    )
    return "".join(out)


def _sweep_html(summary: dict) -> str:
    sweep = summary["sweep"]
    if not sweep:
        return ""
    sources = [s for s in SOURCES if s in summary["scores"]["by_source"]]
    truth = summary["truth"] is not None
    head = "".join(f"<th>{_e(s)} kept</th><th>{_e(s)} rate</th>" for s in sources)
    head += "<th>all kept</th><th>all rate</th>"
    if truth:
        head += "<th>precision</th><th>recall</th>"
    out = [
        '<section id="sweep"><h2>What each threshold would keep</h2>',
        f"<table><tr><th>threshold</th>{head}</tr>",
    ]
    for entry in sweep:
        current = abs(entry["threshold"] - summary["threshold"]) < 1e-9
        cells = "".join(
            f"<td>{entry['by_source'].get(s, {}).get('kept', 0):,}</td>"
            f"<td>{_pct(entry['by_source'].get(s, {}).get('kept_rate'))}</td>"
            for s in sources
        )
        cells += f"<td>{entry['kept']:,}</td><td>{_pct(entry['kept_rate'])}</td>"
        if truth:
            cells += f"<td>{_pct(entry.get('precision'))}</td><td>{_pct(entry.get('recall'))}</td>"
        cls = ' class="current"' if current else ""
        out.append(f"<tr{cls}><td>{entry['threshold']:.1f}</td>{cells}</tr>")
    out.append("</table>")
    if truth:
        out.append(
            '<p class="note">Precision and recall of dropping the wrong web captions '
            "(see below).</p>"
        )
    out.append("</section>")
    return "".join(out)


def _truth_html(summary: dict) -> str:
    truth = summary["truth"]
    if not truth:
        return ""
    t = summary["threshold"]
    out = [
        '<section id="truth"><h2>Filter against the truth</h2>',
        '<p class="note">This dataset marks which web captions are wrong. A wrong web caption '
        f"is caught when its ITM score is below {t:.2f}. Precision = caught / all dropped web "
        "captions; recall = caught / all wrong web captions.</p>",
        '<div class="cards">',
        _card(
            "precision",
            _pct(truth["precision"]),
            f"{truth['caught']} of {truth['dropped']} dropped web captions are wrong",
        ),
        _card(
            "recall",
            _pct(truth["recall"]),
            f"{truth['caught']} of {truth['wrong']} wrong web captions are dropped",
        ),
        _card("web captions", _int(truth["web_pairs"]), f"{truth['wrong']:,} wrong"),
        "</div>",
    ]
    by_kind = truth.get("by_kind")
    if by_kind:
        out.append("<h3>Recall per kind of wrong caption</h3><table>")
        out.append("<tr><th>kind</th><th>wrong</th><th>caught</th><th>recall</th></tr>")
        out += [
            f"<tr><td>{_e(kind)}</td><td>{k['wrong']:,}</td><td>{k['caught']:,}</td>"
            f"<td>{_pct(k['recall'])}</td></tr>"
            for kind, k in by_kind.items()
        ]
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def _image_html(thumb: str | None, alt: str) -> str:
    if thumb is None:
        return '<div class="noimg">no image: missing or not decodable</div>'
    return f'<img src="{thumb}" alt="{_e(alt)}" width="128" height="128">'


def _example_html(row: dict, threshold: float, thumbs: dict) -> str:
    kept = row["itm_score"] is not None and row["itm_score"] >= threshold
    badge = (
        '<span class="badge kept">kept</span>'
        if kept
        else '<span class="badge dropped">dropped</span>'
    )
    if row.get("caption_is_wrong") and row["source"] == "web":
        badge += '<span class="badge wrong">wrong caption</span>'
    lines = [
        '<div class="ex">',
        _image_html(thumbs.get(row["key"]), row["text"]),
        f'<div class="text">{_e(row["text"])}</div>',
        f'<div class="badges">{badge}</div>',
        f'<div class="meta"><b>ITM {_score(row["itm_score"])}</b> · '
        f"ITC {_score(row['itc_score'])}</div>",
    ]
    if row["source"] == "synthetic" and row.get("web_caption") is not None:
        lines.append(f'<div class="meta">web: {_e(row["web_caption"])}</div>')
    if row["source"] == "web" and row.get("caption_is_wrong") and row.get("true_caption"):
        lines.append(f'<div class="meta">truth: {_e(row["true_caption"])}</div>')
    lines.append(f'<div class="meta">key {_e(row["key"])} · text {_e(row["text_id"])}</div>')
    lines.append("</div>")
    return "".join(lines)


def _examples_html(summary: dict, examples: dict, thumbs: dict) -> str:
    if not examples:
        return ""
    titles = {"web": "Web captions", "synthetic": "Synthetic captions"}
    out = ['<section id="examples"><h2>Kept and dropped examples</h2>']
    for source, groups in examples.items():
        out.append(f"<h3>{_e(titles.get(source, source))}</h3>")
        for group, label in EXAMPLE_GROUPS:
            rows = groups.get(group) or []
            out.append(f'<h4>{_e(label)}</h4><div class="grid" data-group="{_e(group)}">')
            if rows:
                out += [_example_html(r, summary["threshold"], thumbs) for r in rows]
            else:
                out.append('<p class="empty">none</p>')
            out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _samples_html(samples: list[dict], thumbs: dict) -> str:
    if not samples:
        return ""
    out = [
        '<section id="samples"><h2>Fetched images</h2>',
        '<p class="note">No scores yet: run <code>capfilt caption</code> and '
        "<code>capfilt filter</code> to see kept and dropped pairs.</p>",
        '<div class="grid">',
    ]
    for row in samples:
        out.append(
            '<div class="ex">'
            + _image_html(thumbs.get(row["key"]), row["web_caption"] or "")
            + f'<div class="text">{_e(row["web_caption"])}</div>'
            + f'<div class="meta">key {_e(row["key"])}</div></div>'
        )
    out.append("</div></section>")
    return "".join(out)


def render_html(summary: dict, examples: dict, samples: list[dict], thumbs: dict) -> str:
    """The whole report as one self-contained HTML page."""
    title = f"capfilt report: {summary['dataset']}"
    body = [
        _stages_html(summary),
        _fetch_html(summary["fetch"]),
        _captions_html(summary["captions"]),
        _scores_html(summary),
        _sweep_html(summary),
        _truth_html(summary),
        _examples_html(summary, examples, thumbs),
        _samples_html(samples, thumbs),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>capfilt report</h1><p>{_e(summary['dataset'])} · threshold "
        f"{summary['threshold']:.2f} ({_e(summary['threshold_origin'])}) · generated "
        f"{_e(summary['generated'])}</p></header>"
        f"<main>{''.join(body)}</main></body></html>\n"
    )


# --- terminal ------------------------------------------------------------------------------
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
            status.add_row(Text(name), f"{n:,}", _pct(_rate(n, fetch["rows"])))
        console.print(status)
        if fetch["error_kinds"]:
            kinds = table("Fetch errors by kind", "error kind", "rows")
            for kind, n in fetch["error_kinds"].items():
                kinds.add_row(Text(kind), f"{n:,}")
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
        t = table(
            f"Scores at threshold {summary['threshold']:.2f} ({summary['threshold_origin']})",
            "source",
            "pairs",
            "mean ITM",
            "kept",
            "kept rate",
        )
        for source, s in scores["by_source"].items():
            t.add_row(
                Text(source),
                f"{s['pairs']:,}",
                _score(s["mean_itm"]),
                f"{s['kept']:,}",
                _pct(s["kept_rate"]),
            )
        t.add_row(
            "all", f"{scores['pairs']:,}", "", f"{scores['kept']:,}", _pct(scores["kept_rate"])
        )
        console.print(t)

    truth = summary["truth"]
    if truth:
        t = table(
            "Filter against the truth (wrong web captions)",
            "wrong",
            "dropped",
            "caught",
            "precision",
            "recall",
        )
        t.add_row(
            f"{truth['wrong']:,}",
            f"{truth['dropped']:,}",
            f"{truth['caught']:,}",
            _pct(truth["precision"]),
            _pct(truth["recall"]),
        )
        console.print(t)
