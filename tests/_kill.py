"""Kill-anywhere harness: run a stage in a child process, SIGKILL it at seeded random moments,
watch the dataset folder while it runs, and resume until a run finishes by itself.

Children come from a fork server that has already imported torch, transformers, img2dataset
and capfilt: a fresh interpreter spends ~15 s on those imports on a small machine, so killing
CLI processes would mostly kill imports. A forked child runs exactly the code a `capfilt`
command runs after parsing its options, and SIGKILL ends it the same way.

A child that starts processes of its own (fetch --processes 2) is checked to leave none behind
(`kill_until_done(workers=True)`); a dataset on an object store is watched through fsspec
(`StoreWatcher`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.blip.modeling_blip",
    "accelerate",
    "img2dataset.downloader",
    "img2dataset.reader",
    "img2dataset.writer",
    "capfilt.stages.caption",
    "capfilt.stages.filter",
    "capfilt.stages.fetch",
    "capfilt.training.loop",
    "capfilt.models.blip",
    "capfilt.models.med",
    "capfilt.models.vlm",
    "transformers.models.llava.modeling_llava",
]
_SHARD = re.compile(r"^(\d{5,})\.parquet$")
_STEP = re.compile(r"^step-(\d+)$")
STAGING = "_incoming"  # fetch's staging folder under images/ (capfilt.stages.fetch.STAGING)
# Set in a stage child's environment, which every process it starts (spawned workers, a logger
# process) inherits: how the loop finds them once the child is killed and they are reparented.
TAG = "CAPFILT_KILL_TAG"


def context():
    """The fork-server context every stage child starts from (preloads the heavy modules)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child_setup() -> None:
    import multiprocessing
    import threading

    import torch
    import transformers
    from tqdm import tqdm

    # tqdm's bars take a multiprocessing lock, which a killed child leaves behind.
    tqdm.set_lock(threading.RLock())
    # Locks made under the forkserver method are registered with the resource tracker and
    # leak (with a warning at exit) when the child is killed; under fork they are not.
    multiprocessing.set_start_method("fork", force=True)
    transformers.utils.logging.disable_progress_bar()

    # One thread: the fork server never ran an OpenMP region, but two cores are shared with
    # the watcher and the toy web server, and results must not depend on thread count.
    torch.set_num_threads(1)


# --- what the children run (the body of each CLI command) ------------------------------------
def run_fetch(url_list: str, root: str, shard_size: int, processes: int = 1) -> None:
    """`capfilt fetch`; with `processes` > 1 img2dataset's multiprocessing distributor spawns a
    pool of that many workers and a logger process."""
    from capfilt.stages.fetch import FetchOptions, fetch

    _child_setup()
    # The toy web is served on 127.0.0.1, which fetch refuses unless allowed.
    options = FetchOptions(
        shard_size=shard_size,
        image_size=32,
        processes=processes,
        threads=4,
        timeout=5,
        allow_private_addresses=True,
    )
    fetch(url_list, root, options)


def run_caption(root: str, model: str) -> None:
    from capfilt.stages.caption import CaptionOptions, caption_dataset

    _child_setup()
    config = CaptionOptions(model=model, batch_size=2, num_workers=0, max_length=12, seed=3)
    caption_dataset(root, config, progress=False)


def run_filter(root: str, model: str, rule: float | dict) -> None:
    """`capfilt filter` with the selection `rule`: a threshold, or FilterOptions' rule fields."""
    from capfilt.stages.filter import FilterOptions, filter_dataset

    _child_setup()
    rule = rule if isinstance(rule, dict) else {"threshold": rule}
    config = FilterOptions(**rule, model=model, batch_size=2, num_workers=0)
    filter_dataset(root, config, progress=False)


def run_export(root: str, out: str, format: str, overwrite: bool) -> None:
    from capfilt.core.layout import Dataset
    from capfilt.stages.export_data import export_data

    _child_setup()
    export_data(Dataset(root), format, out, overwrite=overwrite)


