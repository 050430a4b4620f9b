"""Killed at any moment, resumed exactly once: fetch, caption, filter and pretrain under SIGKILL.

Each stage runs in a child process (forked from a server that preloaded the heavy modules, see
tests/_kill.py) that is SIGKILLed at seeded random moments: a third after a random delay, a
third just after it finished a shard or checkpoint, a third the moment a write is visibly under
way (a temporary file, a staged shard, a checkpoint without metadata). It is restarted and
killed again until a run finishes by itself. Meanwhile a watcher polls the folder: every
visible shard must be whole and hold exactly the rows it should, and capfilt.json must parse.
At the end every input row must appear exactly once in the stage's output, with the content an
uninterrupted run writes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _kill import (
    KillLog,
    ShardWatcher,
    checkpoint_in_flight,
    context,
    download_in_flight,
    kill_until_done,
    read_curated_as_a_reader,
    read_export_as_a_reader,
    run_caption,
    run_checkpoints,
    run_export,
    run_fetch,
    run_filter,
    run_pretrain,
    temp_leftovers,
)
from conftest import write_images_dataset

from capfilt.core.layout import Dataset

KILLS = 10  # kills per stage that land on a live process
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def ctx():
    return context()


def run_uninterrupted(ctx, target, *args) -> None:
    child = ctx.Process(target=target, args=args, daemon=False)  # it may start workers
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 0, f"{target.__name__} failed with exit code {child.exitcode}"


def successful_keys(root: Path, shard: int) -> list[str]:
    table = pq.read_table(Path(root) / "images" / f"{shard:05d}.parquet", columns=["key", "status"])
    keys, statuses = table["key"].to_pylist(), table["status"].to_pylist()
    return [k for k, s in zip(keys, statuses, strict=True) if s == "success"]


def sorted_rows(root: Path, stage: str, order: tuple[str, ...]) -> list[dict]:
    table = Dataset(str(root)).read_stage(stage)
    rows = table.to_pylist() if table is not None else []
    return sorted(rows, key=lambda r: tuple(r[c] for c in order))


def assert_finished_cleanly(root: Path, stages: tuple[str, ...]) -> None:
    assert not temp_leftovers(root), f"temporary files left behind: {temp_leftovers(root)}"
    manifest = json.loads((root / "capfilt.json").read_text())
    assert manifest["runs"], "the finished run was not recorded"
    ds = Dataset(str(root))
    for stage in stages:
        assert ds.shards(stage) == ds.shards("images"), stage


# --- caption and filter ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(ctx, tmp_path_factory, tiny_captioner, tiny_filter):
    """Images (10 shards of 5 rows, one failed download each), captioned and filtered once."""
    root = tmp_path_factory.mktemp("kill") / "reference"
    write_images_dataset(root, n_shards=10, per_shard=5, seed=11)
    run_uninterrupted(ctx, run_caption, str(root), str(tiny_captioner))
    run_uninterrupted(ctx, run_filter, str(root), str(tiny_filter), THRESHOLD)
    return root


def expect_rows(images_root: Path, captions_root: Path | None = None):
    """The watcher's check of one visible shard: exactly the rows this shard must hold."""
    keys_of = {}

    def expect(stage: str, shard: int, table) -> None:
        if shard not in keys_of:
            keys_of[shard] = successful_keys(images_root, shard)
        keys = keys_of[shard]
        if stage == "captions":
            assert sorted(table["key"].to_pylist()) == sorted(keys), f"captions/{shard:05d}"
        elif stage == "scores":
            captions = pq.read_table(captions_root / "captions" / f"{shard:05d}.parquet")
            synthetic = zip(
                captions["key"].to_pylist(), captions["caption_id"].to_pylist(), strict=True
            )
            want = sorted([(k, 0) for k in keys] + [(k, c + 1) for k, c in synthetic])
            got = sorted(zip(table["key"].to_pylist(), table["text_id"].to_pylist(), strict=True))
            assert got == want, f"scores/{shard:05d}"
        elif stage == "curated":
            got = list(zip(table["key"].to_pylist(), table["text_id"].to_pylist(), strict=True))
            assert len(got) == len(set(got)) and {k for k, _ in got} <= set(keys)

    return expect


