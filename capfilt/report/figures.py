"""The dataset report: figures from DuckDB, rich tables for the terminal, one HTML file.

`build_report` gathers every figure once (`collect_summary`), picks kept and dropped examples
per source, and writes `reports/summary.json` and `reports/report.html`. The HTML file is
self-contained: thumbnails are base64 JPEG, histograms are inline SVG, the styles are inline,
there is no script, and a Content-Security-Policy forbids every request that is not a `data:`
image, so opening a report never touches the network."""

from __future__ import annotations

import base64
import datetime as _dt
import io as _io
import json
import re

from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGES, Dataset, StageFolder
from capfilt.stages.curate import describe_selection

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


def resolve_threshold(curated: StageFolder, threshold: float | None) -> tuple[float, str]:
    """The threshold to report at, and where it came from ('option', 'curated/', 'default')."""
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise CapfiltError(
                f"--threshold must be an ITM probability between 0 and 1, got {threshold}"
            )
        return float(threshold), "option"
    kept_at = curated_threshold(curated)
    if kept_at is not None:
        return kept_at, "curated/"
    return DEFAULT_THRESHOLD, "default"


def curated_threshold(curated: StageFolder) -> float | None:
    """The threshold a generation of curated/ was made at, if it records one."""
    value = (curated.record.get("options") or {}).get("threshold")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def curated_keep_best(curated: StageFolder) -> int | None:
    """The --keep-best a generation of curated/ was made with, None when it kept every caption
    at the threshold."""
    value = (curated.record.get("options") or {}).get("keep_best")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def judged_scores(keep_best: int | None) -> str:
    """scores/ as a subquery with `best`: whether a pair is among the `keep_best` synthetic
    pairs of highest ITM of its image, ranked as `capfilt filter --keep-best` ranks them
    (always true for web pairs, and for every pair without keep-best). A pair is kept at a
    threshold T when `itm_score >= T AND best`: the ranking needs no T, as the pairs at or
    above any T come first in it."""
    if keep_best is None:
        return "(SELECT *, true AS best FROM scores)"
    return (
        "(SELECT *, source <> 'synthetic' OR row_number() OVER (PARTITION BY key, source "
        f"ORDER BY itm_score DESC NULLS LAST, text_id) <= {int(keep_best)} AS best FROM scores)"
    )


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


def view_columns(con, view: str) -> set[str]:
    return {row[0] for row in con.execute(f"DESCRIBE {view}").fetchall()}