def run_pretrain(options: dict, resumes_log: str) -> None:
    """`capfilt pretrain`, with a spy that notes which checkpoint `load_state` resumes from."""
    from accelerate import Accelerator

    from capfilt.training.loop import TrainConfig, train

    _child_setup()
    load_state = Accelerator.load_state

    def noting_load_state(self, input_dir=None, **kwargs):
        with open(resumes_log, "a") as f:
            f.write(f"{os.getpid()} {Path(input_dir).name}\n")
        return load_state(self, input_dir, **kwargs)

    Accelerator.load_state = noting_load_state
    train_config = TrainConfig(**options)
    train(train_config)


def run_in_env(env: dict, target: Callable, args: tuple) -> None:
    """Run `target(*args)` with `env` in os.environ (None: unset), for it and what it starts.

    A fork-server child has the environment the server started with, not the test's: a test
    that sets variables (the S3 endpoint) passes them here."""
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    target(*args)


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment holds CAPFILT_KILL_TAG=tag (zombies have none)."""
    want = f"{TAG}={tag}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if want in environ:
            found.append(int(name))
    return found


def outliving(tag: str, grace: float) -> tuple[list[int], float]:
    """(processes of `tag` still alive after `grace` seconds, seconds waited for the others)."""
    started = time.monotonic()
    while (alive := tagged_processes(tag)) and time.monotonic() - started < grace:
        time.sleep(0.02)
    return alive, time.monotonic() - started


def end_orphans(pids: list[int]) -> None:
    """SIGKILL processes a failed check found, so that they outlive no test."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the watcher -----------------------------------------------------------------------------
class ShardWatcher:
    """Polls stage folders: every visible shard must read whole and hold the rows it should.

    `expect(stage, shard, table)` raises AssertionError when a complete-looking file is wrong.
    """

    def __init__(
        self,
        root: Path,
        stages: tuple[str, ...],
        expect: Callable | None = None,
        whole: Callable[[], None] | None = None,
    ):
        """`whole()`: a check of what a reader sees as a whole (a generation, an export)."""
        self.root, self.stages, self.expect, self.whole = Path(root), stages, expect, whole
        self.seen: dict[Path, tuple] = {}  # file → (size, mtime) already checked
        self.files_checked = 0
        self.temp_files_seen = 0

    def shards(self, stage: str) -> list[int]:
        folder = self.root / stage
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in os.listdir(folder) if (m := _SHARD.match(p)))

    def temp_files(self) -> list[str]:
        found = []
        for stage in self.stages:
            folder = self.root / stage
            if folder.is_dir():
                found += [f"{stage}/{n}" for n in os.listdir(folder) if ".tmp-" in n]
        return found

    def check(self) -> None:
        import pyarrow.parquet as pq

        manifest = self.root / "capfilt.json"
        try:
            text = manifest.read_text()
        except FileNotFoundError:
            pass
        else:
            assert isinstance(json.loads(text), dict), "capfilt.json is not a JSON object"
        if self.temp_files():
            self.temp_files_seen += 1
        if self.whole is not None:
            self.whole()
        for stage in self.stages:
            for shard in self.shards(stage):
                path = self.root / stage / f"{shard:05d}.parquet"
                try:
                    st = path.stat()
                    signature = (st.st_size, st.st_mtime_ns, st.st_ino)
                    if self.seen.get(path) == signature:
                        continue
                    table = pq.read_table(path)
                except FileNotFoundError:  # replaced or removed between listing and reading
                    continue
                except Exception as e:  # noqa: BLE001 - any unreadable file is the failure
                    raise AssertionError(
                        f"{stage}/{path.name} is visible but unreadable: {e}"
                    ) from e
                if self.expect is not None:
                    self.expect(stage, shard, table)
                self.seen[path] = signature
                self.files_checked += 1


