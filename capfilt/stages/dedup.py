"""`capfilt dedup`: each image once, and no evaluation image in the training set.

Two stages through the stage runner, then curated/ again:

1. `HashStage`, images/ shard → hashes/ shard (per shard: resumable, with provenance):
   SHA-256 of the bytes, SHA-256 of the decoded pixels, a 64-bit pHash, the grey-level spread
   and the URL's site of every image (capfilt/dedup/hashing.py), in worker processes.
2. `GroupStage`, every hashes/ shard (+ embeddings/, scores/, the evaluation sets) → dedup/,
   a generation switched in whole (like curated/): duplicate groups across all shards, the
   representative kept of each, and why each other image goes (capfilt/dedup/groups.py,
   semantic.py). Its provenance is its options (thresholds) and a fingerprint of all its
   inputs: a re-run with both unchanged does nothing, other options re-group without
   re-hashing. The grouping of a generation is kept beside its shards
   (`dedup/gen-N/.grouping.parquet`) before any shard is written, so a run killed half-way
   through writing resumes with exactly the same groups.
3. curated/ is derived again (stages/curate.py) at the rule it was made with, leaving out every
   image dedup does not keep; export-data leaves them out as well.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from capfilt.core import distributed, provenance
from capfilt.core import parquet as io
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import Dataset
from capfilt.core.locks import folder_locks
from capfilt.core.options import Options, option
from capfilt.core.provenance import folder_fingerprint
from capfilt.dedup.hashing import HASH_VERSION, HashPool, url_domain
from capfilt.stages.runner import Stage, StageRun, record_run, run_stage

SEMANTIC_MODES = ("auto", "on", "off")
GROUPING_FILE = ".grouping.parquet"  # a generation's whole grouping, beside its shards


@dataclass(frozen=True, kw_only=True)
class DedupOptions(Options):
    """Options of `capfilt dedup`."""

    against: tuple[str, ...] = option(
        (),
        "An evaluation dataset (capfilt's layout) whose images must not be in the training "
        "set: copies and near-copies of them are marked contaminated (repeat for several).",
        flag="--against",
    )
    phash_distance: int = option(
        4,
        "Perceptual near-duplicates: pHashes at most this many bits apart (of 64). 0 turns the "
        "perceptual pass off.",
        ge=0,
        le=12,
    )
    semantic: str = option(
        "auto",
        "Semantic near-duplicates by the filter's image embeddings (embeddings/): auto uses "
        "them where the filter wrote them, on requires them, off skips them.",
        choices=SEMANTIC_MODES,
    )
    semantic_eps: float = option(
        0.05,
        "Semantic near-duplicates: embeddings with cosine similarity at least 1 - eps.",
        gt=0,
        le=1,
    )
    clusters: int | None = option(
        None,
        "k-means clusters of the semantic pass (pairs are searched within a cluster).",
        ge=1,
        cli_default="one per 1,000 embeddings",
    )
    placeholder_domains: int = option(
        5,
        "An image (same bytes or pixels) found under at least this many sites is a "
        "placeholder, and none of its copies is kept.",
        ge=2,
    )
    blank_std: float = option(
        2.0,
        "An image whose grey levels spread less than this (standard deviation, 0-255, of its "
        "32 x 32 thumbnail) is blank: a placeholder.",
        ge=0,
    )
    placeholder_list: str | None = option(
        None,
        "A file of known placeholder images: one SHA-256 (of the bytes or of the pixels) a "
        "line; # starts a comment.",
        cli_default="none",
    )
    workers: int | None = option(
        None,
        "Processes hashing images, and threads of the semantic pass; 0: this process only.",
        ge=0,
        cli_default="the CPU cores",
    )
    overwrite: bool = option(
        False, "Hash every shard again and group again, also when nothing changed."
    )

    def check(self) -> None:
        if self.placeholder_list is not None and not os.path.isfile(self.placeholder_list):
            raise CapfiltError(
                f"--placeholder-list {self.placeholder_list!r} is not a file; pass a text file "
                "with one SHA-256 a line"
            )


# --- 1. hashes/ ---------------------------------------------------------------------------------
def hash_table(images_table, pool: HashPool, on_images=None):
    """The hashes/ table (HASHES_SCHEMA) of one images/ table: one row per row."""
    import pyarrow as pa

    columns = images_table.column_names
    n = images_table.num_rows
    keys = [str(k) for k in images_table["key"].to_pylist()]
    urls = images_table["url"].to_pylist() if "url" in columns else [None] * n
    status = images_table["status"].to_pylist() if "status" in columns else ["success"] * n
    errors = images_table["error_message"].to_pylist() if "error_message" in columns else None
    jpg = images_table["jpg"].to_pylist()
    todo = [i for i in range(n) if status[i] == "success"]
    hashed = dict(zip(todo, pool.hash([jpg[i] for i in todo], on_images), strict=True))
    rows = []
    for i in range(n):
        url = urls[i] if isinstance(urls[i], str) else None
        row = dict(key=keys[i], url=url, domain=url_domain(url))
        found = hashed.get(i)
        if found is None:  # not downloaded: the images/ row says why
            row.update(status=status[i], error_message=errors[i] if errors else None)
        else:
            error = found.pop("error")
            row.update(found, status="error" if error else "success", error_message=error)
        rows.append(row)
    table = io.rows_to_table(rows, io.HASHES_SCHEMA)
    return table if rows else pa.Table.from_batches([], io.HASHES_SCHEMA)


class HashStage(Stage):
    """images/ shard → hashes/ shard: the hashes of every image (capfilt/dedup/hashing.py)."""

    name = "hash"
    output = "hashes"
    inputs = ("images",)
    unit = "images"

    def __init__(self, options, pool: HashPool | None = None):
        super().__init__(options)
        self.pool = pool

    def provenance_options(self) -> dict:
        return {"hashes": HASH_VERSION}

    def work(self, dataset: Dataset, shards: list[int]) -> int:
        from capfilt.images.batches import count_successful

        return count_successful(dataset, shards)

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        if self.pool is None:
            self.pool = HashPool(self.options.workers if self.options else None)

    def process(self, shard: int, inputs: dict, advance):
        return hash_table(inputs["images"], self.pool, advance)

    def count(self, table) -> dict:
        import pyarrow.compute as pc

        status = table["status"]
        return dict(
            images=pc.sum(pc.equal(status, "success")).as_py() or 0,
            errors=pc.sum(pc.equal(status, "error")).as_py() or 0,
        )


# --- 2. dedup/ -----------------------------------------------------------------------------------
def grouping_options(options: DedupOptions) -> dict:
    """The options that shape dedup/ (its provenance)."""
    listed = None
    if options.placeholder_list is not None:
        with open(options.placeholder_list, "rb") as f:
            listed = io.bytes_fingerprint(f.read())
    return dict(
        phash_distance=options.phash_distance,
        semantic=options.semantic,
        semantic_eps=options.semantic_eps,
        clusters=options.clusters,
        placeholder_domains=options.placeholder_domains,
        blank_std=options.blank_std,
        placeholder_list=listed,
        against=list(options.against),
    )


def describe_grouping(options: dict) -> str:
    """dedup/'s options in words: 'pHash ≤ 4 bits, semantic auto (eps 0.05), against 1 set'."""
    parts = [f"pHash ≤ {options.get('phash_distance')} bits"]
    semantic = options.get("semantic")
    parts.append(
        "no semantic pass"
        if semantic == "off"
        else f"semantic {semantic} (eps {options.get('semantic_eps')})"
    )
    against = options.get("against") or []
    if against:
        parts.append(f"against {len(against)} evaluation set{'s' if len(against) > 1 else ''}")
    return ", ".join(parts)


