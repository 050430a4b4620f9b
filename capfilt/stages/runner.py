"""The stage runner: one loop owns the bookkeeping, each stage owns one job per shard.

A stage (a `Stage` subclass, as a datatrove PipelineStep) says what it reads, what it writes,
which of its options shape the output, and how to make one output shard from its inputs.
`run_stage` does the rest, the same way for every stage:

1. takes the write lock of the stage's output folders (one writer at a time);
2. plans: checks every output shard against this run's options and the input shards as they
   are now (core/provenance.py): done, pending, or stale, and why;
3. refuses, in one line, to redo shards made with other options unless --overwrite (and the
   stages whose inputs come from outside the dataset, fetch and ingest, a changed source),
   and to read input shards that are themselves stale; redoes the other stale shards;
4. takes this process's share of the work (shard number modulo the processes), loads the
   model only if there is work, reads the next shard while this one is processed, and writes
   each shard whole with its provenance;
5. gathers the counts of every process, and the main process records the run.

Outputs replaced as a whole (curated/, reports/) are written as a new generation beside the
current one and switched in at the end (`Dataset.switch_generation`); a run whose shards
would all be the same as the current generation's writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from capfilt.core import distributed, parquet, provenance
from capfilt.core.ahead import ordered_map
from capfilt.core.errors import CapfiltError, StageNotRunError, write_failure
from capfilt.core.layout import GENERATIONAL, Dataset, ShardFolder
from capfilt.core.locks import folder_locks
from capfilt.core.progress import image_progress
from capfilt.core.provenance import (
    DONE,
    INPUTS,
    OPTIONS,
    STALE,
    UNKNOWN,
    Provenance,
    ShardCheck,
)


class StaleInputError(CapfiltError):
    """An input shard is itself stale: the stage that writes it must run first."""


class Stage:
    """One stage's job: what it reads and writes, and how to make one output shard."""

    name: ClassVar[str]  # the command, e.g. "caption"
    output: ClassVar[str]  # the folder it writes, e.g. "captions"
    inputs: ClassVar[tuple[str, ...]] = ("images",)  # read per shard; the first lists the shards
    optional_inputs: ClassVar[tuple[str, ...]] = ()  # read when that shard exists
    # fetch and ingest: their inputs come from outside the dataset, so a changed source is
    # refused like changed options (it would replace images/ wholesale), not silently redone.
    refuse_changed_inputs: ClassVar[bool] = False
    hint: ClassVar[str] = "run `capfilt fetch` or `capfilt ingest` first"
    unit: ClassVar[str] = "images"  # what the progress bar counts

    def __init__(self, options):
        self.options = options
        self._folders: dict = {}

    def folder(self, dataset: Dataset, name: str):
        """The input folder `name`, resolved once per run: a run reads one generation."""
        if name not in self._folders:
            self._folders[name] = dataset.folder(name)
        return self._folders[name]

    # --- what the runner asks ----------------------------------------------------------------
    def provenance_options(self) -> dict:
        """The options that shape the output, as recorded with every shard."""
        return self.options.output_options()

    def shards(self, dataset: Dataset) -> list[int]:
        """The shards this stage makes: by default one per shard of its first input."""
        shards = self.folder(dataset, self.inputs[0]).shards()
        if not shards:
            raise StageNotRunError(
                f"{dataset.root!r} has no {self.inputs[0]}/ shards yet; {self.hint}"
            )
        return shards

    def input_fingerprints(self, dataset: Dataset, shard: int) -> dict:
        """What shard `shard` would be made from now: a fingerprint per input, None if absent."""
        found = {}
        for name in self.inputs + self.optional_inputs:
            found[name] = self.folder(dataset, name).fingerprint(shard)
        return found

    def work(self, dataset: Dataset, shards: list[int]) -> int | None:
        """How many `unit`s the progress bar counts for these shards (None: shards)."""
        return None

    # --- the job -------------------------------------------------------------------------------
    def setup(self, dataset: Dataset, shards: list[int]) -> None:
        """Load what processing needs (a model); called only when some shard is to be made."""

    def settled(self, options: dict) -> dict:
        """The provenance options once setup() ran: what planning could not tell is known now
        (a model downloaded from the hub has a commit)."""
        return options

    def read(self, dataset: Dataset, shard: int) -> tuple[dict, dict]:
        """(inputs, fingerprints of exactly what was read) of one shard; runs ahead in a thread."""
        tables, fingerprints = {}, {}
        for name in self.inputs + self.optional_inputs:
            folder = self.folder(dataset, name)
            path = folder.shard_path(shard)
            try:
                table, fingerprint = parquet.read_table_and_fingerprint(folder.fs, path)
                parquet.check_columns(path, table.column_names, parquet.REQUIRED_COLUMNS[name])
                parquet.check_kinds(path, table.schema, parquet.COLUMN_KINDS[name])
                if name == "images":
                    parquet.check_keys(path, table)
            except FileNotFoundError:
                if name in self.inputs:
                    raise
                table, fingerprint = None, None
            tables[name], fingerprints[name] = table, fingerprint
        return tables, fingerprints

    def process(self, shard: int, inputs: dict, advance: Callable[[int], None]):
        """Make one output shard (a pyarrow Table) from its inputs; `advance(n)` moves the bar."""
        raise NotImplementedError

    def write(self, folder: ShardFolder, shard: int, result, before_rename) -> str:
        """Write one output shard whole; returns its fingerprint. Parquet by default."""
        folder.fs.makedirs(folder.path, exist_ok=True)
        return parquet.write_table_atomic(
            folder.fs, folder.shard_path(shard), result, before_rename=before_rename
        )

    def count(self, result) -> dict:
        """Counters of one output shard, summed over the run and recorded."""
        return {"rows": result.num_rows}

    def rows(self, result) -> int | None:
        return getattr(result, "num_rows", None)

    def run_record(self) -> dict:
        """Extra fields of this run's manifest entry (e.g. the model that was loaded)."""
        return {}