def test_caption_killed_anywhere_writes_every_caption_once(
    ctx, reference, tiny_captioner, tmp_path
):
    rng = random.Random(7)
    root = tmp_path / "ds"
    want = sorted_rows(reference, "captions", ("key", "caption_id"))
    watcher = ShardWatcher(root, ("captions",), expect_rows(reference))
    log = KillLog()
    rounds = 0
    while log.kills < KILLS:
        shutil.rmtree(root, ignore_errors=True)  # each round starts from images/ alone
        shutil.copytree(reference / "images", root / "images")
        kill_until_done(
            ctx,
            run_caption,
            (str(root), str(tiny_captioner)),
            rng,
            watcher,
            progress=lambda: len(watcher.shards("captions")),
            log=log,
            max_delay=1.0,
            max_kills=KILLS - log.kills,
        )
        rounds += 1
        assert sorted_rows(root, "captions", ("key", "caption_id")) == want
        assert_finished_cleanly(root, ("captions",))
    print(
        f"caption: {log} rounds={rounds} files checked={watcher.files_checked} "
        f"polls with a temporary file={watcher.temp_files_seen}"
    )
    assert len(set(log.progress_at_kill)) > 1, "every kill landed at the same point"


def test_vlm_caption_killed_anywhere_writes_every_caption_once(ctx, reference, tmp_path):
    """The same for an image-text-to-text captioner (a tiny LLaVA): resumed after each kill,
    every image gets exactly the captions an uninterrupted run writes."""
    from capfilt.models.tiny_vlm import build_llava

    llava = build_llava(tmp_path / "llava")
    clean = tmp_path / "clean"
    shutil.copytree(reference / "images", clean / "images")
    run_uninterrupted(ctx, run_caption, str(clean), str(llava))
    want = sorted_rows(clean, "captions", ("key", "caption_id"))
    assert want and all(r["model"] == str(llava) or r["status"] != "success" for r in want)
    rng = random.Random(17)
    root = tmp_path / "ds"
    watcher = ShardWatcher(root, ("captions",), expect_rows(reference))
    log = KillLog()
    while log.kills < KILLS:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(reference / "images", root / "images")
        kill_until_done(
            ctx,
            run_caption,
            (str(root), str(llava)),
            rng,
            watcher,
            progress=lambda: len(watcher.shards("captions")),
            log=log,
            max_delay=2.5,
            max_kills=KILLS - log.kills,
        )
        assert sorted_rows(root, "captions", ("key", "caption_id")) == want
        assert_finished_cleanly(root, ("captions",))
    print(f"vlm caption: {log} files checked={watcher.files_checked}")
    assert len(set(log.progress_at_kill)) > 1, "every kill landed at the same point"


def test_filter_killed_anywhere_scores_every_pair_once(ctx, reference, tiny_filter, tmp_path):
    rng = random.Random(8)
    root = tmp_path / "ds"
    want_scores = sorted_rows(reference, "scores", ("key", "text_id"))
    want_curated = sorted_rows(reference, "curated", ("key", "text_id"))
    watcher = ShardWatcher(root, ("scores", "curated"), expect_rows(reference, reference))
    log = KillLog()
    while log.kills < KILLS:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        for stage in ("images", "captions"):
            shutil.copytree(reference / stage, root / stage)
        kill_until_done(
            ctx,
            run_filter,
            (str(root), str(tiny_filter), THRESHOLD),
            rng,
            watcher,
            progress=lambda: len(watcher.shards("scores")),
            log=log,
            max_delay=1.0,
            max_kills=KILLS - log.kills,
        )
        got = sorted_rows(root, "scores", ("key", "text_id"))
        assert [(r["key"], r["text_id"], r["text"]) for r in got] == [
            (r["key"], r["text_id"], r["text"]) for r in want_scores
        ]
        for row, ref in zip(got, want_scores, strict=True):
            assert row["itm_score"] == pytest.approx(ref["itm_score"], abs=1e-5)
        assert [
            (r["key"], r["text_id"]) for r in sorted_rows(root, "curated", ("key", "text_id"))
        ] == [(r["key"], r["text_id"]) for r in want_curated]
        assert_finished_cleanly(root, ("scores", "curated"))
    print(
        f"filter: {log} files checked={watcher.files_checked} "
        f"polls with a temporary file={watcher.temp_files_seen}"
    )