def grouping_inputs(dataset: Dataset, against: list[str], semantic: bool) -> dict:
    """A fingerprint of everything dedup/ is made from, whole: every shard of hashes/, of
    scores/ (which ranks the representatives), of embeddings/ (semantic), and of each
    evaluation set. The names are not folder names: these are not one shard's inputs."""
    inputs = {
        "hashes/*": folder_fingerprint(dataset.folder("hashes")),
        "scores/*": folder_fingerprint(dataset.folder("scores")),
    }
    if semantic:
        inputs["embeddings/*"] = folder_fingerprint(dataset.folder("embeddings"))
    for root in against:
        inputs[f"against {root}"] = evaluation_fingerprint(dataset, root, semantic)
    return inputs


def evaluation_fingerprint(dataset: Dataset, root: str, semantic: bool) -> str:
    """One fingerprint of an evaluation set's images/ (and embeddings/) shards."""
    other = Dataset(root)
    local = other.is_local and dataset.is_local
    if other.root == dataset.root or (local and _same(other, dataset)):
        raise CapfiltError(f"--against {root!r} is the dataset itself; pass an evaluation set")
    images = folder_fingerprint(other.folder("images")) if other.exists() else None
    if images is None:
        raise CapfiltError(
            f"--against {root!r} has no images/ shards: pass a dataset in capfilt's layout "
            "(`capfilt ingest` an evaluation set first)"
        )
    parts = [f"images:{images}"]
    if semantic:
        parts.append(f"embeddings:{folder_fingerprint(other.folder('embeddings'))}")
    return io.bytes_fingerprint("\n".join(parts).encode())


