"""The self-contained HTML report: inline styles and SVG, base64 thumbnails, no script,
and a Content-Security-Policy that forbids every request."""

from __future__ import annotations

import html

from capfilt.core.text import printable
from capfilt.report.figures import DEDUP_REASONS, EXAMPLE_GROUPS, SOURCES, rate


def _e(value) -> str:
    """Escape any value for HTML text and attributes (captions are hostile web text); control
    characters are shown as \\xNN, as in the terminal."""
    return html.escape("" if value is None else printable(value), quote=True)


def percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f} %"


def score_text(value: float | None) -> str:
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
svg.histogram rect.bin.all{fill:#5b7fc7}
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
.group{border-top:1px solid #eceff3;padding-top:6px;margin-top:10px}
.empty{color:#8a92a0;font-style:italic}
"""


# A report is opened from disk and may hold hostile text: allow nothing but inline styles and
# data: images, so even a markup mistake cannot run a script or reach the network.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def histogram_svg(
    source: str,
    counts: list[int],
    threshold: float | None,
    low: float = 0.0,
    high: float = 1.0,
    column: str = "itm_score",
    axis: str = "ITM score (probability that text matches image)",
    line: str = "threshold",
) -> str:
    """An inline SVG histogram of one score column over [low, high], with the threshold (or
    a top fraction's cut-off) drawn as a dashed line: bins above it kept, below it dropped.
    `threshold` None: no line, every bin alike."""
    width, height = 520, 250
    left, right, top, bottom = 46, 14, 34, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    bins = len(counts)
    peak = max(counts) if counts and max(counts) > 0 else 1
    bar_w = plot_w / bins
    total = sum(counts)
    span = (high - low) or 1.0
    parts = [
        f'<svg class="histogram" data-source="{_e(source)}" data-column="{_e(column)}" '
        f'xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(axis)} histogram of {_e(source)} captions">',
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
        lo, hi = low + span * i / bins, low + span * (i + 1) / bins
        kind = "all" if threshold is None else "kept" if (lo + hi) / 2 >= threshold else "dropped"
        parts.append(
            f'<rect class="bin {kind}" x="{x + 0.5:.1f}" y="{y:.1f}" '
            f'width="{max(bar_w - 1, 1):.1f}" height="{bar_h:.1f}">'
            f"<title>{_e(column)} {lo:.3g}–{hi:.3g}: {count:,} pairs</title></rect>"
        )
    base = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + plot_w * tick
        parts.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}"/>'
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">'
            f"{low + span * tick:.3g}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">{_e(axis)}</text>'
    )
    if threshold is not None:
        where = min(max((threshold - low) / span, 0.0), 1.0)
        tx = left + plot_w * where
        anchor = "end" if where > 0.7 else "start"
        label_x = tx - 4 if anchor == "end" else tx + 4
        parts.append(
            f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{top - 6}" y2="{base}"/>'
            f'<text class="threshold" x="{label_x:.1f}" y="{top - 8}" text-anchor="{anchor}">'
            f"{_e(line)} {threshold:.3g}</text>"
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
                f"of {fetch['rows']:,} rows · {percent(fetch['success_rate'])} · "
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
        f"<tr><td>{_e(status)}</td><td>{n:,}</td><td>{percent(rate(n, fetch['rows']))}</td></tr>"
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
    rule = summary.get("rule") or {}
    out = ['<section id="scores"><h2>Scores</h2>']
    out.append(
        f'<p class="note">Rule: {_e(summary["selection"])} ({_e(summary["threshold_origin"])}). '
        + _rule_sentence(threshold, rule)
        + _keep_best_note(summary.get("keep_best"), summary.get("best_by") or "itm_score")
        + ".</p>"
    )
    filter_threshold = summary.get("filter_threshold")
    if (
        filter_threshold is not None
        and threshold is not None
        and abs(filter_threshold - threshold) > 1e-9
    ):
        out.append(
            f'<p class="note">curated/ was written by a filter run at threshold '
            f"{filter_threshold:.2f}; the figures below are at {threshold:.2f}.</p>"
        )
    out.append('<h3>ITM</h3><div class="hists">')
    for source in SOURCES:
        counts = summary["histograms"].get(source)
        if counts:
            out.append(histogram_svg(source, counts, threshold))
    out.append("</div>")
    columns = [c for c in summary.get("score_columns") or {} if c != "itm_score"]
    labels = {c: summary["score_columns"][c]["label"] for c in columns}
    head = "".join(f"<th>mean {_e(labels[c])}</th>" for c in columns if c != "itc_score")
    out.append(
        "<table><tr><th>source</th><th>pairs</th><th>images</th><th>mean ITM</th>"
        f"<th>mean ITC</th>{head}<th>kept</th><th>kept rate</th></tr>"
    )
    for source, s in scores["by_source"].items():
        means = s.get("means") or {}
        cells = "".join(f"<td>{score_text(means.get(c))}</td>" for c in columns if c != "itc_score")
        out.append(
            f"<tr><td>{_e(source)}</td><td>{s['pairs']:,}</td><td>{s['images']:,}</td>"
            f"<td>{score_text(s['mean_itm'])}</td><td>{score_text(s['mean_itc'])}</td>{cells}"
            f"<td>{s['kept']:,}</td><td>{percent(s['kept_rate'])}</td></tr>"
        )
    blanks = "<td></td>" * (2 + len([c for c in columns if c != "itc_score"]))
    out.append(
        f"<tr><td>all</td><td>{scores['pairs']:,}</td><td></td>{blanks}"
        f"<td>{scores['kept']:,}</td><td>{percent(scores['kept_rate'])}</td></tr></table>"
    )
    out.append(
        f'<p class="note">{scores["images_with_a_kept_pair"]:,} images keep at least one pair.</p>'
    )
    for column in columns:
        out.append(_column_html(column, summary["score_columns"][column], rule))
    out.append(_truncated_html(summary.get("truncated")))
    out.append("</section>")
    return "".join(out)


def _rule_sentence(threshold: float | None, rule: dict) -> str:
    """What keeps a pair, as a sentence without its full stop."""
    parts = []
    if threshold is not None:
        parts.append(f"its ITM score is at least {threshold:.2f}")
    if rule.get("top_fraction") is not None:
        cutoff = rule.get("cutoff")
        at = f" (at least {cutoff:.4g})" if isinstance(cutoff, int | float) else ""
        parts.append(
            f"its {_e(rule.get('by'))} is in the top {100 * rule['top_fraction']:.4g} % of the "
            f"scored pairs{at}"
        )
    if rule.get("where") is not None:
        parts.append(f"the condition <code>{_e(rule['where'])}</code> holds")
    if not parts:
        parts.append("it is scored")
    return "A pair is kept when " + " and ".join(parts)


def _column_html(column: str, figures: dict, rule: dict) -> str:
    """One score column other than ITM: its histograms, with the top fraction's cut-off
    when the rule ranks by it."""
    low, high = figures["range"]
    cutoff = rule.get("cutoff") if rule.get("by") == column else None
    label = figures["label"]
    out = [f'<h3>{_e(label)} <span class="note">({_e(column)})</span></h3><div class="hists">']
    for source, s in figures["by_source"].items():
        out.append(
            histogram_svg(
                source,
                s["histogram"],
                cutoff if isinstance(cutoff, int | float) else None,
                low,
                high,
                column,
                f"{column} (mean {score_text(s['mean'])})",
                "cut-off",
            )
        )
    out.append("</div>")
    return "".join(out)


def _truncated_html(truncated: dict | None) -> str:
    """How many pairs had their text cut to a scorer's window, per source."""
    if not truncated:
        return ""
    out = [
        "<h3>Texts cut to the scorer's window</h3>",
        "<table><tr><th>source</th><th>truncated</th><th>of pairs</th><th>share</th></tr>",
    ]
    out += [
        f"<tr><td>{_e(source)}</td><td>{t['truncated']:,}</td><td>{t['pairs']:,}</td>"
        f"<td>{percent(rate(t['truncated'], t['pairs']))}</td></tr>"
        for source, t in truncated.items()
    ]
    out.append("</table>")
    return "".join(out)


def _keep_best_note(keep_best: int | None, by: str = "itm_score") -> str:
    """How --keep-best narrows the rule's pairs, as the end of a sentence."""
    if keep_best is None:
        return ""
    best = "the best" if keep_best == 1 else f"among the {keep_best} best"
    ranked = "ITM" if by == "itm_score" else _e(by)
    return (
        f" and, for a synthetic caption, it is {best} of its image's synthetic captions by "
        f"{ranked} (curated/ was made with --keep-best {keep_best})"
    )


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
    out = ['<section id="sweep"><h2>What each threshold would keep</h2>']
    if summary.get("keep_best") is not None:
        out.append(
            f'<p class="note">With at most {summary["keep_best"]} synthetic captions per '
            "image, as curated/.</p>"
        )
    out.append(f"<table><tr><th>threshold</th>{head}</tr>")
    threshold = summary["threshold"]
    for entry in sweep:
        current = threshold is not None and abs(entry["threshold"] - threshold) < 1e-9
        cells = "".join(
            f"<td>{entry['by_source'].get(s, {}).get('kept', 0):,}</td>"
            f"<td>{percent(entry['by_source'].get(s, {}).get('kept_rate'))}</td>"
            for s in sources
        )
        cells += f"<td>{entry['kept']:,}</td><td>{percent(entry['kept_rate'])}</td>"
        if truth:
            cells += (
                f"<td>{percent(entry.get('precision'))}</td><td>{percent(entry.get('recall'))}</td>"
            )
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
    out = [
        '<section id="truth"><h2>Filter against the truth</h2>',
        '<p class="note">This dataset marks which web captions are wrong. A wrong web caption '
        f"is caught when the rule ({_e(summary['selection'])}) drops it. Precision = caught / "
        "all dropped web "
        "captions; recall = caught / all wrong web captions. Ranking AUC = the chance that a "
        "right web caption scores above a wrong one, whatever the threshold.</p>",
        '<div class="cards">',
        _card(
            "precision",
            percent(truth["precision"]),
            f"{truth['caught']} of {truth['dropped']} dropped web captions are wrong",
        ),
        _card(
            "recall",
            percent(truth["recall"]),
            f"{truth['caught']} of {truth['wrong']} wrong web captions are dropped",
        ),
        _card(
            "ranking AUC",
            "-" if truth.get("auc") is None else f"{truth['auc']:.3f}",
            "right above wrong web captions",
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
            f"<td>{percent(k['recall'])}</td></tr>"
            for kind, k in by_kind.items()
        ]
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def metric_text(name: str, value: float | None) -> str:
    """A model metric as the tables show it: recalls and BLEU/METEOR/SPICE in %, CIDEr × 100
    as in BLIP's tables."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if name == "CIDEr" else percent(value)


def best_of(models: dict, name: str) -> float | None:
    values = [m[name] for m in models.values() if m.get(name) is not None]
    return max(values) if values else None


def _models_html(summary: dict) -> str:
    compared = summary.get("models")
    if not compared:
        return ""
    names, models = compared["metrics"], compared["models"]
    out = [
        '<section id="models"><h2>Models trained on this data</h2>',
        '<p class="note">Held-out evaluation of each model given to <code>--evaluation</code> '
        "(<code>capfilt evaluate</code>): retrieval recall by ITC similarity both ways, and "
        "the captions' BLEU-4 and CIDEr (× 100, as BLIP's tables) where the model captions. "
        "The best of each column is bold.</p><table><tr><th>model</th>",
        *(f"<th>{_e(name)}</th>" for name in names),
        "</tr>",
    ]
    for label, metrics in models.items():
        out.append(f"<tr><td>{_e(label)}</td>")
        for name in names:
            value = metrics.get(name)
            text = _e(metric_text(name, value))
            best = len(models) > 1 and value is not None and value == best_of(models, name)
            out.append(f"<td><b>{text}</b></td>" if best else f"<td>{text}</td>")
        out.append("</tr>")
    out.append("</table></section>")
    return "".join(out)


def _dedup_html(summary: dict, duplicates: dict, thumbs: dict) -> str:
    """What dedup keeps and leaves out, the largest groups and examples of each reason."""
    dedup = summary.get("dedup")
    if not dedup:
        return ""
    options = dedup["options"]
    against = options.get("against") or []
    out = [
        '<section id="dedup"><h2>Duplicates and contamination</h2>',
        f'<p class="note">dedup/ generation {_e(dedup["generation"])}: exact copies, the same '
        f"pixels, pHash within {_e(options.get('phash_distance'))} bits, "
        + (
            "no semantic pass"
            if options.get("semantic") == "off"
            else f"embeddings with cosine ≥ {1 - float(options.get('semantic_eps') or 0):.2f}"
        )
        + (f", against {_e(', '.join(against))}" if against else "")
        + ". Of each group the image with the best filter score is kept (then the most "
        "pixels, then the smallest key); placeholders and copies of evaluation images are not "
        "kept at all. Nothing is deleted: the query view <code>dedup_groups</code> lists every "
        "group.</p>",
        '<div class="cards">',
        _card("images judged", _int(dedup["images"]), f"{dedup['groups']:,} groups of 2 or more"),
        _card("kept", _int(dedup["kept"]), f"{dedup['images_in_groups']:,} images in groups"),
        _card("left out", _int(dedup["removed"]), percent(dedup["removed_rate"])),
    ]
    if dedup.get("pairs_left_out") is not None:
        out.append(
            _card(
                "pairs left out of curated/",
                _int(dedup["pairs_left_out"]),
                "that the rule keeps",
            )
        )
    out.append("</div>")
    if dedup["by_reason"]:
        out.append("<h3>Left out, by reason</h3><table>")
        out.append(
            '<tr><th>reason</th><th>images</th><th style="text-align:left">what it means</th></tr>'
        )
        out += [
            f"<tr><td>{_e(reason)}</td><td>{n:,}</td>"
            f'<td style="text-align:left">{_e(DEDUP_REASONS.get(reason, ""))}</td></tr>'
            for reason, n in dedup["by_reason"].items()
        ]
        out.append("</table>")
    if dedup["contaminated_by"]:
        out.append("<h3>Contamination by evaluation set</h3><table>")
        out.append("<tr><th>evaluation set</th><th>training images left out</th></tr>")
        out += [
            f"<tr><td>{_e(root)}</td><td>{n:,}</td></tr>"
            for root, n in dedup["contaminated_by"].items()
        ]
        out.append("</table>")
    if dedup["largest_groups"]:
        out.append("<h3>The largest groups</h3>")
        for group in dedup["largest_groups"]:
            shown = len(group["members"])
            more = f", {shown} shown" if shown < group["images"] else ""
            out.append(
                f'<div class="group"><p class="note">group {_e(group["group_id"])}: '
                f"{group['images']:,} images, {group['kept']:,} kept{more}</p>"
                f'<div class="grid" data-group="{_e(group["group_id"])}">'
            )
            out += [_member_html(member, thumbs) for member in group["members"]]
            out.append("</div></div>")
    if duplicates:
        out.append("<h3>Examples of what is left out</h3>")
        for reason, rows in duplicates.items():
            out.append(f'<h4>{_e(reason)}</h4><div class="grid" data-reason="{_e(reason)}">')
            for row in rows:
                member = dict(row, kept=False, reason=reason)
                out.append(_member_html(member, thumbs))
            out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _member_html(row: dict, thumbs: dict) -> str:
    """One image of a duplicate group: kept, or left out with the reason and the detail."""
    if row.get("kept"):
        badge = '<span class="badge kept">kept</span>'
    elif row.get("kept") is None:
        badge = ""
    else:
        badge = f'<span class="badge dropped">{_e(row.get("reason") or "left out")}</span>'
    lines = [
        '<div class="ex">',
        _image_html(thumbs.get(row["key"]), f"image {row['key']}"),
        f'<div class="badges">{badge}</div>',
        f'<div class="meta">key {_e(row["key"])}</div>',
    ]
    if row.get("detail"):
        lines.append(f'<div class="meta">{_e(row["detail"])}</div>')
    lines.append("</div>")
    return "".join(lines)


def _image_html(thumb: str | None, alt: str) -> str:
    if thumb is None:
        return '<div class="noimg">no image: missing or not decodable</div>'
    return f'<img src="{thumb}" alt="{_e(alt)}" width="128" height="128">'


def _example_html(row: dict, thumbs: dict) -> str:
    badge = (
        '<span class="badge kept">kept</span>'
        if row["kept"]
        else '<span class="badge dropped">dropped</span>'
    )
    if row.get("caption_is_wrong") and row["source"] == "web":
        badge += '<span class="badge wrong">wrong caption</span>'
    lines = [
        '<div class="ex">',
        _image_html(thumbs.get(row["key"]), row["text"]),
        f'<div class="text">{_e(row["text"])}</div>',
        f'<div class="badges">{badge}</div>',
        f'<div class="meta"><b>ITM {score_text(row["itm_score"])}</b> · '
        f"ITC {score_text(row['itc_score'])}"
        + "".join(f" · {_e(c)} {score_text(v)}" for c, v in (row.get("scores") or {}).items())
        + "</div>",
    ]
    if row["source"] == "synthetic" and row.get("web_caption") is not None:
        lines.append(f'<div class="meta">web: {_e(row["web_caption"])}</div>')
    if row["source"] == "web" and row.get("caption_is_wrong") and row.get("true_caption"):
        lines.append(f'<div class="meta">truth: {_e(row["true_caption"])}</div>')
    lines.append(f'<div class="meta">key {_e(row["key"])} · text {_e(row["text_id"])}</div>')
    lines.append("</div>")
    return "".join(lines)


def _examples_html(examples: dict, thumbs: dict) -> str:
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
                out += [_example_html(r, thumbs) for r in rows]
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


def render_html(
    summary: dict,
    examples: dict,
    samples: list[dict],
    thumbs: dict,
    duplicates: dict | None = None,
) -> str:
    """The whole report as one self-contained HTML page (`duplicates`: dedup's examples of
    what it leaves out, per reason)."""
    title = f"capfilt report: {summary['dataset']}"
    body = [
        _stages_html(summary),
        _fetch_html(summary["fetch"]),
        _captions_html(summary["captions"]),
        _scores_html(summary),
        _sweep_html(summary),
        _truth_html(summary),
        _models_html(summary),
        _dedup_html(summary, duplicates or {}, thumbs),
        _examples_html(examples, thumbs),
        _samples_html(samples, thumbs),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>capfilt report</h1><p>{_e(summary['dataset'])} · "
        f"{_e(summary['selection'])} ({_e(summary['threshold_origin'])}) · generated "
        f"{_e(summary['generated'])}</p></header>"
        f"<main>{''.join(body)}</main></body></html>\n"
    )