class StoreWatcher(ShardWatcher):
    """ShardWatcher through an fsspec filesystem (a dataset on S3): listed afresh each look, at
    most every `every` seconds (each look is a few requests). A shard visible in a stage folder
    must also have its provenance, written before it; `root` has no protocol ("bucket/ds")."""

    def __init__(self, fs, root: str, stages, expect=None, whole=None, every: float = 0.1):
        super().__init__(Path(root), stages, expect, whole)
        self.fs, self.prefix, self.every = fs, root.rstrip("/"), every
        self.last = 0.0

    def _listing(self, folder: str) -> dict[str, dict]:
        try:
            entries = self.fs.ls(f"{self.prefix}/{folder}", detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}

    def shards(self, stage: str) -> list[int]:
        return sorted(int(m.group(1)) for n in self._listing(stage) if (m := _SHARD.match(n)))

    def temp_files(self) -> list[str]:
        return [
            f"{stage}/{n}" for stage in self.stages for n in self._listing(stage) if ".tmp-" in n
        ]

    def in_flight(self) -> bool:
        """A temporary object in a stage folder, or a staged shard without its stats yet."""
        staged = self._listing(f"images/{STAGING}") if "images" in self.stages else {}
        return bool(self.temp_files()) or _unfinished_download(staged)

    def check(self) -> None:
        import io

        import pyarrow.parquet as pq

        from capfilt.core.layout import PROVENANCE_DIR

        if time.monotonic() - self.last < self.every:
            return
        try:
            text = self.fs.cat(f"{self.prefix}/capfilt.json")
        except FileNotFoundError:
            pass
        else:
            assert isinstance(json.loads(text), dict), "capfilt.json is not a JSON object"
        if self.whole is not None:
            self.whole()
        for stage in self.stages:
            listing = self._listing(stage)
            if any(".tmp-" in n for n in listing):
                self.temp_files_seen += 1
            provenance = self._listing(f"{stage}/{PROVENANCE_DIR}")
            for name, entry in sorted(listing.items()):
                if not (m := _SHARD.match(name)):
                    continue
                path = f"{self.prefix}/{stage}/{name}"
                signature = (entry.get("size"), entry.get("ETag"), entry.get("LastModified"))
                if self.seen.get(path) == signature:
                    continue
                try:
                    table = pq.read_table(io.BytesIO(self.fs.cat(path)))
                except FileNotFoundError:  # replaced or removed since the listing
                    continue
                except Exception as e:  # noqa: BLE001 - any unreadable object is the failure
                    raise AssertionError(f"{stage}/{name} is visible but unreadable: {e}") from e
                if f"{m.group(1)}.json" not in provenance and self.fs.exists(path):
                    raise AssertionError(f"{stage}/{name} is visible without its provenance")
                if self.expect is not None:
                    self.expect(stage, int(m.group(1)), table)
                self.seen[path] = signature
                self.files_checked += 1
        self.last = time.monotonic()


def store_leftovers(fs, root: str, known: list | None = None) -> list[str]:
    """Objects under `root` ("bucket/ds") that a finished run must not leave: temporary
    objects, img2dataset's staging and temporary folders.

    Two kinds go to `known` instead, gaps no run cleans up on an object store: a manifest's
    temporary copy (.capfilt.json.tmp-*: only a local dataset removes a killed writer's, under
    its lock) and a write probe (.capfilt-write-probe-*), when a kill lands in the few
    milliseconds between writing and removing them."""
    fs.invalidate_cache()
    names = [p.removeprefix(root.rstrip("/") + "/") for p in fs.find(root)]
    found = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith((".capfilt.json.tmp-", ".capfilt-write-probe-")):
            if known is not None:
                known.append(name)
        elif ".tmp-" in base or any(p in (STAGING, "_tmp") for p in name.split("/")[:-1]):
            found.append(name)
    return found


def download_in_flight(root: Path) -> bool:
    """Whether img2dataset is writing a shard (a staged parquet without its stats file yet)."""
    try:
        names = set(os.listdir(Path(root) / "images" / STAGING))
    except FileNotFoundError:
        return False
    return _unfinished_download(names)