def _same(a: Dataset, b: Dataset) -> bool:
    return os.path.realpath(a.path) == os.path.realpath(b.path)


@dataclass
class Verdicts:
    """The grouping of a whole dataset: its dedup/ table of each shard, and its figures."""

    tables: dict  # shard -> DEDUP_SCHEMA table
    figures: dict = field(default_factory=dict)


class GroupStage(Stage):
    """All hashes/ shards → dedup/ (a generation): duplicate groups across the whole dataset.

    The grouping is global, so it is made once in setup() (or read back from the unfinished
    generation a killed run left); each shard is then one slice of it."""

    name = "dedup"
    output = "dedup"
    inputs = ("hashes",)
    unit = "shards"
    hint = "run `capfilt dedup DATASET`"

    def __init__(self, options: DedupOptions, pool: HashPool | None = None):
        super().__init__(options)
        self.pool = pool
        self._inputs: dict | None = None
        self.verdicts: Verdicts | None = None
        self.grouping_path: str | None = None  # where the generation's grouping is kept
        self.reuse_grouping = True
        self.notes: list[str] = []

    def provenance_options(self) -> dict:
        return grouping_options(self.options)

    def global_inputs(self, dataset: Dataset) -> dict:
        if self._inputs is None:
            semantic = self.options.semantic != "off"
            self._inputs = grouping_inputs(dataset, list(self.options.against), semantic)
        return self._inputs

    def input_fingerprints(self, dataset: Dataset, shard: int) -> dict:
        return dict(self.global_inputs(dataset))

    def read(self, dataset: Dataset, shard: int) -> tuple[dict, dict]:
        return {}, self.input_fingerprints(dataset, shard)

    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        key = io.bytes_fingerprint(
            json.dumps(
                [self.provenance_options(), self.global_inputs(dataset)], sort_keys=True
            ).encode()
        )
        if self.grouping_path and self.reuse_grouping:
            self.verdicts = _read_grouping(dataset, self.grouping_path, key)
        if self.verdicts is None:
            self.verdicts = group_dataset(dataset, self.options, self.pool, self.notes)
            if self.grouping_path:
                _write_grouping(dataset, self.grouping_path, key, self.verdicts)

    def process(self, shard: int, inputs: dict, advance):
        return self.verdicts.tables.get(shard, io.DEDUP_SCHEMA.empty_table())

    def count(self, table) -> dict:
        return verdict_counts(table)


