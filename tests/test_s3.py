"""A DATASET on S3: every stage through fsspec, against a local S3 server (moto) on 127.0.0.1.

Storage options come from the environment, as a user would set them: AWS keys and
AWS_ENDPOINT_URL (which botocore, and so s3fs, reads).
"""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from capfilt.cli import app  # noqa: E402
from capfilt.core.layout import STAGES, Dataset  # noqa: E402
from capfilt.stages.status import dataset_status  # noqa: E402

BUCKET = "capfilt-test"
ROOT = f"s3://{BUCKET}/ds"
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs at it."""
    import boto3
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        s3fs.S3FileSystem.clear_instance_cache()  # instances made before read another endpoint
        yield s3fs.S3FileSystem()
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def objects(fs, prefix: str = f"{BUCKET}/ds") -> list[str]:
    fs.invalidate_cache()
    return sorted(p.removeprefix(prefix + "/") for p in fs.find(prefix))


@pytest.fixture(scope="module")
def on_s3(s3, tmp_path_factory, tiny_captioner, tiny_filter):
    """fetch → caption → filter → report on s3://…/ds, all through the CLI."""
    from _web import local_web, write_list

    base = tmp_path_factory.mktemp("s3")
    with local_web(base / "web", n=8) as web:
        rows = web.rows()  # 8 toy images and the 5 broken pages: 4 shards
        url_list = write_list(rows, base / "urls.csv", "csv")
        fetch_args = ["fetch", str(url_list), ROOT, "--shard-size", str(SHARD_SIZE)]
        fetch_args += ["--image-size", "32", "--threads", "4", "--timeout", "5"]
        fetch_args += ["--allow-private-addresses"]
        invoke(*fetch_args)
        model = ["--workers", "0", "--batch-size", "4"]
        caption_args = ["caption", ROOT, "--model", str(tiny_captioner), "--max-length", "12"]
        filter_args = ["filter", ROOT, "--threshold", "0.3", "--model", str(tiny_filter)]
        invoke(*caption_args, *model)
        invoke(*filter_args, *model)
        invoke("report", ROOT)
        yield dict(
            urls=[r["url"] for r in rows],
            fetch_args=fetch_args,
            caption_args=caption_args,
            filter_args=filter_args,
            fs=s3,
        )


def test_every_stage_writes_its_shards_to_s3(on_s3):
    ds = Dataset(ROOT)
    assert not ds.is_local
    for stage in STAGES:
        assert ds.shards(stage) == [0, 1, 2, 3], stage
    images = ds.read_stage("images", columns=["url", "status"]).to_pylist()
    assert sorted(r["url"] for r in images) == sorted(on_s3["urls"])
    ok = sum(r["status"] == "success" for r in images)
    captions = ds.read_stage("captions", columns=["key"]).to_pylist()
    assert len(captions) == len({r["key"] for r in captions}) == ok
    assert ds.read_stage("scores").num_rows == 2 * ok  # web + one synthetic caption each
    listed = objects(on_s3["fs"])
    assert not [p for p in listed if ".tmp-" in p or "_incoming" in p], listed
    assert {f"images/.stats/{s:05d}.json" for s in range(4)} <= set(listed)
    manifest = ds.read_manifest()
    assert [r["stage"] for r in manifest["runs"]] == ["fetch", "caption", "filter"]


def test_report_is_written_to_s3(on_s3):
    fs = on_s3["fs"]
    from capfilt.stages.report import read_summary, report_file

    summary = read_summary(Dataset(ROOT))
    assert summary["dataset"] == ROOT
    assert summary["stages"]["images"]["rows"] == len(on_s3["urls"])
    assert report_file(Dataset(ROOT)).startswith(f"s3://{BUCKET}/ds/reports/gen-")
    assert b"<html" in fs.cat(report_file(Dataset(ROOT)))[:200].lower()


def test_query_reads_the_shards_on_s3(on_s3):
    out = invoke(
        "query", ROOT, "select count(*) as n, count(distinct key) as k from images", "-f", "csv"
    )
    n = len(on_s3["urls"])
    assert out.strip().splitlines()[-1] == f"{n},{n}"
    out = invoke(
        "query",
        ROOT,
        "select count(*) from scores s join captions c on s.key = c.key and s.text = c.text",
        "-f",
        "csv",
    )
    assert int(out.strip().splitlines()[-1]) > 0


