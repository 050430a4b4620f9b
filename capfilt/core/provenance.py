"""What made each shard: its provenance, stored beside it, and the check that says whether a
shard is done for a run.

    captions/00003.parquet
    captions/.provenance/00003.json
        {"stage": "caption", "shard": 3,
         "file": "sha256:…",                     the shard file it describes
         "options": {"model_revision": …, "num_captions": 3, …},
         "inputs": {"images": "sha256:…"},       fingerprints of exactly what was read
         "run": "20261202T061502Z-4f1c2a", "written": …, "rows": 42, "counts": {…}}

A shard is done only when its file exists, its provenance describes that very file, its
options are this run's and its inputs are the input shards as they are now. The provenance is
written before the shard file is renamed into place: a kill in between leaves a provenance
that does not describe the file there, which reads as "interrupted", never as done.
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from dataclasses import asdict, dataclass, field

from capfilt.core import parquet
from capfilt.core.layout import ShardFolder, shard_name

FORMAT = 1

DONE, PENDING, STALE = "done", "pending", "stale"
# An option value this machine cannot tell (a hub model's commit when it is not cached here):
# it matches whatever the shards recorded.
UNRESOLVED = "(not resolvable here)"
# Why a shard is stale; the runner redoes all but OPTIONS (and, for fetch and ingest, INPUTS),
# which it refuses without --overwrite.
OPTIONS, INPUTS, INTERRUPTED, UNKNOWN = "options", "inputs", "interrupted", "unknown"


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


@dataclass
class Provenance:
    """The provenance of one shard file."""

    stage: str
    shard: int
    file: str  # fingerprint of the shard file this describes
    options: dict
    inputs: dict  # input name (a folder, or "url_list", ...) -> fingerprint, None if absent
    run: str
    written: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    rows: int | None = None
    counts: dict = field(default_factory=dict)  # the stage's counters of this shard
    format: int = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Provenance | None:
        try:
            raw = json.loads(data)
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            record = cls(**known)
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(record.options, dict) or not isinstance(record.inputs, dict):
            return None
        return record


def read(folder: ShardFolder, shard: int) -> Provenance | None:
    """The provenance stored beside a shard; None when there is none or it cannot be read."""
    for legacy in (False, True):  # datasets written before kept it in _provenance/
        try:
            with folder.fs.open(folder.provenance_path(shard, legacy), "rb") as f:
                return Provenance.from_bytes(f.read())
        except FileNotFoundError:
            continue
    return None


def write(folder: ShardFolder, shard: int, provenance: Provenance) -> None:
    path = folder.provenance_path(shard)
    folder.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    parquet.write_bytes_atomic(folder.fs, path, provenance.to_bytes())


@dataclass
class ShardCheck:
    """Whether one output shard is done for a run, and if not, why."""

    shard: int
    state: str  # DONE, PENDING or STALE
    cause: str | None = None  # for STALE: OPTIONS, INPUTS, INTERRUPTED or UNKNOWN
    why: str = ""
    changed_options: dict = field(default_factory=dict)  # name -> (old, new)
    provenance: Provenance | None = None


def check(
    folder: ShardFolder,
    shard: int,
    options: dict | None,
    inputs: dict,
    file: str | None = None,
    provenance: Provenance | None = None,
) -> ShardCheck:
    """Check one output shard against this run's `options` and the `inputs` as they are now.

    `options` None skips the comparison of options (`capfilt status` has none of its own).
    `file`/`provenance`: already read by the caller (the shard's fingerprint and record).
    """
    file = file if file is not None else folder.fingerprint(shard)
    if file is None:
        return ShardCheck(shard, PENDING, why="not written yet")
    if file.startswith(parquet.UNREADABLE):
        why = file.partition("(")[2][:-1] or "not a Parquet file"
        return ShardCheck(
            shard, STALE, INTERRUPTED, f"damaged, {why}: delete it and run its stage again"
        )
    provenance = provenance or read(folder, shard)
    if provenance is None:
        return ShardCheck(
            shard,
            STALE,
            UNKNOWN,
            "no provenance (written by another tool or an older capfilt)",
        )
    if provenance.file != file:
        return ShardCheck(
            shard,
            STALE,
            INTERRUPTED,
            "the file is not the one its provenance describes (a write was interrupted)",
            provenance=provenance,
        )
    changed_inputs = input_changes(provenance.inputs, inputs)
    changed = option_changes(provenance.options, options) if options is not None else {}
    if changed_inputs:
        return ShardCheck(
            shard, STALE, INPUTS, "; ".join(changed_inputs), changed, provenance=provenance
        )
    if changed:
        why = "made with " + ", ".join(f"{k} {_show(old)}" for k, (old, _) in changed.items())
        return ShardCheck(shard, STALE, OPTIONS, why, changed, provenance=provenance)
    return ShardCheck(shard, DONE, provenance=provenance)


def option_changes(old: dict, new: dict) -> dict:
    """name -> (old value, new value) of every option that differs."""
    missing = object()
    changes = {}
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, missing), new.get(name, missing)
        if after == UNRESOLVED:
            continue
        if before != after:
            changes[name] = (
                None if before is missing else before,
                None if after is missing else after,
            )
    return changes


def input_changes(recorded: dict, now: dict) -> list[str]:
    """Human reasons for every input that is not the one the shard was made from."""
    reasons = []
    for name in sorted(set(recorded) | set(now)):
        before, after = recorded.get(name), now.get(name)
        if before == after:
            continue
        label = {"url_list": "the URL list", "source": "SOURCE"}.get(name, f"{name}/")
        shard = "" if label in ("the URL list", "SOURCE") else " shard"
        if after is None:
            reasons.append(f"{label}{shard} it was made from is gone")
        elif before is None:
            reasons.append(f"{label}{shard} appeared since")
        else:
            reasons.append(f"{label} changed since")
    return reasons


def describe_changes(changes: dict, names: dict | None = None) -> str:
    """'--num-captions 10 → 1, --top-p 0.9 → 0.95' (`names`: option → its flag)."""
    names = names or {}
    return ", ".join(
        f"{names.get(k, k)} {_show(old)} → {_show(new)}" for k, (old, new) in changes.items()
    )


def shard_list(shards: list[int], limit: int = 8) -> str:
    """'00001, 00003, 00004 and 2 more'"""
    names = [shard_name(s) for s in shards[:limit]]
    more = len(shards) - limit
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value) if (" " in value or not value) else value
    if value is None:
        return "(none)"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def folder_fingerprint(folder) -> str | None:
    """One fingerprint of every shard of a folder (None when it has none): the input of an
    output made from a whole folder at once (dedup/ of hashes/, the report)."""
    shards = folder.shards()
    if not shards:
        return None
    parts = [
        f"{shard}:{parquet.file_fingerprint(folder.fs, folder.shard_path(shard))}"
        for shard in shards
    ]
    return parquet.bytes_fingerprint("\n".join(parts).encode())


WHOLE = "/*"  # an input named "hashes/*": every shard of hashes/ (`folder_fingerprint`)


def stale_shards(dataset, name: str, shards, folder=None, memo: dict | None = None) -> list:
    """(shard, why) of each of `shards` of folder `name` that is stale (`stale_ancestor`)."""
    memo = {} if memo is None else memo
    return [
        (shard, why)
        for shard in shards
        if (why := stale_ancestor(dataset, name, shard, folder, memo))
    ]


def stale_ancestor(dataset, name: str, shard: int, folder=None, memo: dict | None = None):
    """Why shard `shard` of folder `name` no longer follows from the data as it is now, or
    None: each input shard it was made from, and recursively each of theirs, must still be the
    shard its provenance names (images/ re-fetched under captions/ under scores/ under
    curated/ makes all three stale). `folder`: the folder of `name` already resolved (one
    generation of curated/). Shards without provenance (another tool's) are not checked."""
    from capfilt.core.layout import STAGE_FOLDERS

    memo = {} if memo is None else memo
    if (name, shard) in memo:
        return memo[(name, shard)]
    folder = folder or dataset.folder(name)
    record = read(folder, shard)
    why = None
    for upstream, fingerprint in (record.inputs if record else {}).items():
        whole = upstream.endswith(WHOLE)
        base = upstream.removesuffix(WHOLE)
        if base not in STAGE_FOLDERS:
            continue  # an outside source (a URL list, local files): fetch's and ingest's
        if whole:  # made from every shard of `base` at once (dedup/)
            if (base, WHOLE) not in memo:
                memo[(base, WHOLE)] = folder_fingerprint(dataset.folder(base))
            if memo[(base, WHOLE)] != fingerprint:
                why = f"{base}/ changed since it was made"
        elif dataset.folder(upstream).fingerprint(shard) != fingerprint:
            why = f"{upstream}/ changed since it was made"
        else:
            deeper = stale_ancestor(dataset, upstream, shard, memo=memo)
            why = f"made from {upstream}/, which is stale: {deeper}" if deeper else None
        if why:
            break
    memo[(name, shard)] = why
    return why