def verdict_counts(table) -> dict:
    """images judged, kept, removed, and removed by reason, of a dedup/ table."""
    import pyarrow.compute as pc

    judged = table.filter(pc.is_valid(table["kept"]))
    kept = pc.sum(judged["kept"]).as_py() or 0
    counts = dict(images=judged.num_rows, kept=kept, removed=judged.num_rows - kept)
    reasons = pc.value_counts(judged["reason"].drop_null()).to_pylist()
    for entry in reasons:
        counts[f"removed_{entry['values']}"] = entry["counts"]
    return counts


def _write_grouping(dataset: Dataset, path: str, key: str, verdicts: Verdicts) -> None:
    import pyarrow as pa

    tables = [
        table.append_column("shard", pa.array([shard] * table.num_rows, pa.int64()))
        for shard, table in sorted(verdicts.tables.items())
    ]
    whole = pa.concat_tables(tables) if tables else io.DEDUP_SCHEMA.empty_table()
    meta = {b"capfilt.grouping": key.encode(), b"capfilt.figures": json.dumps(verdicts.figures)}
    whole = whole.replace_schema_metadata({**(whole.schema.metadata or {}), **meta})
    io.write_table_atomic(dataset.fs, path, whole)


def _read_grouping(dataset: Dataset, path: str, key: str) -> Verdicts | None:
    """The grouping a killed run of this generation kept, if it was made from the same options
    and inputs; else None."""
    import pyarrow.compute as pc

    try:
        whole = io.read_table(dataset.fs, path)
    except (FileNotFoundError, io.UnreadableShard):
        return None
    meta = whole.schema.metadata or {}
    if meta.get(b"capfilt.grouping", b"").decode() != key or "shard" not in whole.column_names:
        return None
    shards = sorted(set(whole["shard"].to_pylist()))
    tables = {
        s: whole.filter(pc.equal(whole["shard"], s)).drop_columns(["shard"]).cast(io.DEDUP_SCHEMA)
        for s in shards
    }
    return Verdicts(tables, json.loads(meta.get(b"capfilt.figures", b"{}")))


# --- the grouping of a whole dataset -------------------------------------------------------------
_NODE_COLUMNS = [
    "key",
    "url",
    "domain",
    "sha256",
    "pixel_sha256",
    "phash",
    "mean_color",
    "width",
    "height",
]


@dataclass
class Evaluation:
    """An evaluation set: the hashes of its images (with bytes) and its embeddings."""

    root: str
    hashes: object  # pyarrow Table, HASHES_SCHEMA rows with bytes
    embeddings: tuple | None = None  # (keys, float16 matrix) when comparable


def read_hashes(dataset: Dataset):
    """Every hashes/ shard of `dataset` as one table, with `shard` and `row` columns."""
    import pyarrow as pa

    folder = dataset.folder("hashes")
    tables = []
    for shard in folder.shards():
        table = folder.read_shard(shard)
        path = folder.shard_path(shard)
        io.check_columns(path, table.column_names, io.REQUIRED_COLUMNS["hashes"])
        table = table.select(io.HASHES_SCHEMA.names).cast(io.HASHES_SCHEMA)
        table = table.append_column("shard", pa.array([shard] * table.num_rows, pa.int64()))
        tables.append(table.append_column("row", pa.array(range(table.num_rows), pa.int64())))
    if not tables:
        raise CapfiltError(f"{dataset.root!r} has no hashes/ shards; run `capfilt dedup` on it")
    return pa.concat_tables(tables)