def _top_fraction(scores: list[dict], fraction: float, column: str) -> list:
    """The pairs `--top-fraction fraction --by column` keeps, worked out here: the ⌈F·n⌉-th
    highest of the n scored values is the cut-off, and every pair at or above it is kept."""
    import math

    values = sorted((r[column] for r in scores if r[column] is not None), reverse=True)
    cutoff = values[math.ceil(fraction * len(values)) - 1]
    return [
        (r["key"], r["text_id"]) for r in scores if r[column] is not None and r[column] >= cutoff
    ]


@pytest.mark.parametrize(
    "new_rule",
    [0.3, {"top_fraction": 0.3, "by": "itc_score"}],
    ids=["threshold", "top-fraction"],
)
def test_rule_change_killed_anywhere_never_shows_a_mixed_curated(
    ctx, reference, tiny_filter, tmp_path, new_rule
):
    """filter with a new rule (threshold 0.3, or the top 30 % by ITC) over curated/ at
    threshold 0.5, killed anywhere: a reader sees all of one rule's pairs or all of the other's,
    never some shards of each; the resumed run ends with all of the new rule's."""
    rng = random.Random(10)
    root = tmp_path / "ds"
    scores = sorted_rows(reference, "scores", ("key", "text_id"))

    def kept(threshold: float) -> list:
        return [
            (r["key"], r["text_id"])
            for r in scores
            if r["itm_score"] is not None and r["itm_score"] >= threshold
        ]

    if isinstance(new_rule, dict):
        new_pairs = _top_fraction(scores, new_rule["top_fraction"], new_rule["by"])
    else:
        new_pairs = kept(new_rule)
    wanted = {"old": kept(THRESHOLD), "new": new_pairs}
    assert wanted["old"] != wanted["new"]
    seen: dict = {"old": 0, "new": 0}

    def which(rule) -> str:
        """The generation a reader saw: the old threshold's, or the new rule's."""
        if rule == THRESHOLD:
            return "old"
        assert rule == new_rule or '"top_fraction": 0.3' in str(rule), rule
        return "new"

    def whole() -> None:
        read = read_curated_as_a_reader(root)
        if read is None:
            return
        rule, rows = read
        got = sorted((r["key"], r["text_id"]) for r in rows)
        assert got == wanted[which(rule)], f"curated/ by {rule} is not whole"
        seen[which(rule)] += 1

    def curated_written() -> int:
        return len(list((root / "curated").glob("gen-*/*.parquet")))

    watcher = ShardWatcher(root, ("scores",), whole=whole)
    log = KillLog()
    while log.kills < KILLS:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(reference, root)  # scored and curated at THRESHOLD
        kill_until_done(
            ctx,
            run_filter,
            (str(root), str(tiny_filter), new_rule),
            rng,
            watcher,
            progress=curated_written,
            log=log,
            max_delay=0.6,
            max_kills=KILLS - log.kills,
            in_flight=lambda: bool(temp_leftovers(root / "curated")),
        )
        rule, rows = read_curated_as_a_reader(root)
        assert which(rule) == "new"
        assert sorted((r["key"], r["text_id"]) for r in rows) == wanted["new"]
        assert not temp_leftovers(root), temp_leftovers(root)
        assert len(Dataset(str(root)).generations("curated")) <= 2
    print(f"rule change: {log} reads of a whole curated/ by each rule: {seen}")
    assert seen["old"] and seen["new"]