def _rows(con, sql: str, params: list | None = None) -> list[dict]:
    result = con.execute(sql, params or [])
    names = [d[0] for d in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def collect_summary(
    dataset: Dataset, threshold: float, threshold_origin: str, con, folders: dict
) -> dict:
    """Every figure of the report, as a JSON-ready dict (this is reports/summary.json).

    `folders`: the stage folders `con`'s views read (one generation of curated/).
    """
    stages = {stage: folders[stage].shards() for stage in STAGES}
    keep_best = curated_keep_best(folders["curated"])
    summary: dict = {
        "dataset": dataset.root,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_origin": threshold_origin,
        "filter_threshold": curated_threshold(folders["curated"]),
        # The report applies curated/'s --keep-best at its own threshold too.
        "keep_best": keep_best,
        "selection": describe_selection(threshold, keep_best, ".2f"),
        "curated_generation": folders["curated"].generation,
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
        "dedup": None,
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
        summary["scores"] = _score_figures(con, threshold, keep_best)
        summary["sweep"] = _sweep(con, keep_best)
        summary["histograms"] = _histograms(con)
        if stages["images"] and {"caption_is_wrong"} <= view_columns(con, "images"):
            summary["truth"] = _truth_figures(con, threshold, summary["sweep"])
    if folders.get("dedup") is not None and folders["dedup"].shards():
        summary["dedup"] = dedup_figures(con, folders["dedup"], threshold, bool(stages["scores"]))
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


# Why dedup leaves an image out, in the report's words.
DEDUP_REASONS = {
    "exact": "the same bytes as the image kept",
    "pixels": "the same pixels as the image kept (another file of the same picture)",
    "perceptual": "a perceptual near-duplicate (pHash) of the image kept: re-encoded, resized",
    "semantic": "a semantic near-duplicate (embedding) of the image kept: cropped, edited",
    "placeholder": "a placeholder: blank, listed, or one image behind many sites",
    "contaminated": "a copy or near-copy of an evaluation image",
}
LARGEST_GROUPS, GROUP_MEMBERS = 5, 8


def dedup_figures(con, folder: StageFolder, threshold: float, has_scores: bool) -> dict:
    """What dedup/ keeps and leaves out, and why: totals, images per reason, groups, the
    largest groups with their images, contamination per evaluation set, and the pairs at the
    threshold that curated/ leaves out because their image goes."""
    judged, kept, removed = con.execute(
        "SELECT count(kept), count(*) FILTER (WHERE kept), count(*) FILTER (WHERE NOT kept) "
        "FROM dedup"
    ).fetchone()
    by_reason = {
        r["reason"]: r["n"]
        for r in _rows(
            con,
            "SELECT reason, count(*) AS n FROM dedup WHERE reason IS NOT NULL "
            "GROUP BY reason ORDER BY n DESC, reason",
        )
    }
    groups, in_groups = con.execute(
        "SELECT count(DISTINCT group_id), count(*) FROM dedup WHERE group_size > 1"
    ).fetchone()
    largest = _rows(
        con,
        "SELECT group_id, count(*) AS images, count(*) FILTER (WHERE kept) AS kept "
        "FROM dedup WHERE group_size > 1 GROUP BY group_id "
        "ORDER BY images DESC, group_id LIMIT $1",
        [LARGEST_GROUPS],
    )
    for group in largest:
        group["members"] = _rows(
            con,
            "SELECT key, kept, reason, detail FROM dedup WHERE group_id = $1 "
            "ORDER BY kept DESC, key LIMIT $2",
            [group["group_id"], GROUP_MEMBERS],
        )
    against = {
        r["against"]: r["n"]
        for r in _rows(
            con,
            "SELECT against, count(*) AS n FROM dedup WHERE against IS NOT NULL "
            "GROUP BY against ORDER BY n DESC, against",
        )
    }
    figures = {
        "generation": folder.generation,
        "options": folder.record.get("options") or {},
        "images": judged,
        "kept": kept,
        "removed": removed,
        "removed_rate": rate(removed, judged),
        "by_reason": by_reason,
        "groups": groups,
        "images_in_groups": in_groups,
        "largest_groups": largest,
        "contaminated_by": against,
        "pairs_left_out": None,
    }
    if has_scores:
        figures["pairs_left_out"] = con.execute(
            "SELECT count(*) FROM scores s JOIN dedup d USING (key) "
            "WHERE NOT d.kept AND s.itm_score >= $1",
            [threshold],
        ).fetchone()[0]
    return figures


def dedup_examples(con, per_reason: int) -> dict[str, list[dict]]:
    """Some images dedup leaves out, per reason, with what they duplicate."""
    examples = {}
    for reason in DEDUP_REASONS:
        rows = _rows(
            con,
            "SELECT key, representative, detail, against, against_key FROM dedup "
            "WHERE reason = $1 ORDER BY key LIMIT $2",
            [reason, per_reason],
        )
        if rows:
            examples[reason] = rows
    return examples


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
        "success_rate": rate(success, total),
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


def _score_figures(con, threshold: float, keep_best: int | None) -> dict:
    scores = judged_scores(keep_best)
    rows = _rows(
        con,
        "SELECT source, count(*) AS pairs, count(itm_score) AS scored, "
        "avg(itm_score) AS mean_itm, avg(itc_score) AS mean_itc, "
        "count(*) FILTER (WHERE itm_score >= $1 AND best) AS kept, "
        f"count(DISTINCT key) AS images FROM {scores} "
        "GROUP BY source ORDER BY source <> 'web', source",
        [threshold],
    )
    kept_images = con.execute(
        f"SELECT count(DISTINCT key) FROM {scores} WHERE itm_score >= $1 AND best", [threshold]
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
            "kept_rate": rate(r["kept"], r["pairs"]),
        }
    pairs = sum(s["pairs"] for s in by_source.values())
    kept = sum(s["kept"] for s in by_source.values())
    return {
        "pairs": pairs,
        "kept": kept,
        "kept_rate": rate(kept, pairs),
        "images_with_a_kept_pair": kept_images,
        "by_source": by_source,
    }


def _sweep(con, keep_best: int | None) -> list[dict]:
    """How many pairs each threshold of SWEEP_THRESHOLDS would keep, per source."""
    rows = _rows(
        con,
        "SELECT t.threshold, s.source, count(*) AS pairs, "
        "count(*) FILTER (WHERE s.itm_score >= t.threshold AND s.best) AS kept "
        f"FROM {judged_scores(keep_best)} s, (SELECT unnest($1::DOUBLE[]) AS threshold) t "
        "GROUP BY ALL ORDER BY ALL",
        [list(SWEEP_THRESHOLDS)],
    )
    sweep: dict[float, dict] = {}
    for r in rows:
        t = round(r["threshold"], 4)
        entry = sweep.setdefault(t, {"threshold": t, "by_source": {}, "_pairs": 0})
        entry["by_source"][r["source"]] = {
            "kept": r["kept"],
            "kept_rate": rate(r["kept"], r["pairs"]),
        }
        entry["_pairs"] += r["pairs"]
    for entry in sweep.values():
        entry["kept"] = sum(s["kept"] for s in entry["by_source"].values())
        entry["kept_rate"] = rate(entry["kept"], entry.pop("_pairs"))
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
        "precision": rate(caught, dropped),
        "recall": rate(caught, wrong),
    }


def _ranking_auc(con) -> float | None:
    """The chance that a right web caption scores above a wrong one (ROC AUC, ties half): how
    well ITM ranks them whatever the threshold. From the rank sum of the right ones."""
    right, wrong, rank_sum = con.execute(
        "WITH ranked AS ("
        "  SELECT NOT i.caption_is_wrong AS is_right, "
        "  rank() OVER (ORDER BY s.itm_score) "
        "  + (count(*) OVER (PARTITION BY s.itm_score) - 1) / 2.0 AS r "
        "  FROM scores s JOIN images i USING (key) "
        "  WHERE s.source = 'web' AND s.itm_score IS NOT NULL "
        "  AND i.caption_is_wrong IS NOT NULL) "
        "SELECT count(*) FILTER (WHERE is_right), count(*) FILTER (WHERE NOT is_right), "
        "sum(r) FILTER (WHERE is_right) FROM ranked"
    ).fetchone()
    if not right or not wrong:
        return None
    return float((rank_sum - right * (right + 1) / 2) / (right * wrong))


def _truth_figures(con, threshold: float, sweep: list[dict]) -> dict:
    """How well the filter catches the wrong web captions of a toy web (truth columns)."""
    web_pairs = con.execute("SELECT count(*) FROM scores WHERE source = 'web'").fetchone()[0]
    figures = {"web_pairs": web_pairs, "auc": _ranking_auc(con), **_truth_counts(con, threshold)}
    for entry in sweep:
        counts = _truth_counts(con, entry["threshold"])
        entry["precision"], entry["recall"] = counts["precision"], counts["recall"]
    if "wrong_kind" in view_columns(con, "images"):
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
                "recall": rate(k["caught"], k["wrong"]),
            }
            for k in kinds
        }
    return figures