def _unfinished_download(names) -> bool:
    """Whether a staging folder of these file names has a parquet without its stats yet."""
    return any(n.endswith(".parquet") and f"{n[:-8]}_stats.json" not in names for n in names)


def checkpoint_in_flight(run_dir: Path) -> bool:
    """Whether a step-N folder is being written (it has no metadata.json yet)."""
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return False
    return any(
        _STEP.match(e.name) and not os.path.exists(os.path.join(e.path, "metadata.json"))
        for e in entries
    )


def run_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run folder (step-N with metadata.json)."""
    if not run_dir.is_dir():
        return []
    return sorted(
        int(m.group(1))
        for p in run_dir.iterdir()
        if (m := _STEP.match(p.name)) and (p / "metadata.json").is_file()
    )


# --- the loop --------------------------------------------------------------------------------
@dataclass
class KillLog:
    """What the kill loop did: kills that landed on a live process, runs that finished."""

    kills: int = 0
    kills_in_flight: int = 0  # kills while a write was visibly under way
    finished_runs: int = 0
    progress_at_kill: list = field(default_factory=list)
    pids: list = field(default_factory=list)  # of every child started, in order
    # With workers=True: per kill, the processes the child had started (alive at the kill),
    # and per kill or finished run, the seconds until the last of them had ended.
    workers_at_kill: list = field(default_factory=list)
    worker_ends: list = field(default_factory=list)


def kill_until_done(
    ctx,
    target: Callable,
    args: tuple,
    rng,
    watcher: ShardWatcher,
    progress: Callable[[], int],
    log: KillLog,
    max_delay: float,
    max_kills: int,
    timeout: float = 120.0,
    before_start: Callable[[], None] | None = None,
    in_flight: Callable[[], bool] | None = None,
    env: dict | None = None,
    workers: bool = False,
    grace: float = 2.0,
    poll: float = 0.005,
) -> None:
    """Start `target`, SIGKILL it at a seeded random moment, restart, until a run finishes.

    A third of the kills come a random delay after the start; a third wait for `progress()`
    (shards written, steps logged) to move on first, so that they land while the stage works
    rather than while it loads its model; a third fire as soon as `in_flight()` sees a write
    under way (by default: a temporary file in a stage folder). After `max_kills` kills the
    last run goes uninterrupted.

    `env`: variables for the child (see run_in_env). `workers`: the child starts processes of
    its own; each is tagged (TAG), and none may be alive `grace` seconds after the child was
    killed, or after it finished (an orphaned worker would go on writing into the dataset
    while the next run writes it too). `poll`: seconds between looks at the child (an object
    store is listed over the network: look less often).
    """
    in_flight = in_flight or (lambda: bool(watcher.temp_files()))
    # Each call ends with a finished run; a stage too fast for its delays would loop forever.
    assert log.finished_runs < 30, "runs keep finishing before their kill: shorten max_delay"
    kills_here = 0
    while True:
        if before_start is not None:
            before_start()
        tag = uuid.uuid4().hex if workers else None
        child_env = {**(env or {}), **({TAG: tag} if tag else {})}
        # Not a daemon: a training child starts DataLoader workers of its own.
        if child_env:
            child = ctx.Process(target=run_in_env, args=(child_env, target, args), daemon=False)
        else:
            child = ctx.Process(target=target, args=args, daemon=False)
        started = time.monotonic()
        progress_before = progress()
        child.start()
        log.pids.append(child.pid)
        kill_now = kills_here < max_kills
        mode = rng.choice(("delay", "progress", "in flight"))
        delay = rng.uniform(0.0, max_delay)
        kill_at = started + delay if mode == "delay" else None
        checked = 0.0
        while child.is_alive():
            now = time.monotonic()
            # Waiting for a write in flight, look often and read shards less often.
            if mode != "in flight" or not kill_now or now - checked > 0.05:
                watcher.check()
                checked = now = time.monotonic()
            if kill_now and kill_at is None:
                if mode == "progress" and progress() > progress_before:
                    kill_at = now + delay / 4
                elif mode == "in flight" and in_flight():
                    kill_at = now
                elif now - started > 3 * max_delay:  # no write seen: fall back to a delay
                    kill_at = now
            if kill_now and kill_at is not None and now >= kill_at:
                break
            assert now - started < timeout, f"{target.__name__} ran for over {timeout} s"
            time.sleep(poll / 10 if mode == "in flight" and kill_now else poll)
        if child.is_alive():
            writing = in_flight()
            started_by_child = tagged_processes(tag) if tag else []
            child.kill()
            child.join()
            kills_here += 1
            log.kills += 1
            log.kills_in_flight += writing
            log.progress_at_kill.append(progress())
            if tag:
                log.workers_at_kill.append(len(started_by_child))
                _assert_none_outlive(tag, grace, log, f"the killed {target.__name__}")
            watcher.check()
            continue
        child.join()
        assert child.exitcode == 0, f"{target.__name__} failed with exit code {child.exitcode}"
        if tag:
            _assert_none_outlive(tag, grace, log, f"the finished {target.__name__}")
        watcher.check()
        log.finished_runs += 1
        return


def _assert_none_outlive(tag: str, grace: float, log: KillLog, whose: str) -> None:
    alive, waited = outliving(tag, grace)
    log.worker_ends.append(round(waited, 2))
    if alive:
        described = [_describe_process(pid) for pid in alive]
        end_orphans(alive)
        raise AssertionError(f"{len(alive)} processes started by {whose} outlived it: {described}")


def _describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} (state {state[0]}, parent {state[1]}): {command}"


def read_curated_as_a_reader(root: Path):
    """(the rule of the generation readers see: its threshold, or its recorded options when it
    has other rules, its (key, text_id) pairs), or None when a generation was removed between
    resolving and reading it (a reader would retry)."""
    from capfilt.core.layout import Dataset

    folder = Dataset(str(root)).folder("curated")
    try:
        table = folder.read_all(["key", "text_id", "itm_score"])
    except FileNotFoundError:
        return None
    options = folder.record.get("options") or {}
    rule = options["threshold"] if set(options) == {"threshold"} else json.dumps(options)
    rows = [] if table is None else table.to_pylist()
    return rule, rows


def read_export_as_a_reader(out: Path) -> dict | None:
    """What a reader of --out sees, opened through one handle on the folder so that a rename
    meanwhile cannot mix two exports: its marker and, per shard, the samples it holds.

    None when there is no --out (between the renames of a switch), or when the export this
    reader opened was replaced and removed while it read (its files vanish: it fails, and
    reads again, as any reader of a replaced folder does; it never sees a mix)."""
    import tarfile

    import pyarrow.parquet as pq

    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        names = set(os.listdir(fd))
        with os.fdopen(os.open("_capfilt_export.json", os.O_RDONLY, dir_fd=fd), "rb") as f:
            marker = json.loads(f.read())
        samples = {}
        for name in marker["files"]:
            assert name in names or "/" in name, f"{name} listed but missing from {out}"
            if name.endswith(".tar"):
                with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                    with tarfile.open(fileobj=f) as tar:
                        samples[name] = len([m for m in tar.getnames() if m.endswith(".txt")])
            elif name.endswith(".parquet"):
                with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                    samples[name] = pq.ParquetFile(f).metadata.num_rows
        return dict(marker=marker, samples=samples, names=names)
    except FileNotFoundError:
        try:
            replaced = os.fstat(fd).st_ino != os.stat(out).st_ino
        except FileNotFoundError:
            replaced = True
        if replaced:
            return None
        raise
    finally:
        os.close(fd)


def temp_leftovers(root: Path) -> list[str]:
    """Temporary files anywhere under a folder (which a writer may be changing meanwhile)."""
    found = []
    for folder, dirs, files in os.walk(root):  # os.walk skips what vanishes under it
        for name in dirs + files:
            if ".tmp-" in name:
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found
