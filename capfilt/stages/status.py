"""`capfilt status DATASET`: each stage folder's shards as done, stale or pending, and why.

A shard is checked as the stage that writes it checks it before a run (core/provenance.py):
its file against its provenance, and the input shards it was made from against the input
shards as they are now. Without a command's options to compare with, the options of a folder's
most recently written shard stand for the folder's: shards made with other options (a run
killed half-way through an --overwrite, two runs at once) show as stale, naming the options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from capfilt.core import provenance
from capfilt.core.errors import CapfiltError
from capfilt.core.layout import STAGE_FOLDERS, Dataset
from capfilt.core.provenance import DONE, PENDING, STALE, UNKNOWN

FOLDERS = ("images", "captions", "scores", "embeddings", "hashes", "dedup", "curated", "reports")
# Folders of optional steps: not run is not pending (a dataset needs no dedup to be whole).
OPTIONAL = ("embeddings", "hashes")


@dataclass
class FolderStatus:
    """The shards of one stage folder, by state, with the reasons of those not done."""

    folder: str
    shards: int = 0
    done: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)  # no input shard any more
    reasons: dict[str, list[int]] = field(default_factory=dict)  # "stale: why" -> shards
    note: str = ""  # e.g. "generation 3, threshold 0.4"
    options: dict = field(default_factory=dict)  # of the newest shard

    @property
    def up_to_date(self) -> bool:
        return not (self.stale or self.pending or self.orphans)


@dataclass
class DatasetStatus:
    dataset: str
    folders: list[FolderStatus]

    def folder(self, name: str) -> FolderStatus:
        return next(f for f in self.folders if f.folder == name)

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_status(dataset: Dataset | str) -> DatasetStatus:
    """Check every shard of every stage folder of `dataset`; nothing is written."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if not ds.exists():
        raise CapfiltError(f"dataset folder {ds.root!r} does not exist; check the path")
    folders = _shard_folders(ds)
    folders["reports"] = _reports(ds)
    return DatasetStatus(ds.root, list(folders.values()))


def downstream_stale(dataset: Dataset) -> dict[str, int]:
    """Shards of the folders made from images/ not done now (after images/ changed)."""
    folders = _shard_folders(dataset)
    return {name: len(f.stale) for name, f in folders.items() if f.stale and name != "images"}


def _shard_folders(ds: Dataset) -> dict[str, FolderStatus]:
    """The stage folders in the order they are made, each checked knowing what is stale
    before it."""
    folders = {"images": _images(ds)}
    for name in ("captions", "scores", "embeddings", "hashes"):
        folders[name] = _derived(ds, name, folders)
    folders["dedup"] = _dedup(ds, folders)
    folders["curated"] = _derived(ds, "curated", folders)
    return folders


def _images(ds: Dataset) -> FolderStatus:
    folder = ds.folder("images")
    shards = folder.shards()
    status = FolderStatus("images", len(shards))
    for shard in shards:
        record = provenance.read(folder, shard)
        # Its source (a URL list, local files) is outside the dataset: only the file is checked.
        inputs = record.inputs if record else {}
        check = provenance.check(folder, shard, None, inputs, provenance=record)
        if check.state == STALE and check.cause == UNKNOWN:
            check = provenance.ShardCheck(shard, DONE)  # another tool's images: nothing to check
        _add(status, check)
        if check.provenance is not None:
            status.options = check.provenance.options
    source = ds.read_manifest().get("source") or {}
    rows, shard_size = source.get("rows"), source.get("shard_size")
    if isinstance(rows, int) and isinstance(shard_size, int) and shard_size > 0:
        expected = set(range(math.ceil(rows / shard_size)))
        missing = sorted(expected - set(shards))
        for shard in missing:
            _add(status, provenance.ShardCheck(shard, PENDING, why="not fetched yet"))
        status.shards = len(expected | set(shards))
        what = source.get("url_list") or source.get("path") or source.get("kind")
        status.note = f"from {what} ({rows} rows)"
    return status


def _derived(ds: Dataset, name: str, upstream: dict) -> FolderStatus:
    """`upstream`: the status of the folders before it; a shard made from a stale input shard
    is stale too, though its own input has not changed yet."""
    stage = _stage_of(name)
    folder = ds.folder(name)
    status = FolderStatus(name)
    if folder.generation:
        from capfilt.stages.curate import Selection

        rule = Selection.from_record(folder.record.get("options"))
        status.note = f"generation {folder.generation}" + (
            f", {rule.describe()}" if rule is not None else ""
        )
    present = folder.shards()
    try:
        shards = stage.shards(ds)
    except CapfiltError:  # its input folder has no shards
        shards = []
    if not present and (not shards or name in OPTIONAL):
        return status  # neither it nor its input has run, or an optional step never ran
    status.shards = len(shards)
    records = {s: provenance.read(folder, s) for s in present}
    newest = max((r for r in records.values() if r), key=lambda r: r.written, default=None)
    reference = dict(folder.record.get("options") or {}) or (newest.options if newest else None)
    status.options = reference or {}
    if name == "curated" and reference:
        reference = _rule_now(ds, reference)
    for shard in shards:
        inputs = stage.input_fingerprints(ds, shard)
        check = provenance.check(folder, shard, reference, inputs, provenance=records.get(shard))
        if check.cause == provenance.OPTIONS and set(check.changed_options) == {"cutoff"}:
            check.why = _moved_cutoff(reference, check.changed_options["cutoff"])
        if check.state == PENDING:
            check.why = f"not {_verb(name)} yet"
        elif check.state == DONE:
            stale_inputs = [i for i in inputs if i in upstream and shard in upstream[i].stale]
            if stale_inputs:
                why = ", ".join(f"{i}/" for i in stale_inputs) + " shard it was made from is stale"
                check = provenance.ShardCheck(shard, STALE, provenance.INPUTS, why)
        _add(status, check)
    status.orphans = sorted(set(present) - set(shards))
    if status.orphans:
        status.reasons.setdefault("orphan: its input shard is gone", []).extend(status.orphans)
    return status