def test_rerun_on_s3_fetches_only_a_missing_shard_and_redoes_what_it_made_stale(on_s3):
    fs = on_s3["fs"]
    fs.rm([f"{BUCKET}/ds/images/00002.parquet", f"{BUCKET}/ds/images/.stats/00002.json"])
    fs.invalidate_cache()
    invoke(*on_s3["fetch_args"])
    ds = Dataset(ROOT)
    run = ds.read_manifest()["runs"][-1]
    assert run["stage"] == "fetch"
    assert (run["counts"]["shards_done"], run["counts"]["shards_skipped"]) == (1, 3)
    urls = ds.read_stage("images", columns=["url"])["url"].to_pylist()
    assert sorted(urls) == sorted(on_s3["urls"])
    # Shard 2's captions and scores were made from the images fetched before: stale.
    status = dataset_status(ds)
    assert status.folder("captions").stale == [2] and status.folder("scores").stale == [2]
    assert status.folder("images").done == [0, 1, 2, 3]
    captioned = invoke(*on_s3["caption_args"])
    assert "redone" in captioned
    invoke(*on_s3["filter_args"])
    assert all(f.up_to_date for f in dataset_status(ds).folders if f.folder != "reports")
    # A new threshold re-derives curated/ from scores/ on S3 without a model.
    out = invoke(*on_s3["filter_args"][:2], "--threshold", "1.0", *on_s3["filter_args"][4:])
    assert "not loaded" in out
    assert ds.read_stage("curated").num_rows == 0
    assert not [p for p in objects(fs) if ".tmp-" in p]


# --- killed anywhere on S3 -------------------------------------------------------------------
# The kill harness of tests/test_kill.py (tests/_kill.py) with the dataset on S3: objects appear
# whole or not at all, but a rename is a copy and a delete, a folder a prefix, and nothing is
# locked; every run below is SIGKILLed at seeded random moments and resumed until one finishes.
S3_KILLS = 8  # kills per stage that land on a live process
PER_ROUND = 3  # then a run goes uninterrupted: kills spread over a run, not its last steps
S3_SHARD_SIZE = 2


@pytest.fixture(scope="module")
def ctx():
    from _kill import context

    return context()


@pytest.fixture(scope="module")
def s3_env(s3):
    """The S3 variables for a stage child (a fork-server child has the server's environment)."""
    import os

    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    names += ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN")
    return {name: os.environ.get(name) for name in names}  # None: unset in the child