# --- planning ----------------------------------------------------------------------------------
@dataclass
class Plan:
    """Every shard of one stage run, checked: what is done, what to do and what is refused."""

    stage: str
    output: str
    shards: list[int]
    checks: dict[int, ShardCheck]
    overwrite: bool
    generation: int | None = None  # generational output: the generation to write (None: none)
    current_generation: int | None = None
    options: dict = field(default_factory=dict)  # the provenance options checked against
    refusal: str | None = None  # one line, when the run must not go on
    orphans: list[int] = field(default_factory=list)  # output shards without an input shard

    def of(self, state: str, cause: str | None = None) -> list[int]:
        return [
            s
            for s, c in sorted(self.checks.items())
            if c.state == state and (cause is None or c.cause == cause)
        ]

    @property
    def todo(self) -> list[int]:
        if self.overwrite:
            return list(self.shards)
        return [s for s in self.shards if self.checks[s].state != DONE]


def plan_stage(
    stage: Stage, dataset: Dataset, overwrite: bool = False, target: ShardFolder | None = None
) -> Plan:
    """Check every shard of `stage` (see the module docstring); nothing is written."""
    shards = stage.shards(dataset)
    options = stage.provenance_options()
    inputs = {s: stage.input_fingerprints(dataset, s) for s in shards}
    _refuse_unreadable_inputs(stage, dataset, inputs)
    _refuse_stale_inputs(stage, dataset, shards)

    generational = target is None and stage.output in GENERATIONAL
    if generational:
        current = dataset.current_generation(stage.output)
        folder = dataset.generation_folder(stage.output, current)
        checks = {s: provenance.check(folder, s, options, inputs[s]) for s in shards}
        same_shards = set(folder.shards()) == set(shards)
        if (
            current
            and same_shards
            and all(c.state == DONE for c in checks.values())
            and not overwrite
        ):
            return Plan(stage.name, stage.output, shards, checks, overwrite, None, current, options)
        # A newer generation that was never switched in is a killed run's: resume it.
        newer = [g for g in dataset.generations(stage.output) if g > current]
        generation = newer[-1] if newer else max([current, *dataset.generations(stage.output)]) + 1
        folder = dataset.generation_folder(stage.output, generation)
        checks = {s: provenance.check(folder, s, options, inputs[s]) for s in shards}
        plan = Plan(
            stage.name, stage.output, shards, checks, overwrite, generation, current, options
        )
        plan.orphans = sorted(set(folder.shards()) - set(shards))
        return plan

    folder = target or dataset.folder(stage.output)
    checks = {s: provenance.check(folder, s, options, inputs[s]) for s in shards}
    plan = Plan(stage.name, stage.output, shards, checks, overwrite, options=options)
    plan.orphans = sorted(set(folder.shards()) - set(shards))
    if not overwrite:
        plan.refusal = refusal(stage, plan, dataset)
    return plan


