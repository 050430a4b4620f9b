"""curated/: the pairs of scores/ that the selection rule keeps, derived without a model.

The rule (`Selection`) has up to three conditions, and a pair is kept when it meets every one
that is set (AND):
  threshold       its ITM probability is ≥ T (`--threshold`, BLIP's CapFilt);
  top fraction    its score in one column (`--by`: itm_score, itc_score, clip_score, …) is
                  among the top F of the whole dataset's scored pairs (`--top-fraction`,
                  DataComp's "top 30 % by CLIP score"): ≥ the cut-off, the value of the
                  ⌈F·n⌉-th highest of the n pairs that have one, so ties at the cut-off are
                  all kept. The cut-off is found over every scores/ shard (`score_cutoff`) and
                  recorded with the rule: a shard rescored anywhere that moves it makes every
                  curated/ shard stale;
  where           DuckDB's WHERE of an SQL condition over the score columns (`--where`), in a
                  sandboxed connection (core/sql.py: one condition, no files, no subqueries).
Then with --keep-best K, of each image's synthetic captions only the K of highest ITM (or
of another score column, --best-by) among those kept are kept (generate many, keep the best:
BLIP-2 kept 2 by ITM, LAION-COCO 1 of 40 by CLIP). The web caption is judged by the
conditions alone. A run writes a new generation of curated/ and
switches it in whole (see core/layout.py), so a reader sees one rule's pairs, never a mix.

curated/ holds CURATED_SCHEMA's columns, then every other score column of its scores/ shard
(itc_score, and clip_score, siglip_score, truncated where scores/ has them), so a curated set
can be queried and ranked by them; readers that want CURATED_SCHEMA select it.

Images that `capfilt dedup` does not keep (a duplicate of another image kept, a placeholder,
a copy of an evaluation image: dedup/ `kept` false) are left out of curated/, whatever their
scores: dedup/ shard N is read beside scores/ shard N, and a new dedup/ generation makes
curated/ stale (the dedup command re-derives it at once). The top fraction is of the pairs in
scores/, images that dedup leaves out included, so its cut-off does not move with dedup.

Keep-best ranks an image's captions within one scores/ shard, and that shard holds all of
them: scores/ shard N is made from images/ shard N and captions/ shard N alone
(stages/filter.py), and an image's key is in one images/ shard only (img2dataset's key, and
ingest's, is the shard number followed by the row). tests/test_filter.py checks it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction

from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.stages.runner import Stage

SOURCES = ("web", "synthetic")
# The option that makes a score column that the filter writes only when asked.
SCORER_FLAGS = {"clip_score": "--clip-model", "siglip_score": "--siglip-model"}
# How tables head the score columns they know; another column goes by its name.
SCORE_LABELS = {
    "itm_score": "ITM",
    "itc_score": "ITC",
    "clip_score": "CLIP",
    "siglip_score": "SigLIP",
}


def score_label(column: str) -> str:
    """'ITM' for itm_score, 'CLIP' for clip_score; another column as it is named."""
    return SCORE_LABELS.get(column, column)


@dataclass(frozen=True)
class Selection:
    """The rule curated/ is derived by (see the module docstring); None: that part is unset."""

    threshold: float | None = None
    top_fraction: float | None = None
    by: str | None = None  # the score column of the top fraction
    where: str | None = None
    keep_best: int | None = None
    best_by: str | None = None  # the score column keep-best ranks by (None: itm_score)
    cutoff: float | None = None  # the top fraction's cut-off, once found in scores/

    @classmethod
    def of(cls, options) -> Selection:
        """The rule of `capfilt filter`'s options (FilterOptions); --by is itm_score unless
        given."""
        if isinstance(options, Selection):
            return options
        top_fraction = getattr(options, "top_fraction", None)
        by = getattr(options, "by", None)
        return cls(
            threshold=options.threshold,
            top_fraction=top_fraction,
            by=(by or "itm_score") if top_fraction is not None else None,
            where=getattr(options, "where", None),
            keep_best=options.keep_best,
            best_by=_not_itm(getattr(options, "best_by", None)),
        )

    @classmethod
    def from_record(cls, options: dict | None) -> Selection | None:
        """The rule a curated/ provenance or current.json records, None when it holds none."""
        options = options if isinstance(options, dict) else {}

        def number(name: str) -> float | None:
            value = options.get(name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return float(value) if ok else None

        def text(name: str) -> str | None:
            value = options.get(name)
            return value if isinstance(value, str) and value else None

        by, best_by = text("by"), text("best_by")
        by = by if by is not None and by.isidentifier() else None  # they go into SQL
        best_by = best_by if best_by is not None and best_by.isidentifier() else None

        keep_best = options.get("keep_best")
        rule = cls(
            threshold=number("threshold"),
            top_fraction=number("top_fraction"),
            by=by,
            where=text("where"),
            keep_best=keep_best
            if isinstance(keep_best, int) and not isinstance(keep_best, bool)
            else None,
            best_by=_not_itm(best_by),
            cutoff=number("cutoff"),
        )
        if rule.top_fraction is not None and rule.by is None:
            rule = dataclasses.replace(rule, top_fraction=None, cutoff=None)
        return rule if rule.has_condition else None

    @property
    def has_condition(self) -> bool:
        return any(v is not None for v in (self.threshold, self.top_fraction, self.where))

    def record(self) -> dict:
        """The rule as curated/'s provenance records it: only the parts set, so that curated/
        derived by a threshold alone (before the other rules existed) is still done for it."""
        options: dict = {}
        if self.threshold is not None:
            options["threshold"] = self.threshold
        if self.top_fraction is not None:
            options.update(top_fraction=self.top_fraction, by=self.by, cutoff=self.cutoff)
        if self.where is not None:
            options["where"] = self.where
        if self.keep_best is not None:
            options["keep_best"] = self.keep_best
            if self.best_by is not None:
                options["best_by"] = self.best_by
        return options

    @property
    def rank_column(self) -> str:
        """The score column keep-best ranks an image's synthetic captions by."""
        return self.best_by or "itm_score"

    def describe(self, precision: str = "g") -> str:
        return describe_selection(self.record(), precision)

    def resolved(self, scores_folder) -> Selection:
        """The rule with its top fraction's cut-off found over every shard of `scores_folder`."""
        if self.top_fraction is None:
            return self
        cutoff = score_cutoff(scores_folder, self.by, self.top_fraction)
        return dataclasses.replace(self, cutoff=cutoff)