@pytest.fixture
def watched(s3):
    """A filesystem that lists afresh every time, as a reader polling the bucket does."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def run_uninterrupted(ctx, target, *args) -> None:
    child = ctx.Process(target=target, args=args, daemon=False)
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 0, f"{target.__name__} failed with exit code {child.exitcode}"


def test_fetch_to_s3_killed_anywhere_downloads_every_row_once(ctx, s3, s3_env, watched, tmp_path):
    import random

    from _kill import KillLog, StoreWatcher, kill_until_done, run_fetch, store_leftovers
    from _web import local_web, write_list

    prefix = f"{BUCKET}/killed-fetch"
    root = f"s3://{prefix}"
    columns = ("url", "key", "status", "sha256", "caption")

    def rows_of(dataset: str) -> list[tuple]:
        table = Dataset(dataset).read_stage("images", columns=list(columns)).to_pylist()
        return sorted(tuple(r[c] for c in columns) for r in table)

    with local_web(tmp_path / "web", n=8) as web:
        listed = web.rows()  # 8 toy images and the 5 broken pages: 7 shards of 2
        url_list = write_list(listed, tmp_path / "urls.csv", "csv")
        urls = [r["url"] for r in listed]
        straight = tmp_path / "straight"  # the reference: an uninterrupted local fetch
        run_uninterrupted(ctx, run_fetch, str(url_list), str(straight), S3_SHARD_SIZE)
        want = rows_of(str(straight))

        def expect(stage: str, shard: int, table) -> None:
            want_urls = urls[shard * S3_SHARD_SIZE : (shard + 1) * S3_SHARD_SIZE]
            assert sorted(table["url"].to_pylist()) == sorted(want_urls), f"images/{shard:05d}"

        watcher = StoreWatcher(watched, prefix, ("images",), expect)
        rng = random.Random(21)
        log = KillLog()
        known: list = []  # see store_leftovers
        while log.kills < S3_KILLS:
            if s3.exists(prefix):
                s3.rm(prefix, recursive=True)
            kill_until_done(
                ctx,
                run_fetch,
                (str(url_list), root, S3_SHARD_SIZE),
                rng,
                watcher,
                progress=lambda: len(watcher.shards("images")),
                log=log,
                max_delay=1.5,
                max_kills=min(PER_ROUND, S3_KILLS - log.kills),
                in_flight=watcher.in_flight,
                env=s3_env,
                poll=0.02,
            )
            s3.invalidate_cache()
            assert rows_of(root) == want
            assert Dataset(root).shards("images") == list(range(7))
            assert not store_leftovers(s3, prefix, known), store_leftovers(s3, prefix)
            run = Dataset(root).read_manifest()["runs"][-1]
            assert run["counts"]["rows_in_images"] == len(urls)
    print(f"S3 fetch: {log} files checked={watcher.files_checked} known leftovers={known}")
    assert len(set(log.progress_at_kill)) > 1, "every kill landed at the same point"


def _sorted_rows(dataset: str, stage: str, columns: tuple[str, ...]) -> list[tuple]:
    table = Dataset(dataset).read_stage(stage, columns=list(columns))
    return sorted(tuple(r[c] for c in columns) for r in (table.to_pylist() if table else []))


THRESHOLD = 0.5


@pytest.fixture(scope="module")
def local_reference(ctx, tmp_path_factory, tiny_captioner, tiny_filter):
    """The images the S3 datasets below start from, captioned and filtered here, uninterrupted."""
    from _kill import run_caption, run_filter
    from conftest import write_images_dataset

    local = tmp_path_factory.mktemp("s3-kill") / "local"
    write_images_dataset(local, n_shards=4, per_shard=5, seed=12)  # 4 successes a shard
    run_uninterrupted(ctx, run_caption, str(local), str(tiny_captioner))
    run_uninterrupted(ctx, run_filter, str(local), str(tiny_filter), THRESHOLD)
    return local


def _kill_on_s3(ctx, s3, s3_env, watched, local, target, args, output, copied, seed, check):
    """Kill `target(root, *args)` on root = s3://BUCKET/killed-OUTPUT until S3_KILLS kills
    landed; each round starts from the images/ and `copied` folders of `local`, and ends with
    `check(root)`; the watcher checks every `output` shard it sees meanwhile.
    Returns the KillLog and the watcher."""
    import random

    from _kill import KillLog, StoreWatcher, kill_until_done, store_leftovers

    prefix = f"{BUCKET}/killed-{output}"
    root = f"s3://{prefix}"
    keys: dict[int, set] = {}  # successful rows per shard: a caption each, two scores each
    for row in Dataset(str(local)).read_stage("captions", columns=["key"]).to_pylist():
        keys.setdefault(int(row["key"][:5]), set()).add(row["key"])

    def expect(stage: str, shard: int, table) -> None:
        got = table["key"].to_pylist()
        per_key = 2 if stage == "scores" else 1
        assert set(got) == keys[shard] and len(got) == per_key * len(keys[shard]), stage

    watcher = StoreWatcher(watched, prefix, (output,), expect)
    rng = random.Random(seed)
    log = KillLog()
    known: list = []  # see store_leftovers
    while log.kills < S3_KILLS:
        if s3.exists(prefix):
            s3.rm(prefix, recursive=True)
        for folder in ("images", *copied):  # byte for byte: captions/ name these images
            s3.put(str(local / folder), f"{prefix}/", recursive=True)
        s3.invalidate_cache()
        kill_until_done(
            ctx,
            target,
            (root, *args),
            rng,
            watcher,
            progress=lambda: len(watcher.shards(output)),
            log=log,
            max_delay=1.5,
            max_kills=min(PER_ROUND, S3_KILLS - log.kills),
            in_flight=lambda: bool(watcher.temp_files()),
            env=s3_env,
            poll=0.02,
        )
        s3.invalidate_cache()
        check(root)
        assert not store_leftovers(s3, prefix, known), store_leftovers(s3, prefix)
        assert dataset_status(Dataset(root)).folder(output).done == [0, 1, 2, 3]
    assert len(set(log.progress_at_kill)) > 1, "every kill landed at the same point"
    print(f"S3 {output}: {log} files checked={watcher.files_checked} known leftovers={known}")
    return log, watcher


def test_caption_on_s3_killed_anywhere_writes_every_caption_once(
    ctx, s3, s3_env, watched, local_reference, tiny_captioner
):
    from _kill import run_caption

    columns = ("key", "caption_id", "text")
    want = _sorted_rows(str(local_reference), "captions", columns)

    def check(root: str) -> None:
        assert _sorted_rows(root, "captions", columns) == want

    _kill_on_s3(
        ctx, s3, s3_env, watched, local_reference, run_caption, (str(tiny_captioner),),
        "captions", (), 22, check,
    )  # fmt: skip


def test_filter_on_s3_killed_anywhere_scores_every_pair_once(
    ctx, s3, s3_env, watched, local_reference, tiny_filter
):
    from _kill import run_filter

    columns = ("key", "text_id", "text")
    want = _sorted_rows(str(local_reference), "scores", (*columns, "itm_score"))
    want_curated = _sorted_rows(str(local_reference), "curated", ("key", "text_id"))

    def check(root: str) -> None:
        got = _sorted_rows(root, "scores", (*columns, "itm_score"))
        assert [row[:3] for row in got] == [row[:3] for row in want]
        for row, ref in zip(got, want, strict=True):
            assert row[3] == pytest.approx(ref[3], abs=1e-5)
        assert _sorted_rows(root, "curated", ("key", "text_id")) == want_curated

    _kill_on_s3(
        ctx, s3, s3_env, watched, local_reference, run_filter, (str(tiny_filter), THRESHOLD),
        "scores", ("captions",), 23, check,
    )  # fmt: skip