def read_embeddings(dataset: Dataset):
    """(keys, float16 (N, D) matrix, the options they were made with) of every embeddings/
    shard of `dataset`; None when it has none."""
    import numpy as np
    import pyarrow as pa

    folder = dataset.folder("embeddings")
    shards = folder.shards()
    if not shards:
        return None
    keys, matrices = [], []
    for shard in shards:
        table = folder.read_shard(shard)
        io.check_columns(folder.shard_path(shard), table.column_names, ("key", "embedding"))
        matrix = io.embeddings_matrix(table)
        if len(matrix):
            keys.append(table["key"].combine_chunks().cast(pa.string()))
            matrices.append(matrix)
    if not matrices:
        return None
    if len({m.shape[1] for m in matrices}) > 1:
        raise CapfiltError(
            f"embeddings/ of {dataset.root!r} holds embeddings of several widths (made by "
            "several models?); run `capfilt filter` with --overwrite"
        )
    record = provenance.read(folder, shards[0])
    return pa.concat_arrays(keys), np.concatenate(matrices), (record.options if record else {})


def same_embedding_model(a: dict, b: dict) -> bool:
    """Whether embeddings made with options `a` and `b` can be compared (the same weights)."""
    if a.get("model_revision") and b.get("model_revision"):
        return a["model_revision"] == b["model_revision"]
    return a.get("model") == b.get("model")


