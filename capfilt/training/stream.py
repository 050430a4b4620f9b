"""Training data that streams: shard by shard from every dataset, in an order that is a pure
function of (seed, epoch), so that a killed run resumes on exactly the batches it would have
trained on.

    sources    one per dataset: capfilt's layout (curated/ joined to images/ by key within
               aligned shards, or images/ with its web captions), or a folder of WebDataset
               tar shards (`capfilt export-data --format webdataset`); local or any fsspec URL
    plan       every shard of every source (a "unit") with its number of candidate pairs,
               from a light pass over keys and texts only (no image bytes); cached in the run
               folder, and checked against the shards' fingerprints on resume
    epoch      the units in a seeded order (each dataset repeated by its weight), their pairs
               numbered in that order and cut into one contiguous, equal part per process;
               within a part, a seeded shuffle buffer; batches of consecutive emitted pairs
    bytes      image bytes are read unit by unit as their pairs enter the shuffle buffer, and
               dropped as they leave it: memory holds the buffer and one shard, whatever the
               size of the dataset
    workers    DataLoader workers decode, augment and tokenize whole batches; the main process
               hands each its batch's bytes, so the batch order does not depend on them

Why not a library: `datasets` streaming restores its shuffle buffer empty on resume (it says
so in a warning), and torchdata's StatefulDataLoader would have to store the buffer's image
bytes in every checkpoint. Replaying the buffer on pair numbers alone costs a loop over
integers, and resumes exactly.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from capfilt.core.distributed import sum_counts
from capfilt.core.errors import CapfiltError

PLAN_FILE = "data_plan.json"


# --- sources ---------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One image-text pair a unit can train on; `ref` finds its image in the unit."""

    key: str
    text: str
    ref: int | str  # images/ row (capfilt layout) or the tar member of its image
    source: str = "web"  # the caption's: web or synthetic


@dataclass(frozen=True)
class Picking:
    """Which pairs of a unit train: --source, BLIP's word limit, and the thinning of web or
    synthetic captions that a --web-synthetic-ratio asks for (a seeded choice, the same
    every epoch)."""

    source: str = "all"
    max_words: int = 30
    keep: tuple = ()  # ((caption source, probability of keeping a pair), ...)
    seed: int = 0

    def take(self, source: str, key: str, text: str, skipped: dict) -> bool:
        """Whether a pair of this caption source goes in (else it is counted in `skipped`)."""
        if self.source != "all" and source != self.source:
            return False
        probability = next((p for kind, p in self.keep if kind == source), 1.0)
        if probability >= 1.0:
            return True
        digest = hashlib.blake2b(f"{self.seed}/{source}/{key}/{text}".encode(), digest_size=8)
        if int.from_bytes(digest.digest(), "little") / 2**64 < probability:
            return True
        why = "left out for --web-synthetic-ratio"
        skipped[why] = skipped.get(why, 0) + 1
        return False

    def thinned_to(self, ratio: tuple[float, float], counts: dict) -> Picking:
        """This picking with the more frequent of web and synthetic captions thinned so that
        their pairs come in `ratio` (web, synthetic), given the pairs of each (`counts`)."""
        web, synthetic = counts.get("web", 0), counts.get("synthetic", 0)
        if not web or not synthetic:
            raise CapfiltError(
                f"--web-synthetic-ratio needs pairs of both kinds; the data has {web} web and "
                f"{synthetic} synthetic"
            )
        want_web, want_synthetic = ratio
        if web * want_synthetic > synthetic * want_web:  # too many web pairs
            keep = (("web", synthetic * want_web / want_synthetic / web),)
        else:
            keep = (("synthetic", web * want_synthetic / want_web / synthetic),)
        return Picking(self.source, self.max_words, keep, self.seed)