def refusal(stage: Stage, plan: Plan, dataset: Dataset) -> str | None:
    """The one-line refusal of a run that would replace shards made differently, or None."""
    by_options = plan.of(STALE, OPTIONS)
    unknown = plan.of(STALE, UNKNOWN)
    changed_source = plan.of(STALE, INPUTS) if stage.refuse_changed_inputs else []
    where = f"{stage.output}/ of {dataset.root!r}"
    if changed_source:
        why = plan.checks[changed_source[0]].why
        return (
            f"{stage.name}: {len(changed_source)} of the {len(plan.shards)} shards of {where} "
            f"were made from another source ({why}). Pass --overwrite to replace them (the "
            f"stages after {stage.name} then redo their shards), or write to a new folder"
        )
    if by_options:
        changes: dict = {}
        for shard in by_options:
            for name, change in plan.checks[shard].changed_options.items():
                changes.setdefault(name, change)
        differ = provenance.describe_changes(changes, _flags(stage))
        return (
            f"{stage.name}: {len(by_options)} of the {len(plan.shards)} shards of {where} were "
            f"made with other options ({differ}). Pass --overwrite to redo them with the new "
            "options, or run with the options they were made with"
        )
    if unknown:
        return (
            f"{stage.name}: {len(unknown)} shards of {where} have no provenance "
            f"({provenance.shard_list(unknown)}: written by another tool or an older capfilt), "
            "so capfilt cannot tell how they were made. Pass --overwrite to redo them"
        )
    return None


def _flags(stage: Stage) -> dict:
    """option name -> its command-line flag, for the options `stage` declares."""
    from capfilt.core.options import declared, flag_of

    if stage.options is None:
        return {}
    return {field.name: flag_of(field) for field, _, _ in declared(type(stage.options))}


def _refuse_unreadable_inputs(stage: Stage, dataset: Dataset, inputs: dict) -> None:
    """Before a model loads: no input shard is damaged, and the first of each input folder has
    the columns the stage reads (every shard is checked again when it is read)."""
    first: dict = {}
    for shard, fingerprints in inputs.items():
        for name in stage.inputs + stage.optional_inputs:
            found = fingerprints.get(name)
            folder = stage.folder(dataset, name)
            if found is not None and found.startswith(parquet.UNREADABLE):
                raise parquet.UnreadableShard(
                    parquet.damaged(folder.shard_path(shard), found.partition("(")[2][:-1])
                )
            if found is not None:
                first.setdefault(name, shard)
    for name, shard in first.items():
        folder = stage.folder(dataset, name)
        parquet.check_schema(folder.fs, folder.shard_path(shard), name)