def describe_selection(options: dict, precision: str = "g") -> str:
    """A recorded rule (`Selection.record`) in words: 'threshold 0.5', 'threshold 0.5, best 2
    synthetic per image', 'top 30% by clip_score (cut-off 0.2871), where source = 'web''."""
    rule = Selection.from_record(options)
    if rule is None:
        return "no rule"
    parts = []
    if rule.threshold is not None:
        parts.append(f"threshold {rule.threshold:{precision}}")
    if rule.top_fraction is not None:
        top = f"top {rule.top_fraction * 100:.4g}% by {rule.by}"
        parts.append(top if rule.cutoff is None else f"{top} (cut-off {rule.cutoff:.4g})")
    if rule.where is not None:
        parts.append(f"where {rule.where}")
    if rule.keep_best is not None:
        by = f" by {rule.best_by}" if rule.best_by is not None else ""
        parts.append(f"best {rule.keep_best} synthetic per image{by}")
    return ", ".join(parts)


def _not_itm(column: str | None) -> str | None:
    """keep-best's column as recorded: None for itm_score, so that a rule of before
    --best-by existed is recorded as it was."""
    return None if column in (None, "itm_score") else column


# --- the columns -------------------------------------------------------------------------------
def score_columns(schema) -> list[str]:
    """The score columns of a scores/ schema: its floating-point columns, in order."""
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_floating(f.type)]


def curated_columns(schema) -> list[str]:
    """curated/'s columns for a scores/ table of `schema`: CURATED_SCHEMA's, then its other
    score columns and flags (itc_score, clip_score, siglip_score, truncated)."""
    import pyarrow as pa

    base = io.CURATED_SCHEMA.names
    extra = [
        f.name
        for f in schema
        if f.name not in base and (pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))
    ]
    return [*base, *extra]