class DatasetSource:
    """A dataset in capfilt's layout: curated/ pairs when filtered, else the web captions."""

    kind = "capfilt"

    def __init__(self, root: str, picking: Picking):
        from capfilt.core.layout import Dataset

        self.root, self.picking = root, picking
        self.ds = Dataset(root)
        self.images = self.ds.folder("images")
        self.curated = self.ds.folder("curated")  # one generation for the whole run
        self.image_shards = set(self.images.shards())
        self.curated_shards = self.curated.shards()
        self.web = not self.curated_shards  # unfiltered: train on the web captions
        if not self.image_shards:
            raise CapfiltError(
                f"{root!r} has no images/ shards yet; fetch or ingest images first "
                "(capfilt fetch/ingest)"
            )
        if not self.web:
            _refuse_stale(self.ds, self.curated, self.curated_shards)
        elif picking.source == "synthetic":
            raise CapfiltError(
                f"{root!r} has no curated/ shards, so no synthetic captions to train on; "
                "run `capfilt caption` and `capfilt filter` first, or pass --source web"
            )

    def shards(self) -> list[int]:
        return sorted(self.image_shards) if self.web else self.curated_shards

    def fingerprint(self, shard: int) -> str:
        parts = [self.images.fingerprint(shard)]
        if not self.web:
            parts.append(self.curated.fingerprint(shard))
        return "+".join(str(p) for p in parts)

    def candidates(self, shard: int, skipped: dict) -> list[Candidate]:
        """The pairs of one shard that can train, in file order; the others counted by reason."""
        return self._pairs(shard, self._images(shard, []), skipped)

    def read_unit(self, shard: int):
        """(candidates, image bytes of a candidate's ref) of one shard, images/ read once."""
        images = self._images(shard, ["jpg"])
        column = images.column("jpg") if images is not None else None
        return self._pairs(shard, images, {}), lambda ref: column[ref].as_py()

    def _images(self, shard: int, extra: list[str]):
        columns = ["key", "status"] + (["caption"] if self.web else []) + extra
        return self.images.read_shard(shard, columns) if shard in self.image_shards else None

    def _pairs(self, shard: int, images, skipped: dict) -> list[Candidate]:
        from capfilt.training.pairs import pre_caption

        row_of, unusable = {}, {}
        if images is not None:
            statuses = images.column("status").to_pylist()
            for row, (key, status) in enumerate(
                zip(images.column("key").to_pylist(), statuses, strict=True)
            ):
                if status == "success":
                    row_of[key] = row
                else:
                    unusable[key] = "image not downloaded"
        if self.web:
            rows = (
                []
                if images is None
                else [
                    ("web", key, text)
                    for key, text in zip(
                        images.column("key").to_pylist(),
                        images.column("caption").to_pylist(),
                        strict=True,
                    )
                ]
            )
        else:
            table = self.curated.read_shard(shard, ["key", "source", "text"])
            rows = list(
                zip(
                    table.column("source").to_pylist(),
                    table.column("key").to_pylist(),
                    table.column("text").to_pylist(),
                    strict=True,
                )
            )
        found = []
        for source, key, text in rows:
            text = pre_caption(text or "", self.picking.max_words)
            if not self.picking.take(source, key, text, skipped):
                continue
            if key not in row_of:
                reason = unusable.get(key, "no image with this key")
            elif not text:
                reason = "empty text"
            else:
                found.append(Candidate(key, text, row_of[key], source))
                continue
            skipped[reason] = skipped.get(reason, 0) + 1
        return found