def pick_examples(
    con,
    threshold: float,
    per_group: int,
    image_columns: set[str] | None,
    keep_best: int | None = None,
) -> dict:
    """Kept and dropped pairs per source: the clearest ones and the ones nearest the threshold.

    Returns {source: {group: [row, ...]}} with the groups of EXAMPLE_GROUPS, each sorted by
    ITM score from high to low; `kept` says on which side a row is. When one side has fewer
    than 2 × per_group pairs, its borderline and clearest groups split them, so no pair shows
    twice. With `keep_best`, a synthetic pair at or above the threshold but not among the best
    of its image is dropped.
    """
    kept = "(s.itm_score >= $2 AND s.best)"
    sides = {"kept": kept, "dropped": f"(s.itm_score IS NOT NULL AND NOT {kept})"}
    scores = judged_scores(keep_best)
    columns = f"s.key, s.text_id, s.source, s.text, s.itm_score, s.itc_score, {kept} AS kept"
    join = ""
    if image_columns is not None:
        join = "LEFT JOIN images i USING (key)"
        columns += ", i.caption AS web_caption"
        if "caption_is_wrong" in image_columns:
            columns += ", i.caption_is_wrong"
            columns += ", i.true_caption" if "true_caption" in image_columns else ""
    # (group, side, order from the threshold outwards or from the far end)
    plan = (
        ("kept_top", "kept", "DESC", "far"),
        ("kept_borderline", "kept", "ASC", "near"),
        ("dropped_borderline", "dropped", "DESC", "near"),
        ("dropped_bottom", "dropped", "ASC", "far"),
    )
    examples: dict = {}
    for source in SOURCES:
        sizes = {}
        for side, where in sides.items():
            total = con.execute(
                f"SELECT count(*) FROM {scores} s WHERE s.source = $1 AND {where}",
                [source, threshold],
            ).fetchone()[0]
            near = min(per_group, (total + 1) // 2)
            sizes[side] = {"near": near, "far": min(per_group, total - near)}
        groups = {}
        for group, side, order, end in plan:
            rows = _rows(
                con,
                f"SELECT {columns} FROM {scores} s {join} "
                f"WHERE s.source = $1 AND {sides[side]} "
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
        "AND key IS NOT NULL ORDER BY key LIMIT $1",
        [count],
    )


def thumbnails(con_with_images, keys: set[str]) -> dict[str, str | None]:
    """`data:` URIs of small JPEG thumbnails by key; None where the bytes are not an image."""
    keys = {key for key in keys if key is not None}  # a row without a key has no image to show
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
    from capfilt.images.decode import decode_image

    decoded = decode_image(image_bytes)  # upright 8-bit RGB, as the models saw it
    if not decoded.ok:
        return None
    img = decoded.image
    img.thumbnail((side, side))
    buf = _io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# evaluate's JSON keys and how the report names them (the captioning block when present).
RETRIEVAL_DIRECTIONS = (("image_to_text", "i→t"), ("text_to_image", "t→i"))
CAPTION_METRICS = (
    ("bleu4", "BLEU-4"),
    ("cider", "CIDEr"),
    ("meteor", "METEOR"),
    ("spice", "SPICE"),
)


def model_metrics(result: dict) -> dict[str, float]:
    """The figures of one `capfilt evaluate` result, flat and named: "i→t R@1", ..., "CIDEr"."""
    metrics = {}
    for key, short in RETRIEVAL_DIRECTIONS:
        for name, value in (result.get(key) or {}).items():
            metrics[f"{short} {name}"] = value
    captioning = result.get("captioning") or {}
    for key, name in CAPTION_METRICS:
        if captioning.get(key) is not None:
            metrics[name] = captioning[key]
    return metrics


def read_evaluations(specs) -> dict[str, dict]:
    """LABEL=FILE specs → {label: that evaluate JSON}, in the order given."""
    found = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label.strip() or not path:
            raise CapfiltError(f"--evaluation takes LABEL=FILE (noisy=eval/web.json), not {spec!r}")
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            raise CapfiltError(f"--evaluation {spec!r}: cannot read {path!r}: {e}") from e
        if not isinstance(result, dict) or not model_metrics(result):
            raise CapfiltError(
                f"--evaluation {spec!r}: {path!r} is not a result of `capfilt evaluate --out`"
            )
        found[label.strip()] = result
    return found


def compare_models(evaluations: dict[str, dict]) -> dict | None:
    """The report's table of models: {"metrics": names, "models": {label: {name: value}}}; a
    metric only some models have is shown for all (blank where missing)."""
    if not evaluations:
        return None
    rows = {label: model_metrics(result) for label, result in evaluations.items()}
    names = list(dict.fromkeys(name for metrics in rows.values() for name in metrics))
    return {"metrics": names, "models": rows}
