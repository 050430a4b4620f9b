"""The dataset report: figures from DuckDB, rich tables for the terminal, one HTML file.

`build_report` gathers every figure once (`collect_summary`), picks kept and dropped examples
per source, and writes `reports/summary.json` and `reports/report.html`. The HTML file is
self-contained: thumbnails are base64 JPEG, histograms are inline SVG, the styles are inline,
there is no script, and a Content-Security-Policy forbids every request that is not a `data:`
image, so opening a report never touches the network."""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import io as _io
import json
import re

from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGES, Dataset, StageFolder
from capfilt.core.sql import check_condition_words
from capfilt.stages.curate import Selection, score_label

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


def resolve_rule(curated: StageFolder, threshold: float | None) -> tuple[Selection, str]:
    """The rule the report judges pairs by, and where it came from ('option': --threshold
    replaces the rule's threshold; 'curated/': the rule curated/ records; 'default': no
    curated/, ITM ≥ 0.5)."""
    rule = curated_rule(curated)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise CapfiltError(
                f"--threshold must be an ITM probability between 0 and 1, got {threshold}"
            )
        return dataclasses.replace(rule or Selection(), threshold=float(threshold)), "option"
    if rule is not None:
        return rule, "curated/"
    return Selection(threshold=DEFAULT_THRESHOLD), "default"


def curated_rule(curated: StageFolder) -> Selection | None:
    """The rule a generation of curated/ was made by, if it records one. A --where from the
    record is checked again before it goes into the report's SQL (the file may be edited)."""
    rule = Selection.from_record(curated.record.get("options"))
    if rule is not None and rule.where is not None:
        check_condition_words(rule.where)
    return rule


def curated_threshold(curated: StageFolder) -> float | None:
    """The threshold a generation of curated/ was made at, if it records one."""
    rule = Selection.from_record(curated.record.get("options"))
    return rule.threshold if rule is not None else None


def passes_sql(rule: Selection) -> str:
    """The rule's conditions other than the ITM threshold, as SQL over scores/ (true when it
    has none): the top fraction's `by >= cut-off`, the --where condition; with --best-by,
    the threshold too (keep-best ranks by another column among the pairs at it)."""
    parts = []
    if rule.best_by is not None and rule.threshold is not None:
        parts.append(f"itm_score >= {float(rule.threshold)!r}")
    if rule.top_fraction is not None and rule.cutoff is not None:
        parts.append(f'"{rule.by}" >= {float(rule.cutoff)!r}')
    if rule.where is not None:
        parts.append(f"(\n{rule.where}\n)")
    return f"coalesce({' AND '.join(parts)}, false)" if parts else "true"


def judged_scores(rule: Selection, missing: tuple[tuple[str, str], ...] = ()) -> str:
    """scores/ as a subquery with `passes` (the rule's conditions other than the ITM
    threshold: `passes_sql`) and `best`: whether a pair is among the `keep_best` synthetic
    pairs of highest ITM (or --best-by) of its image among those that pass, ranked as
    `capfilt filter --keep-best` ranks them (always true for web pairs, and for every pair
    without keep-best). A pair is kept at the rule's threshold T when `itm_score >= T AND
    passes AND best`. Ranked by ITM, the ranking needs no T, as the pairs at or above any T
    come first in it; ranked by another column (--best-by) it is made at T (`at_threshold`).
    `missing`: (name, Arrow type) of score columns no shard has, as nulls (a rule may name
    them)."""
    padded = "".join(f", NULL::{_SQL_TYPES.get(kind, 'VARCHAR')} AS {c}" for c, kind in missing)
    source = f"(SELECT *{padded} FROM scores)" if missing else "scores"
    passes = passes_sql(rule)
    if rule.keep_best is None:
        return f"(SELECT *, {passes} AS passes, true AS best FROM {source})"
    rank = f'"{rule.rank_column}"'
    return (
        f"(SELECT *, {passes} AS passes, source <> 'synthetic' OR row_number() OVER "
        f"(PARTITION BY key, source, {passes} ORDER BY {rank} DESC NULLS LAST, text_id) "
        f"<= {int(rule.keep_best)} AS best FROM {source})"
    )