def with_score_columns(table):
    """`table` (a scores/ shard) with every column of SCORES_SCHEMA it lacks as nulls: a shard
    scored before clip_score existed has none, and a rule reading it keeps none of its pairs."""
    import pyarrow as pa

    for f in io.SCORES_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def shard_schema(folder, shard: int):
    """The schema of one shard of `folder`, from its footer (one small read)."""
    import pyarrow.parquet as pq

    with folder.fs.open(folder.shard_path(shard), "rb") as f:
        return pq.read_schema(f)


def shard_schemas(dataset: Dataset) -> list:
    """The schema of each scores/ shard written so far; a damaged shard is left to the
    filter's own checks, which name it."""
    import pyarrow as pa

    folder = dataset.folder("scores")
    schemas = []
    for shard in folder.shards():
        try:
            schemas.append(shard_schema(folder, shard))
        except (OSError, ValueError, pa.ArrowException):
            continue
    return schemas


def has_values(folder, column: str) -> bool:
    """Whether some shard of `folder` has a value (not null) in `column`, by the statistics
    of its footer; a shard without statistics counts as having one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in folder.shards():
        try:
            with folder.fs.open(folder.shard_path(shard), "rb") as f:
                metadata = pq.ParquetFile(f).metadata
        except (OSError, ValueError, pa.ArrowException):
            continue
        names = metadata.schema.names
        if column not in names:
            continue
        index = names.index(column)
        for group in range(metadata.num_row_groups):
            chunk = metadata.row_group(group).column(index)
            stats = chunk.statistics
            if stats is None or not stats.has_null_count or stats.null_count < chunk.num_values:
                return True
    return False


def scores_schema(dataset: Dataset):
    """The columns scores/ has or will have: SCORES_SCHEMA's and any other of its shards."""
    import pyarrow as pa

    fields = {f.name: f for f in io.SCORES_SCHEMA}
    for schema in shard_schemas(dataset):
        for one in schema:
            fields.setdefault(one.name, one.remove_metadata())
    return pa.schema(list(fields.values()))


def check_selection(rule: Selection, dataset: Dataset, options=None) -> None:
    """Refuse, before a model loads, a rule that names a column scores/ cannot have: --by not
    a score column (or one this run will not write and no shard has), a --where that is not
    one condition over the columns of scores/ (core/sql.py)."""
    if not rule.has_condition:
        raise CapfiltError(
            "capfilt filter needs a rule: --threshold T, --top-fraction F --by COLUMN or "
            "--where SQL (they combine with AND)"
        )
    schema = scores_schema(dataset)
    ranked = [("--by", rule.by)] if rule.top_fraction is not None else []
    ranked += [("--best-by", rule.best_by)] if rule.best_by is not None else []
    for flag, column in ranked:
        _check_score_column(flag, column, schema, dataset, options)
    if rule.where is not None:
        from capfilt.core.sql import check_condition

        check_condition(rule.where, schema)


def _check_score_column(flag: str, column: str, schema, dataset: Dataset, options) -> None:
    """`column` (of --by, --best-by) is a score column of scores/ with values, or one this run
    writes."""
    scores = score_columns(schema)
    if column not in scores:
        raise CapfiltError(
            f"{flag} {column}: not a score column of scores/ (they are {', '.join(scores)})"
        )
    scorer = SCORER_FLAGS.get(column)
    option = scorer[2:].replace("-", "_") if scorer else None
    asked = option is not None and getattr(options, option, None) is not None
    if scorer and not asked and not has_values(dataset.folder("scores"), column):
        raise CapfiltError(
            f"{flag} {column}: scores/ has no {column} yet; pass {scorer} MODEL to score it"
        )


# --- the top fraction --------------------------------------------------------------------------
def top_count(fraction: float, n: int) -> int:
    """How many of n pairs the top `fraction` keeps: ⌈fraction · n⌉, in exact decimal
    arithmetic (0.1 · 10 is 1, not 2), at least 1 of a non-empty set."""
    return max(1, math.ceil(Fraction(str(fraction)) * n)) if n else 0


def cutoff_of(values, fraction: float) -> float | None:
    """The cut-off of the top `fraction` of `values` (numpy floats; NaN apart): the value of
    the ⌈fraction · n⌉-th highest, None when there is none."""
    import numpy as np

    values = values[~np.isnan(values)]
    k = top_count(fraction, len(values))
    if k == 0:
        return None
    return float(np.partition(values, len(values) - k)[len(values) - k])