def _refuse_stale_inputs(stage: Stage, dataset: Dataset, shards: list[int]) -> None:
    """Refuse to read input shards that are stale themselves, at any depth: made from input
    shards that have changed since (captions/ of images/ re-fetched since)."""
    memo: dict = {}
    for name in stage.inputs + stage.optional_inputs:
        folder = stage.folder(dataset, name)
        present = set(folder.shards())
        mine = [shard for shard in shards if shard in present]
        stale = provenance.stale_shards(dataset, name, mine, folder, memo)
        if stale:
            command = {"captions": "caption", "scores": "filter", "curated": "filter"}.get(
                name, name
            )
            shard_names = provenance.shard_list([s for s, _ in stale])
            raise StaleInputError(
                f"{stage.name}: {len(stale)} {name}/ shards ({shard_names}) are stale "
                f"({stale[0][1]}); run `capfilt {command} {dataset.root}` first to bring "
                "them up to date"
            )


# --- running -----------------------------------------------------------------------------------
@dataclass
class StageRun:
    """What one run of a stage did, summed over its processes."""

    stage: str
    run: str
    plan: Plan
    counts: dict
    seconds: float
    processes: int
    record: dict  # the stage's run_record() (of a process that did work, if any)
    work_seconds: float = 0.0  # the slowest process's time on its shards, model loading apart

    @property
    def shards_done(self) -> int:
        return self.counts.get("shards", 0)

    @property
    def shards_skipped(self) -> int:
        return len(self.plan.shards) - len(self.plan.todo)

    @property
    def shards_redone(self) -> int:
        return len([s for s in self.plan.todo if self.plan.checks[s].state == STALE])