def test_export_killed_anywhere_is_resumed_and_switched_in_whole(
    ctx, reference, tiny_filter, tmp_path
):
    """export-data --overwrite of a parquet export as webdataset, killed anywhere: --out is
    always one whole export (the old or the new); the last run leaves nothing in staging."""
    dataset = tmp_path / "ds"
    shutil.copytree(reference, dataset)  # export-data records its run in the manifest
    run_uninterrupted(ctx, run_filter, str(dataset), str(tiny_filter), 0.3)  # keeps some pairs
    first, straight = tmp_path / "first", tmp_path / "straight"
    run_uninterrupted(ctx, run_export, str(dataset), str(first), "parquet", False)
    run_uninterrupted(ctx, run_export, str(dataset), str(straight), "webdataset", False)
    pairs = read_export_as_a_reader(first)["marker"]["pairs"]
    assert pairs == read_export_as_a_reader(straight)["marker"]["pairs"] > 0

    out = tmp_path / "out"
    staging = tmp_path / ".out.capfilt-export"
    formats_seen: dict = {"parquet": 0, "webdataset": 0}

    def whole() -> None:
        read = read_export_as_a_reader(out)
        if read is None:
            return
        marker = read["marker"]
        assert sum(read["samples"].values()) == marker["pairs"] == pairs, marker["format"]
        listed = {f for f in marker["files"] if "/" not in f}
        assert read["names"] - {"_capfilt_export.json", ".provenance"} == listed
        formats_seen[marker["format"]] += 1

    def staged() -> int:
        return len(list(staging.glob("*.tar")))

    watcher = ShardWatcher(out, (), whole=whole)
    rng = random.Random(11)
    log = KillLog()
    while log.kills < KILLS:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(first, out)
        kill_until_done(
            ctx,
            run_export,
            (str(dataset), str(out), "webdataset", True),
            rng,
            watcher,
            progress=staged,
            log=log,
            max_delay=0.5,
            max_kills=KILLS - log.kills,
            in_flight=lambda: bool(temp_leftovers(tmp_path)),
        )
        assert read_export_as_a_reader(out)["marker"]["format"] == "webdataset"
        for name in sorted(p.name for p in straight.glob("*.tar")):
            assert _tar_samples(out / name) == _tar_samples(straight / name), name
        assert not staging.exists() and not (tmp_path / ".out.capfilt-export-old").exists()
        assert not temp_leftovers(tmp_path), temp_leftovers(tmp_path)
    print(f"export: {log} reads of a whole --out: {formats_seen}")
    assert formats_seen["parquet"] and formats_seen["webdataset"]