def score_cutoff(scores_folder, column: str, fraction: float) -> float:
    """The cut-off of the top `fraction` of every scored pair of scores/ by `column`: one pass
    over that column of each shard, 8 bytes a pair in memory. Exact, so every process and
    every run finds the same value from the same scores."""
    import numpy as np

    parts = []
    for shard in scores_folder.shards():
        if column not in shard_schema(scores_folder, shard).names:
            continue  # scored before this column existed: no value
        table = io.read_table(scores_folder.fs, scores_folder.shard_path(shard), [column])
        parts.append(table[column].to_numpy(zero_copy_only=False).astype(np.float64))
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    cutoff = cutoff_of(values, fraction)
    if cutoff is None:
        flag = SCORER_FLAGS.get(column)
        hint = f"; pass {flag} MODEL to score it" if flag else ""
        raise CapfiltError(f"--by {column}: no pair of scores/ has a {column}{hint}")
    return cutoff


# --- curating ----------------------------------------------------------------------------------
def curate(scores_table, rule: Selection | float, keep_best: int | None = None):
    """The scored pairs of a scores/ table that `rule` keeps (a number: the threshold alone,
    with `keep_best`), with curated/'s columns (`curated_columns`), in their order in scores/.
    A top fraction without a cut-off takes the top of this table alone."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(rule, Selection):
        rule = Selection(threshold=rule, keep_best=keep_best)
    table = scores_table
    mask = pc.is_valid(table["itm_score"])  # a pair not scored (undecodable image) never is
    if rule.threshold is not None:
        at_threshold = pc.greater_equal(table["itm_score"], rule.threshold)
        mask = pc.and_(mask, pc.fill_null(at_threshold, False))
    if rule.top_fraction is not None:
        padded = with_score_columns(table)
        column = padded[rule.by] if rule.by in padded.column_names else None
        cutoff = rule.cutoff
        if cutoff is None and column is not None:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)
            cutoff = cutoff_of(values, rule.top_fraction)
        if column is None or cutoff is None:
            mask = pa.array(np.zeros(table.num_rows, dtype=bool))
        else:
            mask = pc.and_(mask, pc.fill_null(pc.greater_equal(column, cutoff), False))
    if rule.where is not None:
        from capfilt.core.sql import where_rows

        chosen = np.zeros(table.num_rows, dtype=bool)
        chosen[where_rows(with_score_columns(table), rule.where)] = True
        mask = pc.and_(mask, pa.array(chosen))
    kept = table.filter(mask)
    if rule.keep_best is not None:
        ranked = with_score_columns(kept) if rule.rank_column not in kept.column_names else kept
        kept = kept.filter(best_synthetic(ranked, rule.keep_best, rule.rank_column))
    columns = curated_columns(kept.schema)
    kept = kept.select(columns)
    base = io.CURATED_SCHEMA
    return kept.cast(
        pa.schema([base.field(n) if n in base.names else kept.schema.field(n) for n in columns])
    )


def dropped_keys(dedup_table):
    """The keys of a dedup/ table whose image dedup does not keep."""
    import pyarrow.compute as pc

    dropped = pc.fill_null(pc.invert(dedup_table["kept"]), False)
    return dedup_table["key"].filter(dropped)


def without_dropped(table, dedup_table):
    """The rows of `table` (scores/ or curated/) whose image dedup keeps: all of them when
    dedup has not run (`dedup_table` None). Whole images go, so keep-best is unaffected."""
    import pyarrow.compute as pc

    if dedup_table is None:
        return table
    return table.filter(pc.invert(pc.is_in(table["key"], dropped_keys(dedup_table))))


def best_synthetic(pairs, keep_best: int, by: str = "itm_score"):
    """A mask over `pairs` (scores/ rows): every web pair, and of each image's synthetic pairs
    the `keep_best` of highest score in column `by` (ITM; CLIP to rerank as LAION-COCO did),
    a pair without one last. A tie goes to the lower text_id (the earlier caption), so the
    same scores always keep the same pairs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = np.ones(pairs.num_rows, dtype=bool)
    is_synthetic = pc.fill_null(pc.equal(pairs["source"], "synthetic"), False)
    synthetic = np.flatnonzero(is_synthetic.to_numpy())  # row numbers in `pairs`
    if len(synthetic) == 0:
        return pa.array(keep)
    candidates = pairs.select(["key", by, "text_id"]).take(synthetic)
    order = pc.sort_indices(
        candidates,
        sort_keys=[("key", "ascending"), (by, "descending"), ("text_id", "ascending")],
    ).to_numpy()  # nulls at the end, pyarrow's default
    keys = candidates["key"].take(order).to_numpy()
    # Sorted by image, best first: a pair's rank is its distance from its image's first pair.
    position = np.arange(len(keys))
    first_of_image = np.r_[True, keys[1:] != keys[:-1]]
    rank = position - np.maximum.accumulate(np.where(first_of_image, position, 0))
    keep[synthetic[order[rank >= keep_best]]] = False
    return pa.array(keep)