def _rule_now(ds: Dataset, options: dict) -> dict:
    """curated/'s recorded rule with its top fraction's cut-off as scores/ gives it now: a
    shard rescored anywhere may move it, and then every curated/ shard is stale."""
    from capfilt.stages.curate import Selection

    rule = Selection.from_record(options)
    if rule is None or rule.top_fraction is None:
        return options
    try:
        now = rule.resolved(ds.folder("scores"))
    except (CapfiltError, OSError):  # no scores left: the shards say so themselves
        return options
    return dict(options, cutoff=now.cutoff)


def _moved_cutoff(options: dict, change: tuple) -> str:
    old, new = change
    if not (isinstance(old, float) and isinstance(new, float)):
        return f"made with cutoff {old}"
    return (
        f"the cut-off of the top {100 * options['top_fraction']:.4g}% by {options['by']} "
        f"moved from {old:.6g} to {new:.6g} (scores/ changed): run `capfilt filter` to derive "
        "curated/ again"
    )


def _dedup(ds: Dataset, upstream: dict) -> FolderStatus:
    """dedup/ is made from the whole dataset at once: its shards are stale together when any
    hashes/, embeddings/ or scores/ shard, or an evaluation set, changed since."""
    from capfilt.stages.dedup import describe_grouping, grouping_inputs

    status = FolderStatus("dedup")
    folder = ds.folder("dedup")
    if not folder.generation:
        return status
    options = folder.record.get("options") or {}
    status.options = options
    status.note = f"generation {folder.generation}, {describe_grouping(options)}"
    shards = ds.folder("hashes").shards()
    status.shards = len(shards)
    against = [root for root in options.get("against") or [] if isinstance(root, str)]
    try:
        now = grouping_inputs(ds, against, options.get("semantic") != "off")
    except CapfiltError as e:  # an evaluation set is gone
        now = {"against": str(e)}
    records = {s: provenance.read(folder, s) for s in folder.shards()}
    for shard in shards:
        check = provenance.check(folder, shard, None, now, provenance=records.get(shard))
        if check.state == PENDING:
            check.why = "not grouped yet: run `capfilt dedup`"
        elif check.cause == provenance.INPUTS:
            changed = provenance.input_changes(check.provenance.inputs, now)
            check.why = "; ".join(_whole(reason) for reason in changed)
        stale_hashes = upstream["hashes"].stale
        if check.state == DONE and stale_hashes:
            why = (
                f"hashes/ {provenance.shard_list(stale_hashes)} stale (dedup groups every "
                "shard at once): run `capfilt dedup`"
            )
            check = provenance.ShardCheck(shard, STALE, provenance.INPUTS, why)
        _add(status, check)
    status.orphans = sorted(set(records) - set(shards))
    if status.orphans:
        status.reasons.setdefault("orphan: its input shard is gone", []).extend(status.orphans)
    return status


def _whole(reason: str) -> str:
    """'hashes/*/ changed since' → 'hashes/ changed since (dedup reads every shard)'."""
    if "/*/" in reason:
        return reason.replace("/*/", "/") + " (dedup groups every shard at once)"
    return reason.replace("against ", "evaluation set ").replace("/ changed", " changed")


def _reports(ds: Dataset) -> FolderStatus:
    from capfilt.stages.report import report_inputs

    status = FolderStatus("reports")
    record = ds.generation_record("reports")
    if not record:
        return status
    status.shards = 1
    status.note = f"generation {record.get('generation')}"
    folders = {stage: ds.folder(stage) for stage in STAGE_FOLDERS}
    changed = provenance.input_changes(record.get("inputs") or {}, report_inputs(folders))
    if changed:
        status.stale = [0]
        status.reasons["stale: " + "; ".join(changed)] = [0]
    else:
        status.done = [0]
    return status


def _add(status: FolderStatus, check) -> None:
    getattr(status, check.state).append(check.shard)
    if check.state != DONE:
        status.reasons.setdefault(f"{check.state}: {check.why}", []).append(check.shard)


def _stage_of(name: str):
    from capfilt.stages.caption import CaptionStage
    from capfilt.stages.curate import CurateStage
    from capfilt.stages.dedup import HashStage
    from capfilt.stages.filter import EmbedStage, ScoreStage

    stages = {
        "captions": CaptionStage,
        "scores": ScoreStage,
        "embeddings": EmbedStage,
        "hashes": HashStage,
        "curated": CurateStage,
    }
    return stages[name](None)


def _verb(name: str) -> str:
    return {
        "captions": "captioned",
        "scores": "scored",
        "embeddings": "embedded",
        "hashes": "hashed",
        "curated": "curated",
    }[name]


__all__ = ["DONE", "PENDING", "STALE", "DatasetStatus", "FolderStatus", "dataset_status"]