def at_threshold(rule: Selection, threshold: float, missing: tuple = ()) -> str:
    """`judged_scores` of `rule` with its ITM threshold set to `threshold` (the sweep)."""
    return judged_scores(dataclasses.replace(rule, threshold=threshold), missing)


def kept_sql(threshold: float | None, alias: str = "s") -> str:
    """Whether a row of `judged_scores` is kept at `threshold` (None: no ITM threshold)."""
    # A pair without an ITM score (its image undecodable) is never kept, as in curated/.
    at = (
        f"{alias}.itm_score IS NOT NULL"
        if threshold is None
        else f"{alias}.itm_score >= {float(threshold)!r}"
    )
    return f"({at} AND {alias}.passes AND {alias}.best)"


_SQL_TYPES = {"float": "FLOAT", "double": "DOUBLE", "bool": "BOOLEAN", "int32": "INTEGER"}


def missing_score_columns(con) -> tuple[tuple[str, str], ...]:
    """(name, Arrow type) of the columns of SCORES_SCHEMA that no scores/ shard has (an old
    dataset's clip_score)."""
    from capfilt.core import parquet as io

    present = view_columns(con, "scores")
    return tuple((f.name, str(f.type)) for f in io.SCORES_SCHEMA if f.name not in present)


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
    dataset: Dataset, rule: Selection, threshold_origin: str, con, folders: dict
) -> dict:
    """Every figure of the report, as a JSON-ready dict (this is reports/summary.json).

    `rule`: the rule pairs are judged by (`resolve_rule`). `folders`: the stage folders
    `con`'s views read (one generation of curated/).
    """
    stages = {stage: folders[stage].shards() for stage in STAGES}
    threshold = rule.threshold
    summary: dict = {
        "dataset": dataset.root,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threshold": threshold,
        "threshold_origin": threshold_origin,
        "filter_threshold": curated_threshold(folders["curated"]),
        # The report applies curated/'s --keep-best, top fraction and --where at its own
        # threshold too.
        "keep_best": rule.keep_best,
        "best_by": rule.rank_column,
        "rule": rule.record(),
        "selection": rule.describe(".2f"),
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
        "score_columns": {},
        "truncated": None,
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
    missing = missing_score_columns(con) if stages["scores"] else ()
    judged = judged_scores(rule, missing) if stages["scores"] else None
    if stages["scores"]:
        summary["scores"] = _score_figures(con, threshold, judged)
        summary["sweep"] = _sweep(con, rule, missing)
        summary["histograms"] = _histograms(con)
        summary["score_columns"] = score_column_figures(con)
        summary["truncated"] = _truncated(con)
        if stages["images"] and {"caption_is_wrong"} <= view_columns(con, "images"):
            summary["truth"] = _truth_figures(con, rule, summary["sweep"], missing)
    if folders.get("dedup") is not None and folders["dedup"].shards():
        summary["dedup"] = dedup_figures(con, folders["dedup"], threshold, judged)
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


def dedup_figures(
    con, folder: StageFolder, threshold: float | None, scores_sql: str | None
) -> dict:
    """What dedup/ keeps and leaves out, and why: totals, images per reason, groups, the
    largest groups with their images, contamination per evaluation set, and the pairs the rule
    keeps (`scores_sql`: `judged_scores`; None without scores/) that curated/ leaves out because
    their image goes."""
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
    if scores_sql is not None:
        figures["pairs_left_out"] = con.execute(
            f"SELECT count(*) FROM {scores_sql} s JOIN dedup d USING (key) "
            f"WHERE NOT d.kept AND {kept_sql(threshold)}"
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


def _score_figures(con, threshold: float | None, judged: str) -> dict:
    """Pairs, means of every score column and pairs kept per source (`judged`:
    `judged_scores`)."""
    columns = [c for c in score_columns_of(con) if c not in ("itm_score", "itc_score")]
    extra = "".join(f', avg("{c}") AS "mean_{c}"' for c in columns)
    kept = kept_sql(threshold)
    rows = _rows(
        con,
        "SELECT source, count(*) AS pairs, count(itm_score) AS scored, "
        f"avg(itm_score) AS mean_itm, avg(itc_score) AS mean_itc{extra}, "
        f"count(*) FILTER (WHERE {kept}) AS kept, "
        f"count(DISTINCT key) AS images FROM {judged} s "
        "GROUP BY source ORDER BY source <> 'web', source",
    )
    kept_images = con.execute(
        f"SELECT count(DISTINCT key) FROM {judged} s WHERE {kept}"
    ).fetchone()[0]
    by_source = {}
    for r in rows:
        means = {"itm_score": r["mean_itm"], "itc_score": r["mean_itc"]}
        means.update({c: r[f"mean_{c}"] for c in columns})
        by_source[r["source"]] = {
            "pairs": r["pairs"],
            "scored": r["scored"],
            "images": r["images"],
            "mean_itm": _rounded(r["mean_itm"]),
            "mean_itc": _rounded(r["mean_itc"]),
            "means": {c: _rounded(v) for c, v in means.items()},
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


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def score_columns_of(con) -> list[str]:
    """The score columns of the scores view (its floating-point columns, with values or
    not), itm_score first."""
    found = con.execute("DESCRIBE scores").fetchall()
    floats = [name for name, kind, *_ in found if kind in ("FLOAT", "DOUBLE")]
    return sorted(floats, key=lambda c: (c != "itm_score", c != "itc_score"))


def _sweep(con, rule: Selection, missing: tuple = ()) -> list[dict]:
    """How many pairs each threshold of SWEEP_THRESHOLDS would keep with the rest of the rule,
    per source. Ranked by ITM one query answers every threshold; by another column, one query
    a threshold (`judged_scores`)."""
    if rule.best_by is None:
        rows = _rows(
            con,
            "SELECT t.threshold, s.source, count(*) AS pairs, "
            "count(*) FILTER (WHERE s.itm_score >= t.threshold AND s.passes AND s.best) AS kept "
            f"FROM {judged_scores(rule, missing)} s, "
            "(SELECT unnest($1::DOUBLE[]) AS threshold) t GROUP BY ALL ORDER BY ALL",
            [list(SWEEP_THRESHOLDS)],
        )
    else:
        rows = [
            dict(r, threshold=t)
            for t in SWEEP_THRESHOLDS
            for r in _rows(
                con,
                f"SELECT s.source, count(*) AS pairs, count(*) FILTER (WHERE {kept_sql(t)}) "
                f"AS kept FROM {at_threshold(rule, t, missing)} s GROUP BY ALL ORDER BY ALL",
            )
        ]
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


def score_column_figures(con) -> dict:
    """Every score column of scores/ that has values (itm_score, itc_score, clip_score,
    siglip_score, …): its range, and per source the pairs with a value, their mean and a
    histogram in HISTOGRAM_BINS equal bins over the range ([0, 1] for ITM)."""
    figures = {}
    for column in score_columns_of(con):
        c = f'"{column}"'
        valid = f"{c} IS NOT NULL AND NOT isnan({c})"
        low, high = con.execute(f"SELECT min({c}), max({c}) FROM scores WHERE {valid}").fetchone()
        if low is None:
            continue  # the column is there, with no value (not asked for)
        if column == "itm_score":
            low, high = 0.0, 1.0
        width = (high - low) or 1.0
        by_source = {
            r["source"]: {"pairs": r["n"], "mean": _rounded(r["mean"]), "histogram": []}
            for r in _rows(
                con,
                f"SELECT source, count(*) AS n, avg({c}) AS mean FROM scores WHERE {valid} "
                "GROUP BY source ORDER BY source <> 'web', source",
            )
        }
        for source in by_source.values():
            source["histogram"] = [0] * HISTOGRAM_BINS
        bins = _rows(
            con,
            f"SELECT source, least(greatest(floor(({c} - $1) / $2 * $3), 0), $3 - 1)::INTEGER "
            f"AS bin, count(*) AS n FROM scores WHERE {valid} GROUP BY ALL",
            [low, width, HISTOGRAM_BINS],
        )
        for r in bins:
            by_source[r["source"]]["histogram"][r["bin"]] += r["n"]
        figures[column] = {
            "label": score_label(column),
            "range": [float(low), float(low + width)],
            "by_source": by_source,
        }
    return figures


def _truncated(con) -> dict | None:
    """Pairs whose text a scorer cut to its window, per source; None without the column."""
    if "truncated" not in view_columns(con, "scores"):
        return None
    rows = _rows(
        con,
        "SELECT source, count(*) FILTER (WHERE truncated) AS truncated, count(truncated) AS "
        "known FROM scores GROUP BY source ORDER BY source <> 'web', source",
    )
    return {r["source"]: {"truncated": r["truncated"], "pairs": r["known"]} for r in rows}


def _truth_counts(con, threshold: float | None, judged: str | None = None) -> dict:
    """Of the web captions: the wrong ones, those the rule drops at `threshold` (`judged`:
    `judged_scores`; None: the threshold alone), and the wrong ones among those."""
    judged = judged or judged_scores(Selection())
    dropped = f"NOT {kept_sql(threshold)} AND s.itm_score IS NOT NULL"
    wrong, dropped, caught = con.execute(
        "SELECT count(*) FILTER (WHERE i.caption_is_wrong), "
        f"count(*) FILTER (WHERE {dropped}), "
        f"count(*) FILTER (WHERE i.caption_is_wrong AND {dropped}) "
        f"FROM {judged} s JOIN images i USING (key) WHERE s.source = 'web'"
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


def _truth_figures(con, rule: Selection, sweep: list[dict], missing: tuple = ()) -> dict:
    """How well the filter catches the wrong web captions of a toy web (truth columns)."""
    threshold, judged = rule.threshold, judged_scores(rule, missing)
    web_pairs = con.execute("SELECT count(*) FROM scores WHERE source = 'web'").fetchone()[0]
    figures = {
        "web_pairs": web_pairs,
        "auc": _ranking_auc(con),
        **_truth_counts(con, threshold, judged),
    }
    for entry in sweep:
        t = entry["threshold"]
        counts = _truth_counts(con, t, at_threshold(rule, t, missing))
        entry["precision"], entry["recall"] = counts["precision"], counts["recall"]
    if "wrong_kind" in view_columns(con, "images"):
        kinds = _rows(
            con,
            "SELECT i.wrong_kind AS kind, count(*) AS wrong, "
            f"count(*) FILTER (WHERE NOT {kept_sql(threshold)} AND s.itm_score IS NOT NULL) "
            f"AS caught FROM {judged} s JOIN images i USING (key) "
            "WHERE s.source = 'web' AND i.caption_is_wrong GROUP BY ALL ORDER BY wrong DESC, kind",
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
    threshold: float | None,
    per_group: int,
    image_columns: set[str] | None,
    keep_best: int | None = None,
    rule: Selection | None = None,
) -> dict:
    """Kept and dropped pairs per source: the clearest ones and the ones nearest the threshold.

    Returns {source: {group: [row, ...]}} with the groups of EXAMPLE_GROUPS, each sorted by
    ITM score from high to low; `kept` says on which side a row is. When one side has fewer
    than 2 × per_group pairs, its borderline and clearest groups split them, so no pair shows
    twice. With `keep_best`, a synthetic pair at or above the threshold but not among the best
    of its image is dropped; `rule`: the whole rule (its threshold is `threshold`).
    """
    rule = rule if rule is not None else Selection(keep_best=keep_best)
    kept = kept_sql(threshold)
    sides = {"kept": kept, "dropped": f"(s.itm_score IS NOT NULL AND NOT {kept})"}
    scores = judged_scores(rule, missing_score_columns(con))
    columns = f"s.key, s.text_id, s.source, s.text, s.itm_score, s.itc_score, {kept} AS kept"
    others = [c for c in score_columns_of(con) if c not in ("itm_score", "itc_score")]
    columns += "".join(f', s."{c}"' for c in others)
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
                f"SELECT count(*) FROM {scores} s WHERE s.source = $1 AND {where}", [source]
            ).fetchone()[0]
            near = min(per_group, (total + 1) // 2)
            sizes[side] = {"near": near, "far": min(per_group, total - near)}
        groups = {}
        for group, side, order, end in plan:
            rows = _rows(
                con,
                f"SELECT {columns} FROM {scores} s {join} "
                f"WHERE s.source = $1 AND {sides[side]} "
                f"ORDER BY s.itm_score {order}, s.key {order}, s.text_id {order} LIMIT $2",
                [source, sizes[side][end]],
            )
            for row in rows:
                row["scores"] = {c: row.pop(c) for c in others if row.get(c) is not None}
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