def load_evaluation(
    root: str, pool: HashPool, reference: dict | None, notes: list[str]
) -> Evaluation:
    """The hashes of an evaluation set: its own hashes/ shards where they are done, the others
    hashed here (nothing is written there); its embeddings when made by the same model as
    `reference` (the dataset's embeddings' options; None: no semantic pass)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    other = Dataset(root)
    images, hashes = other.folder("images"), other.folder("hashes")
    tables = []
    for shard in images.shards():
        check = provenance.check(
            hashes,
            shard,
            {"hashes": HASH_VERSION},
            {"images": images.fingerprint(shard)},
        )
        if check.state == provenance.DONE:
            table = hashes.read_shard(shard)
        else:
            table = hash_table(images.read_shard(shard), pool)
        tables.append(table.select(io.HASHES_SCHEMA.names).cast(io.HASHES_SCHEMA))
    table = pa.concat_tables(tables)
    table = table.filter(pc.is_valid(table["sha256"]))
    evaluation = Evaluation(root, table)
    if reference is not None:
        found = read_embeddings(other)
        if found is None:
            notes.append(f"{root}: no embeddings/, so no semantic match against it")
        elif not same_embedding_model(found[2], reference):
            notes.append(
                f"{root}: its embeddings/ were made by another model "
                f"({found[2].get('model')}), so no semantic match against it"
            )
        else:
            evaluation.embeddings = found[:2]
    return evaluation


def _known_placeholders(path: str | None) -> list[str]:
    if path is None:
        return []
    found = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            value = line.split("#", 1)[0].strip().lower()
            if value:
                found.append(value)
    return found


def group_dataset(
    dataset: Dataset, options: DedupOptions, pool: HashPool | None, notes: list[str]
) -> Verdicts:
    """Group every image of `dataset` (and of the evaluation sets) and judge each: the dedup/
    table of every hashes/ shard (capfilt/dedup/groups.py has the rules)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from capfilt.dedup.groups import Nodes, codes, group_images

    pool = pool or HashPool(0)
    train = read_hashes(dataset)
    node_rows = np.flatnonzero(pc.is_valid(train["sha256"]).to_numpy(zero_copy_only=False))
    nodes_table = train.take(node_rows).select(_NODE_COLUMNS + ["pixel_std"])
    n_train = nodes_table.num_rows

    embeddings = None
    if options.semantic != "off":
        embeddings = read_embeddings(dataset)
        if embeddings is None:
            if options.semantic == "on":
                raise CapfiltError(
                    f"--semantic on: {dataset.root!r} has no embeddings/; run `capfilt filter` "
                    "first (it writes them), or pass --semantic auto"
                )
            notes.append("no embeddings/ (run `capfilt filter` first): no semantic pass")
    evaluations = [
        load_evaluation(root, pool, embeddings[2] if embeddings else None, notes)
        for root in options.against
    ]
    tables = [nodes_table] + [e.hashes.select(_NODE_COLUMNS + ["pixel_std"]) for e in evaluations]
    everything = pa.concat_tables(tables)
    n = everything.num_rows
    source = np.full(n, -1, dtype=np.int64)
    start = n_train
    for index, evaluation in enumerate(evaluations):
        source[start : start + evaluation.hashes.num_rows] = index
        start += evaluation.hashes.num_rows
    keys = everything["key"].to_pylist()

    def column(name, fill):
        return pc.fill_null(everything[name], fill).to_numpy(zero_copy_only=False)

    listed = _known_placeholders(options.placeholder_list)
    std = column("pixel_std", np.nan).astype(np.float64)
    area = column("width", 0).astype(np.int64) * column("height", 0).astype(np.int64)
    score = np.full(n, np.nan)
    scores = dataset.folder("scores")
    if scores.shards():
        best = (
            scores.read_all(["key", "itm_score"]).group_by("key").aggregate([("itm_score", "max")])
        )
        where = pc.index_in(everything["key"].slice(0, n_train), value_set=best["key"])
        found = best["itm_score_max"].take(pc.fill_null(where, 0))
        values = pc.if_else(pc.is_valid(where), found, None)
        score[:n_train] = pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False)
    rank = np.empty(n, dtype=np.int64)
    rank[pc.sort_indices(everything["key"]).to_numpy()] = np.arange(n)
    nodes = Nodes(
        keys=keys,
        sha256=codes(everything["sha256"]),
        pixel_sha256=codes(everything["pixel_sha256"]),
        phash=column("phash", 0).astype(np.int64).view(np.uint64),
        has_phash=pc.is_valid(everything["phash"]).to_numpy(zero_copy_only=False),
        color=column("mean_color", 0).astype(np.int64),
        url=codes(everything["url"]),
        domain=codes(everything["domain"]),
        score=score,
        area=area,
        rank=rank,
        blank=np.nan_to_num(std, nan=np.inf) <= options.blank_std,
        listed=(
            pc.is_in(everything["sha256"], value_set=pa.array(listed, pa.string()))
            .to_numpy(zero_copy_only=False)
            .astype(bool)
            | pc.is_in(everything["pixel_sha256"], value_set=pa.array(listed, pa.string()))
            .to_numpy(zero_copy_only=False)
            .astype(bool)
        ),
        source=source,
        pixel_std=std,
    )

    semantic, similarity, figures = None, None, {}
    if embeddings is not None:
        semantic, similarity, figures = _semantic_edges(
            everything, n_train, embeddings, evaluations, options
        )

    def describe(node: int) -> str:
        if source[node] < 0:
            return str(keys[node])
        return f"{keys[node]} of {evaluations[source[node]].root}"

    grouping = group_images(
        nodes,
        options.phash_distance,
        options.placeholder_domains,
        semantic=semantic,
        similarity=similarity,
        describe_key=describe,
    )
    figures.update(grouping.counts)

    # Back to the rows of each shard: rows without image bytes have no verdict.
    rows = train.num_rows
    out = {
        "group_id": np.full(rows, -1, dtype=np.int64),
        "group_size": np.zeros(rows, dtype=np.int64),
        "kept": np.zeros(rows, dtype=bool),
    }
    judged = np.zeros(rows, dtype=bool)
    judged[node_rows] = True
    out["group_id"][node_rows] = grouping.group[:n_train]
    out["group_size"][node_rows] = grouping.group_size[:n_train]
    out["kept"][node_rows] = grouping.kept[:n_train]
    text = {name: [None] * rows for name in ("representative", "reason", "detail")}
    text["against"], text["against_key"] = [None] * rows, [None] * rows
    for node, row in enumerate(node_rows.tolist()):
        rep = grouping.representative[node]
        text["representative"][row] = keys[rep] if rep >= 0 else None
        text["reason"][row] = grouping.reason[node]
        text["detail"][row] = grouping.detail[node]
        match = grouping.against[node]
        if match >= 0:
            text["against"][row] = evaluations[source[match]].root
            text["against_key"][row] = keys[match]
    whole = pa.table(
        {
            "key": train["key"],
            "group_id": pa.array(out["group_id"], mask=~judged),
            "group_size": pa.array(out["group_size"].astype(np.int32), mask=~judged),
            "representative": pa.array(text["representative"], pa.string()),
            "kept": pa.array(out["kept"], mask=~judged),
            "reason": pa.array(text["reason"], pa.string()),
            "detail": pa.array(text["detail"], pa.string()),
            "against": pa.array(text["against"], pa.string()),
            "against_key": pa.array(text["against_key"], pa.string()),
        },
        schema=io.DEDUP_SCHEMA,
    )
    shard_of = train["shard"].to_numpy()
    tables = {}
    for shard in np.unique(shard_of).tolist():
        tables[shard] = whole.filter(pa.array(shard_of == shard))
    figures["evaluation_images"] = {e.root: e.hashes.num_rows for e in evaluations}
    return Verdicts(tables, figures)