def run_stage(
    stage: Stage,
    dataset: Dataset | str,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    locked: bool = False,
    target: ShardFolder | None = None,
    record: bool = True,
    before_work: Callable[[Plan], None] | None = None,
) -> StageRun:
    """Run `stage` over `dataset` (see the module docstring); returns what the run did.

    `locked`: the caller already holds the write locks (a command running several stages).
    `target`: write the shards there instead of the dataset's folder (export-data).
    `record`: append the run to the manifest (a command running several stages records them
    together with `record_run`).
    `before_work(plan)`: called by the main process once the plan is accepted, before any
    write (and before setup()).
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    processes = distributed.current()
    if not locked:
        ds.ensure_writable(stage.output)
        with folder_locks(ds, (stage.output,), command or f"capfilt {stage.name}", processes):
            return run_stage(
                stage, ds, overwrite, progress, command, True, target, record, before_work
            )

    started = time.perf_counter()
    plan, error = None, None
    if processes.is_main:
        try:
            ds.read_manifest()  # a damaged manifest stops the run now, not once the work is done
            plan = plan_stage(stage, ds, overwrite, target)
        except CapfiltError as e:
            error = e
    plan, error = processes.gather((plan, error))[0]
    if error is not None:
        raise error
    if plan.refusal:
        raise CapfiltError(plan.refusal)
    folder = _target_folder(ds, stage, plan, target)
    run_id = processes.gather(provenance.new_run_id())[0]
    if processes.is_main:
        if before_work is not None:
            before_work(plan)
        folder.remove_temp_files()
        if target is None:  # also a killed switch's current.json, other generations' leftovers
            ds.remove_temp_files(stage.output)
        for shard in plan.orphans:  # their input shard is gone: nothing can read them right
            folder.remove_shard(shard)
    processes.wait_for_everyone()  # nobody writes before the leftovers are gone

    mine = processes.my_shards(plan.todo)
    counts: dict = {}
    working = 0.0  # seconds of work, without loading the model
    if mine:
        stage.setup(ds, mine)
        working = time.perf_counter()
        options = stage.settled(plan.options)
        total = stage.work(ds, mine)
        bar_total = len(mine) if total is None else total
        with image_progress(
            bar_total, stage.name, enabled=progress and processes.is_main, unit=stage.unit
        ) as bar:
            advance = bar.advance if total is not None else (lambda n: None)
            ahead = ordered_map(lambda s: (s, stage.read(ds, s)), mine, threads=1)
            for shard, (inputs, fingerprints) in ahead:
                result = stage.process(shard, inputs, advance)
                _commit(stage, folder, shard, result, options, fingerprints, run_id)
                counts = distributed.sum_counts([counts, stage.count(result), {"shards": 1}])
                if total is None:
                    bar.advance(1)
        working = time.perf_counter() - working
    processes.wait_for_everyone()  # every shard exists before a generation switches in

    totals = distributed.sum_counts(processes.gather(counts))
    loaded = [r for r in processes.gather(stage.run_record() if mine else {}) if r]
    result = StageRun(
        stage.name,
        run_id,
        plan,
        totals,
        time.perf_counter() - started,
        processes.world_size,
        loaded[0] if loaded else stage.run_record(),
        max(processes.gather(working)),
    )
    if processes.is_main:
        if plan.generation is not None:
            ds.switch_generation(
                stage.output,
                plan.generation,
                dict(run=run_id, stage=stage.name, options=plan.options),
            )
        if record and target is None:
            record_run(ds, stage.name, stage.options, [result])
    processes.wait_for_everyone()
    return result


def _target_folder(ds: Dataset, stage: Stage, plan: Plan, target: ShardFolder | None):
    if target is not None:
        return target
    if plan.generation is not None:
        return ds.generation_folder(stage.output, plan.generation)
    if stage.output in GENERATIONAL:
        return ds.generation_folder(stage.output, plan.current_generation)
    return ds.folder(stage.output)


def _commit(stage, folder, shard, result, options, fingerprints, run_id) -> None:
    """Write one shard and its provenance: the provenance first, the shard renamed in last."""

    def record(fingerprint: str) -> None:
        entry = Provenance(
            stage=stage.name,
            shard=shard,
            file=fingerprint,
            options=options,
            inputs=fingerprints,
            run=run_id,
            rows=stage.rows(result),
            counts=stage.count(result),
        )
        provenance.write(folder, shard, entry)

    try:
        stage.write(folder, shard, result, record)
    except OSError as e:
        failure = write_failure(e, folder.shard_path(shard))
        if failure is None:
            raise
        raise failure from e


def record_run(
    ds: Dataset, name: str, options, runs: list[StageRun], counts: dict | None = None, **extra
) -> None:
    """Append one command's run to the manifest: its options; the counts, provenance options
    and generation of its first stage (and of each stage under `stages` when it ran several).
    """
    parts = {}
    for run in runs:
        plan = run.plan
        part = dict(
            run=run.run,
            counts=dict(
                run.counts,
                shards_skipped=run.shards_skipped,
                shards_redone=run.shards_redone,
                shards_removed=len(plan.orphans),
            ),
            provenance_options=plan.options,
        )
        if plan.generation is not None:
            part["generation"] = plan.generation
        parts[run.stage] = part
    entry = dict(parts[runs[0].stage])
    entry["counts"] = dict(entry["counts"], **(counts or {}))
    if len(runs) > 1:
        entry["stages"] = parts
    for run in runs:
        entry.update(run.record)
    entry["processes"] = runs[0].processes
    entry["seconds"] = round(sum(r.seconds for r in runs), 3)
    ds.record_run(name, options.to_record(), **entry, **extra)


# --- whole outputs -------------------------------------------------------------------------------
def publish_generation(
    ds: Dataset, output: str, make: Callable, record: dict, command: str
) -> tuple[int, str]:
    """Write a whole output (reports/) as a new generation and switch it in, under the write
    lock of `output`. `make(path)` writes the files into the new generation's folder; `record`
    (stage, options, inputs) goes into current.json. Returns (generation, folder path)."""
    ds.ensure_writable(output)
    with folder_locks(ds, (output,), command):
        ds.remove_temp_files(output)
        for unfinished in [g for g in ds.generations(output) if g > ds.current_generation(output)]:
            ds.fs.rm(ds.generation_folder(output, unfinished).path, recursive=True)
        generation = max([ds.current_generation(output), *ds.generations(output)]) + 1
        folder = ds.generation_folder(output, generation)
        ds.fs.makedirs(folder.path, exist_ok=True)
        make(folder.path)
        ds.switch_generation(output, generation, dict(record, run=provenance.new_run_id()))
    return generation, folder.path
