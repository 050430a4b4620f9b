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
    assert {f"images/{s:05d}_stats.json" for s in range(4)} <= set(listed)
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
    fs.rm([f"{BUCKET}/ds/images/00002.parquet", f"{BUCKET}/ds/images/00002_stats.json"])
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