def _semantic_edges(everything, n_train: int, embeddings, evaluations, options: DedupOptions):
    """(node pairs, similarity function, figures) of the semantic pass over the dataset's
    embeddings and the comparable evaluation sets'."""
    import numpy as np
    import pyarrow.compute as pc

    from capfilt.dedup.semantic import cosine, semantic_pairs

    keys, matrix, _ = embeddings
    parts, node_of_row = [], []
    where = pc.index_in(keys, value_set=everything["key"].slice(0, n_train))
    found = pc.is_valid(where).to_numpy(zero_copy_only=False)
    parts.append(matrix[found])
    node_of_row.append(pc.drop_null(where).to_numpy().astype(np.int64))
    start = n_train
    for evaluation in evaluations:
        size = evaluation.hashes.num_rows
        if evaluation.embeddings is not None:
            eval_keys, eval_matrix = evaluation.embeddings
            if eval_matrix.shape[1] == matrix.shape[1]:
                where = pc.index_in(eval_keys, value_set=evaluation.hashes["key"])
                found = pc.is_valid(where).to_numpy(zero_copy_only=False)
                parts.append(eval_matrix[found])
                node_of_row.append(pc.drop_null(where).to_numpy().astype(np.int64) + start)
        start += size
    stacked = np.concatenate(parts)
    nodes = np.concatenate(node_of_row)
    threads = options.workers if options.workers else None
    found_pairs = semantic_pairs(stacked, options.semantic_eps, options.clusters, threads=threads)
    row_of_node = np.full(everything.num_rows, -1, dtype=np.int64)
    row_of_node[nodes] = np.arange(nodes.size)

    def similarity(a, b):
        ra, rb = row_of_node[a], row_of_node[b]
        if (ra < 0).any() or (rb < 0).any():
            return None
        return cosine(stacked, ra, rb)

    figures = dict(
        embeddings=int(nodes.size),
        clusters=found_pairs.clusters,
        largest_cluster=found_pairs.largest_cluster,
    )
    return (nodes[found_pairs.i], nodes[found_pairs.j]), similarity, figures


# --- the command ---------------------------------------------------------------------------------
@dataclass
class DedupResult:
    """What one `capfilt dedup` run did."""

    hashed: StageRun
    grouped: StageRun
    curated: StageRun | None
    summary: dict
    notes: list[str] = field(default_factory=list)

    @property
    def regrouped(self) -> bool:
        return self.grouped.plan.generation is not None