def _tar_samples(path: Path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as tar:
        return sorted((m.name, tar.extractfile(m).read()) for m in tar.getmembers())


# --- fetch -----------------------------------------------------------------------------------
FETCH_SHARD_SIZE = 2


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from _web import local_web

    with local_web(tmp_path_factory.mktemp("killweb"), n=24) as served:
        yield served


def fetch_watcher(root: Path, urls: list[str], shard_size: int) -> ShardWatcher:
    """A watcher of images/ whose every shard holds the rows img2dataset gives it."""

    def expect(stage: str, shard: int, table) -> None:
        # img2dataset gives shard N the list's rows N*size ... N*size + size - 1.
        want = urls[shard * shard_size : (shard + 1) * shard_size]
        assert sorted(table["url"].to_pylist()) == sorted(want), f"images/{shard:05d}"

    return ShardWatcher(root, ("images",), expect)


def test_fetch_killed_anywhere_downloads_every_row_once(ctx, web, tmp_path):
    from _web import expected_status, write_list

    listed = web.rows()  # 24 toy images and the 5 broken pages: 15 shards of 2 rows
    url_list = write_list(listed, tmp_path / "urls.csv", "csv")
    urls = [r["url"] for r in listed]
    root = tmp_path / "ds"
    watcher = fetch_watcher(root, urls, FETCH_SHARD_SIZE)
    rng = random.Random(9)
    log = KillLog()
    while log.kills < KILLS:
        shutil.rmtree(root, ignore_errors=True)
        kill_until_done(
            ctx,
            run_fetch,
            (str(url_list), str(root), FETCH_SHARD_SIZE),
            rng,
            watcher,
            progress=lambda: len(watcher.shards("images")),
            log=log,
            max_delay=0.6,
            max_kills=KILLS - log.kills,
            in_flight=lambda: download_in_flight(root) or bool(watcher.temp_files()),
        )
        rows = sorted_rows(root, "images", ("url",))
        assert [r["url"] for r in rows] == sorted(urls)
        assert len({r["key"] for r in rows}) == len(rows)
        for row in rows:
            assert row["status"] == expected_status(row["url"])[0], row
        ds = Dataset(str(root))
        assert ds.shards("images") == list(range(15))
        for shard in ds.shards("images"):
            stats = json.loads(Path(ds.stats_path("images", shard)).read_text())
            assert stats["count"] == (FETCH_SHARD_SIZE if shard < 14 else 1)
        assert not (root / "images" / "_incoming").exists()
        assert not temp_leftovers(root), temp_leftovers(root)
        # (A run killed after it recorded itself leaves a record too.)
        run = json.loads((root / "capfilt.json").read_text())["runs"][-1]
        assert run["counts"]["rows_in_images"] == len(urls)
    print(f"fetch: {log} files checked={watcher.files_checked}")

    # A kill inside img2dataset's write of a stats file leaves it empty beside a whole
    # parquet: the re-run must fetch that shard again, not fail on the empty file.
    staging = root / "images" / "_incoming"
    staging.mkdir()
    (root / "images" / "00003.parquet").rename(staging / "00003.parquet")
    Path(Dataset(str(root)).stats_path("images", 3)).unlink()
    (staging / "00003_stats.json").write_text("")  # img2dataset's name for it
    run_uninterrupted(ctx, run_fetch, str(url_list), str(root), FETCH_SHARD_SIZE)
    assert [r["url"] for r in sorted_rows(root, "images", ("url",))] == sorted(urls)
    stats = Path(Dataset(str(root)).stats_path("images", 3))
    assert json.loads(stats.read_text())["count"] == 2
    assert not staging.exists()


MP_SHARD_SIZE = 4  # 29 rows: 8 shards, so each of the 2 workers has several
MP_KILLS = 6  # each run spawns 3 processes that import img2dataset (~4 s on two cores)


def fetched_rows(root: Path) -> list[tuple]:
    """(url, key, status, sha256, caption) of every row of images/, sorted by url."""
    columns = ("url", "key", "status", "sha256", "caption")
    return [tuple(r[c] for c in columns) for r in sorted_rows(root, "images", ("url",))]


def test_multiprocess_fetch_killed_anywhere_leaves_no_worker_and_downloads_every_row_once(
    ctx, web, tmp_path
):
    """fetch --processes 2 (img2dataset's multiprocessing distributor: a spawned pool of two
    workers and a logger process) SIGKILLed anywhere: nothing it started outlives it, and the
    resumed run has every row once, as an uninterrupted run has them."""
    from _web import expected_status, write_list

    listed = web.rows()
    url_list = write_list(listed, tmp_path / "urls.csv", "csv")
    urls = [r["url"] for r in listed]
    straight = tmp_path / "straight"  # the reference: one uninterrupted fetch (one process)
    run_uninterrupted(ctx, run_fetch, str(url_list), str(straight), MP_SHARD_SIZE)
    want = fetched_rows(straight)
    assert [(url, status) for url, _, status, _, _ in want] == sorted(
        (url, expected_status(url)[0]) for url in urls
    )
    root = tmp_path / "ds"
    watcher = fetch_watcher(root, urls, MP_SHARD_SIZE)
    rng = random.Random(12)
    log = KillLog()
    rounds = 0
    while log.kills < MP_KILLS:
        shutil.rmtree(root, ignore_errors=True)
        kill_until_done(
            ctx,
            run_fetch,
            (str(url_list), str(root), MP_SHARD_SIZE, 2),
            rng,
            watcher,
            progress=lambda: len(watcher.shards("images")),
            log=log,
            max_delay=6.0,
            max_kills=MP_KILLS - log.kills,
            # While a worker writes a shard (the fetch process's own writes: the test above).
            in_flight=lambda: download_in_flight(root),
            workers=True,
        )
        rounds += 1
        assert fetched_rows(root) == want
        ds = Dataset(str(root))
        assert ds.shards("images") == list(range(8))
        assert not (root / "images" / "_incoming").exists()
        assert not temp_leftovers(root), temp_leftovers(root)
        run = json.loads((root / "capfilt.json").read_text())["runs"][-1]
        assert run["counts"]["rows_in_images"] == len(urls)
    print(f"multi-process fetch: {log} rounds={rounds} files checked={watcher.files_checked}")
    # Kills found the pool and the logger process at work (3 processes; fewer while it starts
    # or ends, or replaces a worker at its task limit) and none of them outlived the kill.
    assert sum(n >= 2 for n in log.workers_at_kill) >= 2, log.workers_at_kill


# --- pretrain --------------------------------------------------------------------------------
def pretrain_options(dataset: Path, out: Path) -> dict:
    # 32 pairs in batches of 4: 8 batches an epoch, so resumes land mid-epoch and across one.
    # Streamed through a shuffle buffer smaller than the data, decoded by 2 worker processes.
    return dict(
        datasets=(str(dataset),),
        out=str(out),
        preset="tiny",
        vocab_size=200,
        batch_size=4,
        max_steps=16,
        save_every=2,
        keep_last=2,
        queue_size=16,
        lr=1e-3,
        warmup_steps=2,
        num_workers=2,
        shuffle_buffer=6,
        progress=False,
        seed=7,
    )


def test_pretrain_killed_anywhere_resumes_from_the_last_complete_checkpoint(
    ctx, reference, tmp_path
):
    from safetensors.torch import load_file

    from capfilt.training.runs import read_log

    dataset = tmp_path / "ds"
    shutil.copytree(reference / "images", dataset / "images")  # web captions: 32 pairs
    straight = tmp_path / "straight"
    run_uninterrupted(ctx, run_pretrain, pretrain_options(dataset, straight), str(tmp_path / "x"))
    want = {r["step"]: r for r in read_log(straight)}
    assert sorted(want) == list(range(1, 17))

    out = tmp_path / "run"
    resumes = tmp_path / "resumes.txt"
    expected_resume: list[int | None] = []  # per child started, the newest complete step

    def before_start() -> None:
        steps = run_checkpoints(out)
        expected_resume.append(steps[-1] if steps else None)

    watcher = ShardWatcher(out, ())
    rng = random.Random(10)
    log = KillLog()
    while log.kills < KILLS:
        shutil.rmtree(out, ignore_errors=True)
        resumes.unlink(missing_ok=True)
        expected_resume.clear()
        first_pid = len(log.pids)
        kill_until_done(
            ctx,
            run_pretrain,
            (pretrain_options(dataset, out), str(resumes)),
            rng,
            watcher,
            progress=lambda: (run_checkpoints(out) or [0])[-1],
            log=log,
            max_delay=1.0,
            max_kills=KILLS - log.kills,
            before_start=before_start,
            in_flight=lambda: checkpoint_in_flight(out),
        )
        # Every run resumed from the newest complete checkpoint there was when it started.
        loaded = {}
        if resumes.exists():
            for line in resumes.read_text().splitlines():
                pid, folder = line.split()
                assert int(pid) not in loaded, "a run loaded two checkpoints"
                loaded[int(pid)] = folder
        for pid, expected in zip(log.pids[first_pid:], expected_resume, strict=True):
            if expected is None:
                assert pid not in loaded, f"resumed from {loaded[pid]} with no complete checkpoint"
            elif pid in loaded:  # (a run killed before it loaded noted nothing)
                assert loaded[pid] == f"step-{expected}"
        # The run that finished resumed from the newest checkpoint; when that was the last
        # step's (a kill after the final save), it found the run done and loaded nothing.
        last = expected_resume[-1]
        if last == 16:
            assert log.pids[-1] not in loaded
        else:
            assert last is None or loaded.get(log.pids[-1]) == f"step-{last}"
        # The log holds each step once, and the run followed the uninterrupted trajectory.
        got = read_log(out)
        assert [r["step"] for r in got] == list(range(1, 17))
        for record in got:
            for term in ("loss_itc", "loss_itm", "loss_lm"):
                assert record[term] == pytest.approx(want[record["step"]][term], abs=1e-5)
        steps = [p for p in out.iterdir() if p.name.startswith("step-")]
        assert all((p / "metadata.json").is_file() for p in steps), "incomplete checkpoint left"
        for path in [out / "config.json"] + [p / "metadata.json" for p in steps]:
            assert isinstance(json.loads(path.read_text()), dict), path
        assert run_checkpoints(out) == [14, 16]
        final = load_file(str(out / "step-16" / "model.safetensors"))
        reference_final = load_file(str(straight / "step-16" / "model.safetensors"))
        for name, tensor in reference_final.items():
            assert (final[name] - tensor).abs().max() < 1e-4, name
    print(f"pretrain: {log}")


def test_resume_drops_a_log_line_cut_short_by_a_kill(tmp_path):
    from capfilt.training.runs import read_log, truncate_log

    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss_lm": 1.0 / s}) for s in (1, 2, 3)]
    log.write_text("\n".join(lines) + '\n{"step": 4, "loss_')  # killed inside a write
    truncate_log(log, 2)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    truncate_log(log, 0)  # a fresh start (no checkpoint) logs every step again
    assert read_log(tmp_path) == []