class CurateStage(Stage):
    """scores/ shard → curated/ shard (of a new generation): the pairs the rule keeps.

    `options`: the filter's options, or a `Selection` (dedup derives curated/ again by the
    rule curated/ records)."""

    name = "curate"
    output = "curated"
    inputs = ("scores",)
    optional_inputs = ("dedup",)
    hint = "run `capfilt filter DATASET --threshold T` first"
    unit = "shards"

    def __init__(self, options):
        super().__init__(options)
        self.rule = Selection.of(options) if options is not None else None

    def shards(self, dataset: Dataset) -> list[int]:
        shards = super().shards(dataset)
        # Planning starts here: a top fraction's cut-off is part of the rule, and it is found
        # in scores/ as it is now (after this run's scoring).
        if self.rule is not None:
            self.rule = self.rule.resolved(self.folder(dataset, "scores"))
        return shards

    def provenance_options(self) -> dict:
        return self.rule.record()

    def settled(self, options: dict) -> dict:
        # The main process planned: under accelerate every process curates by its cut-off.
        self.rule = dataclasses.replace(self.rule, cutoff=options.get("cutoff"))
        return options

    def process(self, shard: int, inputs: dict, advance):
        # Shard-local keep-best is per image: a scores/ shard holds every caption of its images.
        scores = without_dropped(inputs["scores"], inputs.get("dedup"))
        return curate(scores, self.rule)

    def count(self, curated) -> dict:
        return {"pairs": curated.num_rows}


@dataclass
class SourceSummary:
    """Scores of one caption source over the whole dataset, and what curated/ keeps."""

    pairs: int = 0
    scored: int = 0
    kept: int = 0
    means: dict[str, float | None] = field(default_factory=dict)  # score column -> its mean

    @property
    def mean_itm(self) -> float | None:
        return self.means.get("itm_score")

    @property
    def mean_itc(self) -> float | None:
        return self.means.get("itc_score")


def source_summaries(dataset: Dataset) -> dict[str, SourceSummary]:
    """Per source (web, synthetic): pairs, and the mean of every score column of scores/
    (over the pairs that have one); pairs kept in curated/."""
    import pyarrow.compute as pc

    scores = dataset.folder("scores")
    curated = dataset.folder("curated")
    summaries = {source: SourceSummary() for source in SOURCES}
    sums: dict[str, dict[str, list]] = {source: {} for source in SOURCES}  # column -> [sum, n]
    for shard in scores.shards():
        columns = score_columns(shard_schema(scores, shard))
        table = scores.read_shard(shard, ["source", *columns])
        for source in SOURCES:
            rows = table.filter(pc.equal(table["source"], source))
            summary = summaries[source]
            summary.pairs += rows.num_rows
            summary.scored += rows.num_rows - rows["itm_score"].null_count
            for column in columns:
                values = pc.drop_null(rows[column])
                total = sums[source].setdefault(column, [0.0, 0])
                total[0] += pc.sum(values).as_py() or 0.0
                total[1] += len(values)
    for shard in curated.shards():
        table = curated.read_shard(shard, ["source"])
        for source in SOURCES:
            summaries[source].kept += pc.sum(pc.equal(table["source"], source)).as_py() or 0
    for source, summary in summaries.items():
        summary.means = {
            column: (total / n if n else None) for column, (total, n) in sums[source].items()
        }
    return summaries