def dedup_dataset(
    dataset: Dataset | str, options: DedupOptions, progress: bool = True
) -> DedupResult:
    """Hash the shards not hashed yet, group the whole dataset again when its hashes,
    embeddings, scores, evaluation sets or the options changed (a new dedup/ generation), and
    derive curated/ again without the images dedup does not keep; record the run."""
    from capfilt.stages.curate import CurateStage, Selection

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if not ds.exists():
        raise CapfiltError(f"dataset folder {ds.root!r} does not exist; check the path")
    processes = distributed.current()
    if processes.world_size > 1:
        raise CapfiltError(
            "capfilt dedup groups the whole dataset at once: run it as one process (it starts "
            "--workers processes of its own), not under accelerate launch or torchrun"
        )
    ds.read_manifest()  # a damaged manifest stops the run now
    if options.semantic == "on" and not ds.folder("embeddings").shards():
        raise CapfiltError(
            f"--semantic on: {ds.root!r} has no embeddings/; run `capfilt filter` first (it "
            "writes them), or pass --semantic auto"
        )
    for root in options.against:  # before hashing: a wrong path stops the run at once
        evaluation_fingerprint(ds, root, semantic=False)
    ds.ensure_writable("hashes", "dedup", "curated")
    with (
        HashPool(options.workers) as pool,
        folder_locks(ds, ("hashes", "dedup", "curated"), "capfilt dedup", processes),
    ):
        hashed = run_stage(
            HashStage(options, pool), ds, options.overwrite, progress, locked=True, record=False
        )
        stage = GroupStage(options, pool)

        def keep_grouping(plan) -> None:  # in the generation being written, before setup()
            if plan.generation is not None:
                folder = ds.generation_folder("dedup", plan.generation)
                stage.grouping_path = f"{folder.path}/{GROUPING_FILE}"
                stage.reuse_grouping = not options.overwrite

        grouped = run_stage(
            stage,
            ds,
            options.overwrite,
            False,
            locked=True,
            record=False,
            before_work=keep_grouping,
        )
        if stage.grouping_path and ds.fs.exists(stage.grouping_path):
            ds.fs.rm(stage.grouping_path)  # switched in whole: no run needs it any more
        notes = list(stage.notes)
        curated = None
        rule = Selection.from_record((ds.generation_record("curated") or {}).get("options"))
        if ds.folder("scores").shards() and rule is not None:
            try:
                curated = run_stage(
                    CurateStage(rule),
                    ds,
                    False,
                    False,
                    locked=True,
                    record=False,
                )
            except CapfiltError as e:
                notes.append(f"curated/ was not derived again: {e}")
        summary = dedup_summary(ds)
        runs = [hashed, grouped] + ([curated] if curated is not None else [])
        record_run(
            ds,
            "dedup",
            options,
            runs,
            counts={k: v for k, v in summary.items() if isinstance(v, int)},
            regrouped=grouped.plan.generation is not None,
        )
    return DedupResult(hashed, grouped, curated, summary, notes)


def dedup_summary(dataset: Dataset, folder=None) -> dict:
    """Figures of the dedup/ generation readers see (`folder`: one already resolved): images
    judged, kept, removed by reason, groups of more than one image, the largest group, and the
    contaminated images per evaluation set. {} when dedup has not run."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from capfilt.dedup.groups import REASONS

    folder = folder or dataset.folder("dedup")
    shards = folder.shards()
    if not shards:
        return {}
    columns = ["group_id", "group_size", "kept", "reason", "against"]
    table = pa.concat_tables([folder.read_shard(s, columns) for s in shards])
    judged = table.filter(pc.is_valid(table["kept"]))
    kept = pc.sum(judged["kept"]).as_py() or 0
    removed = {reason: 0 for reason in REASONS}
    for entry in pc.value_counts(judged["reason"].drop_null()).to_pylist():
        removed[entry["values"]] = entry["counts"]
    groups = judged.filter(pc.greater(judged["group_size"], 1))
    against: dict = {}
    for entry in pc.value_counts(judged["against"].drop_null()).to_pylist():
        against[entry["values"]] = entry["counts"]
    largest = pc.max(judged["group_size"]).as_py() if judged.num_rows else 0
    return dict(
        generation=folder.generation,
        options=folder.record.get("options") or {},
        images=judged.num_rows,
        kept=kept,
        removed=judged.num_rows - kept,
        removed_by_reason=removed,
        groups=len(set(groups["group_id"].to_pylist())),
        images_in_groups=groups.num_rows,
        largest_group=largest or 0,
        contaminated_by=against,
    )