class WebDatasetSource:
    """A folder of WebDataset tar shards (KEY.jpg, KEY.txt, KEY.json), as export-data writes."""

    kind = "webdataset"

    def __init__(self, root: str, picking: Picking):
        import fsspec

        self.root, self.picking = root, picking
        self.fs, path = fsspec.core.url_to_fs(root)
        self.path = path.rstrip("/")
        self.files = {}
        for name in sorted(self.fs.ls(self.path, detail=False)):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".tar"):
                self.files[len(self.files)] = name
        if not self.files:
            raise CapfiltError(f"{root!r} holds no .tar shards")

    def shards(self) -> list[int]:
        return list(self.files)

    def fingerprint(self, shard: int) -> str:
        info = self.fs.info(self.files[shard])
        return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or ''}"

    def candidates(self, shard: int, skipped: dict) -> list[Candidate]:
        return self._pairs(self._samples(shard, with_images=False), skipped)

    def read_unit(self, shard: int):
        """(candidates, image bytes of a candidate's ref) of one tar, read once."""
        samples = self._samples(shard, with_images=True)

        def image(ref: str) -> bytes | None:
            key, ext = ref.rsplit(".", 1)
            return samples.get(key, {}).get(ext)

        return self._pairs(samples, {}), image

    def _samples(self, shard: int, with_images: bool):
        """sample key → {extension: bytes} of one tar (images as b"" unless `with_images`)."""
        import tarfile

        samples: dict[str, dict] = {}
        with self.fs.open(self.files[shard], "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[-1].partition(".")
                if ext in IMAGE_EXTENSIONS and not with_images:
                    samples.setdefault(key, {})[ext] = b""  # present; bytes not needed now
                    continue
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        return samples

    def _pairs(self, samples: dict, skipped: dict) -> list[Candidate]:
        from capfilt.training.pairs import pre_caption

        found = []
        for key, parts in samples.items():
            meta = json.loads(parts.get("json", b"{}") or b"{}")
            text = (parts.get("txt") or b"").decode("utf-8", "replace")
            text = pre_caption(text, self.picking.max_words)
            source = meta.get("source", "web")
            if not self.picking.take(source, key, text, skipped):
                continue
            image = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
            if image is None:
                skipped["no image with this key"] = skipped.get("no image with this key", 0) + 1
            elif not text:
                skipped["empty text"] = skipped.get("empty text", 0) + 1
            else:
                found.append(Candidate(key, text, f"{key}.{image}", source))
        return found


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # of a WebDataset sample's image


def open_source(root: str, picking: Picking):
    """The source of one dataset: capfilt's layout, or a folder of tar shards."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        raise CapfiltError(f"dataset {root!r} does not exist; check the path")
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)}
    if "images" not in names and any(n.endswith(".tar") for n in names):
        return WebDatasetSource(root, picking)
    return DatasetSource(root, picking)


def _refuse_stale(ds, curated, shards: list[int]) -> None:
    """Training on curated/ pairs whose images were replaced since would pair texts with other
    images (keys are reused): refuse, saying which stage to run."""
    from capfilt.core import provenance

    stale = provenance.stale_shards(ds, "curated", shards, curated)
    if stale:
        raise CapfiltError(
            f"curated/ of {ds.root!r} is stale in {len(stale)} shards "
            f"({provenance.shard_list([s for s, _ in stale])}: {stale[0][1]}); bring it up to "
            "date first (`capfilt status` says what changed; run caption and filter again)"
        )


# --- the plan -------------------------------------------------------------------------------
@dataclass
class Unit:
    """One shard of one source, and how many pairs it trains on."""

    source: int
    shard: int
    fingerprint: str
    kinds: dict  # its pairs by caption source (web, synthetic)

    @property
    def pairs(self) -> int:
        return sum(self.kinds.values())


@dataclass
class DataPlan:
    """Every unit of the training data, and the settings that chose its pairs."""

    datasets: list[str]
    weights: list[float]
    options: dict  # source, max_words: what picks a unit's pairs
    units: list[Unit]
    skipped: dict = field(default_factory=dict)  # pairs left out by the light pass, by reason

    @property
    def pairs(self) -> int:
        return sum(u.pairs for u in self.units)

    def mix(self) -> list[dict]:
        """Each dataset's weight and pairs, by caption source: what the run trains on."""
        out = []
        for index, (root, weight) in enumerate(zip(self.datasets, self.weights, strict=True)):
            kinds = sum_counts([u.kinds for u in self.units if u.source == index])
            out.append(
                dict(dataset=root, weight=weight, pairs=sum(kinds.values()), by_source=kinds)
            )
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> DataPlan:
        raw = json.loads(text)
        raw["units"] = [Unit(**u) for u in raw["units"]]  # (`pairs` is derived, not stored)
        return cls(**raw)


def build_plan(
    datasets, weights, picking: Picking, ratio=None, part=(0, 1), gather=None
) -> tuple[DataPlan, list]:
    """The plan of these datasets and their sources (opened once, reused to stream).

    `ratio` (web, synthetic): thin the more frequent kind of captions to it; the pairs of
    each kind are counted first. Several processes share the reading: with `part` (rank,
    world) this one reads every world-th shard, and `gather` (an object → the list of every
    process's, in rank order) puts the parts together; all get the same plan.
    """
    if len(weights) != len(datasets):
        raise CapfiltError(
            f"--weights gives {len(weights)} weights for {len(datasets)} datasets; give one "
            "per dataset"
        )
    gather = gather or (lambda obj: [obj])
    sources = [open_source(root, picking) for root in datasets]
    mine = _my_shards(sources, part)
    if ratio:
        counts = Counter(c.source for _, src, shard in mine for c in src.candidates(shard, {}))
        picking = picking.thinned_to(ratio, sum_counts(gather(dict(counts))))
        for src in sources:
            src.picking = picking
    skipped: dict = {}
    units = []
    for order, (index, src, shard) in enumerate(mine):
        candidates = src.candidates(shard, skipped)
        if candidates:
            kinds = dict(Counter(c.source for c in candidates))
            unit = Unit(index, shard, src.fingerprint(shard), kinds)
            units.append((order * part[1] + part[0], unit))
    units = [unit for _, unit in sorted(u for mine in gather(units) for u in mine)]
    skipped = sum_counts(gather(skipped))
    plan = DataPlan(list(datasets), list(weights), _options(picking), units, skipped)
    if not plan.pairs:
        raise CapfiltError(
            f"no trainable image-text pairs in {', '.join(datasets)} "
            f"(source={picking.source}; skipped: {skipped or 'none'})"
        )
    return plan, sources


def _my_shards(sources, part):
    """(dataset index, source, shard) of every world-th shard of all the datasets, from rank."""
    rank, world = part
    every = [(index, src, shard) for index, src in enumerate(sources) for shard in src.shards()]
    return every[rank::world]


def _options(picking: Picking) -> dict:
    return dict(
        source=picking.source,
        max_words=picking.max_words,
        keep=[list(k) for k in picking.keep],
        seed=picking.seed,
    )


def load_or_build_plan(
    run_dir: Path, datasets, weights, picking: Picking, ratio, resuming: bool, **sharing
) -> tuple[DataPlan, list]:
    """The run's plan: built at its start (with `sharing`: build_plan's `part` and `gather`),
    read back on resume after checking that the data is still the data it started on (same
    shards, same files)."""
    path = run_dir / PLAN_FILE
    if not (resuming and path.exists()):
        return build_plan(datasets, weights, picking, ratio, **sharing)
    plan = DataPlan.from_json(path.read_text())
    kept = Picking(
        picking.source,
        picking.max_words,
        tuple(map(tuple, plan.options.get("keep", []))),
        picking.seed,
    )
    sources = [open_source(root, kept) for root in datasets]
    changed = None
    same_options = {k: v for k, v in plan.options.items() if k != "keep"} == {
        k: v for k, v in _options(picking).items() if k != "keep"
    }
    if plan.datasets != list(datasets) or not same_options or plan.weights != list(weights):
        changed = "its datasets, weights or --source"
    else:
        for unit in plan.units:
            if sources[unit.source].fingerprint(unit.shard) != unit.fingerprint:
                changed = f"{datasets[unit.source]} shard {unit.shard:05d} changed"
                break
    if changed:
        raise CapfiltError(
            f"{str(run_dir)!r} was started on other training data ({changed}); resume it on "
            "the data it started on, or pass --overwrite to start again"
        )
    return plan, sources


# --- one epoch ------------------------------------------------------------------------------
@dataclass
class EpochLayout:
    """The units of one epoch in order, and this process's contiguous part of their pairs."""

    units: list[int]  # indices into plan.units, in epoch order (repeats for weights > 1)
    starts: list[int]  # first pair number of each, in the epoch's numbering
    first: int  # this process's first pair number
    count: int  # pairs per process (the same for every process)

    def locate(self, position: int) -> tuple[int, int]:
        """(slot in `units`, pair index in that unit) of this process's pair `position`."""
        number = self.first + position
        slot = bisect.bisect_right(self.starts, number) - 1
        return slot, number - self.starts[slot]


def epoch_layout(plan: DataPlan, seed: int, epoch: int, rank: int, world: int) -> EpochLayout:
    """Units in a seeded order, each dataset as many times as its weight (a fraction: a seeded
    subset of its units), cut into `world` equal contiguous parts; the remainder waits for
    another epoch's order."""
    order: list[int] = []
    for index, weight in enumerate(plan.weights):
        ids = [u for u, unit in enumerate(plan.units) if unit.source == index]
        whole, fraction = divmod(float(weight), 1.0)
        order += ids * int(whole)
        if fraction:
            pick = random.Random(f"{seed}/{epoch}/weight/{index}")
            order += pick.sample(ids, round(fraction * len(ids)))
    random.Random(f"{seed}/{epoch}/order").shuffle(order)
    starts, total = [], 0
    for u in order:
        starts.append(total)
        total += plan.units[u].pairs
    count = total // world
    return EpochLayout(order, starts, rank * count, count)


def batches_per_epoch(plan: DataPlan, seed: int, epoch: int, world: int, batch: int) -> int:
    return epoch_layout(plan, seed, epoch, 0, world).count // batch


def shuffle_order(count: int, buffer: int, seed: str) -> Iterator[tuple[int, int]]:
    """(emitted position, pushed so far) of a shuffle buffer over positions 0..count-1."""
    rng = random.Random(seed)
    held: list[int] = []
    for position in range(count):
        if len(held) < buffer:
            held.append(position)
            continue
        slot = rng.randrange(buffer)
        yield held[slot], position
        held[slot] = position
    rng.shuffle(held)
    for position in held:
        yield position, count


class EpochBatches:
    """The batches of one process, epoch by epoch, as the DataLoader's sampler: each item is a
    batch of (image bytes, text, key, augmentation seed), for a worker to decode.

    `set_epoch(epoch, batches, skip)`: the next iteration yields that epoch's batches from
    `skip` on (resume): the skipped ones are replayed by pair number only, and no image of
    theirs is read.
    """

    def __init__(
        self,
        plan: DataPlan,
        sources: list,
        seed: int,
        rank: int,
        world: int,
        batch_size: int,
        buffer: int,
    ):
        self.plan, self.sources, self.seed = plan, sources, seed
        self.rank, self.world, self.batch_size, self.buffer = rank, world, batch_size, buffer
        self.loaded: dict[int, tuple] = {}  # position → (bytes, text, key), while iterating
        self.units_read: set[int] = set()  # slots whose bytes were read
        self.set_epoch(0, 0)

    def set_epoch(self, epoch: int, batches: int, skip: int = 0) -> None:
        self.epoch, self.batches, self.skip = epoch, batches, skip
        self.layout = epoch_layout(self.plan, self.seed, epoch, self.rank, self.world)

    def __len__(self) -> int:
        return self.batches - self.skip

    def __iter__(self):
        self.loaded, self.units_read = {}, set()
        order = shuffle_order(
            self.layout.count, self.buffer, f"{self.seed}/{self.epoch}/{self.rank}/shuffle"
        )
        first, stop = self.skip * self.batch_size, self.batches * self.batch_size
        held: set[int] = set()  # what the buffer holds, tracked while batches are skipped
        before = 0  # the units of positions < before have been read
        batch = []
        for emitted, (position, pushed) in enumerate(order):
            if emitted >= stop:
                break
            if emitted < first:  # replayed by number: no image is read
                held.update(range(before, pushed))
                held.discard(position)
                before = pushed
                continue
            if emitted == first and first:
                held.update(range(before, pushed))
                self._read_resumed(held, pushed)
            elif pushed > before:
                self._read_entered(before, pushed)
            before = max(before, pushed)
            data, text, key = self.loaded.pop(position)
            seed = f"{self.seed}/{self.epoch}/{self.rank}/{emitted}"
            batch.append((data, text, key, seed))
            if len(batch) == self.batch_size:
                yield batch
                batch = []

    def _read_entered(self, before: int, pushed: int) -> None:
        """Read the units of positions before..pushed-1, which entered the buffer."""
        first_slot, _ = self.layout.locate(before)
        last_slot, _ = self.layout.locate(pushed - 1)
        for slot in range(first_slot, last_slot + 1):
            if slot not in self.units_read:
                self._read_unit(slot, lambda p: p >= before)

    def _read_resumed(self, held: set[int], pushed: int) -> None:
        """Resuming: read the units of what the buffer holds, and of what enters it next."""
        slots = {self.layout.locate(p)[0] for p in held}
        if pushed < self.layout.count:
            slots.add(self.layout.locate(pushed)[0])
        for slot in sorted(slots):
            self._read_unit(slot, lambda p: p in held or p >= pushed)

    def _read_unit(self, slot: int, wanted) -> None:
        """Read one unit's candidates and image bytes, keeping the positions `wanted` accepts."""
        unit = self.plan.units[self.layout.units[slot]]
        candidates, image = self.sources[unit.source].read_unit(unit.shard)  # counted in the plan
        begin = self.layout.starts[slot] - self.layout.first
        for index, candidate in enumerate(candidates):
            position = begin + index
            if 0 <= position < self.layout.count and wanted(position):
                self.loaded[position] = (image(candidate.ref), candidate.text, candidate.key)
        self.units_read.add(slot)


def training_loader(decoder, sampler: EpochBatches, num_workers: int, seed: int):
    """The DataLoader of a run: `sampler` picks each batch's pairs and reads their bytes in
    this process; `decoder` (pairs.DecodeBatch) decodes them in `num_workers` workers."""
    import torch

    return torch.utils.data.DataLoader(
        decoder,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: making an iterator must not draw from the global RNG, which
        # samples hard negatives and must replay exactly on resume.
        generator=torch.Generator().manual_seed(seed),
    )
