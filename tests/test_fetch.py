"""capfilt fetch against the toy web on 127.0.0.1: statuses, formats, resume, engines, errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from _web import expected_status, local_web, read_images, write_list
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.layout import Dataset
from capfilt.demo import toyweb
from capfilt.sources.url_list import read_url_list
from capfilt.stages.fetch import FetchOptions, fetch, options_from_manifest

# The toy web is served on 127.0.0.1, which fetch refuses without the flag.
FAST = dict(image_size=32, threads=4, timeout=5, allow_private_addresses=True)
MANIFESTS = sorted((Path(__file__).parent.parent / "data_manifests").glob("*.toml"))


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    with local_web(tmp_path_factory.mktemp("toyweb")) as served:
        yield served


@pytest.fixture(scope="module")
def fetched(web, tmp_path_factory):
    """One fetch of 12 toy images and every broken page, 8 rows a shard (3 shards)."""
    base = tmp_path_factory.mktemp("fetched")
    url_list = write_list(web.rows(), base / "urls.csv", "csv")
    progress = []
    result = fetch(
        str(url_list),
        str(base / "ds"),
        FetchOptions(shard_size=8, **FAST),
        on_progress=lambda done, total, ok: progress.append((done, total, ok)),
    )
    return dict(
        result=result,
        dataset=base / "ds",
        url_list=url_list,
        progress=progress,
        requests=list(web.server.requests),
    )


def test_every_row_appears_once_with_its_status(web, fetched):
    rows = read_images(fetched["dataset"])
    listed = [r["url"] for r in web.rows()]
    assert sorted(r["url"] for r in rows) == sorted(listed)
    assert len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        status, error = expected_status(row["url"])
        assert row["status"] == status, row
        if error is None:
            assert row["error_message"] is None
            assert row["width"] == 32 and row["height"] == 32
            assert row["original_width"] == (64 if "redirect" in row["url"] else 48)
        else:
            assert error in row["error_message"], row
    result = fetched["result"]
    assert result.complete and result.rows_in_images == result.rows_in_list == len(listed)
    assert result.counts == {
        "count": 17,
        "successes": 13,
        "failed_to_download": 2,
        "failed_to_resize": 2,
    }
    assert result.errors["HTTP Error 404: Not Found"] == 1


def test_truth_columns_flow_into_images(web, fetched):
    rows = {r["url"]: r for r in read_images(fetched["dataset"])}
    for listed in web.rows(broken=False):
        row = rows[listed["url"]]
        assert row["caption"] == listed["caption"]
        assert row["true_caption"] == listed["true_caption"]
        assert row["caption_is_wrong"] is listed["caption_is_wrong"]
        assert row["wrong_kind"] == listed["wrong_kind"]
    assert sum(r["caption_is_wrong"] is True for r in rows.values()) == 3  # 12 * 0.25


def test_downloads_name_capfilt_and_honour_opt_out(fetched):
    agents = {agent for path, agent in fetched["requests"] if path != "/"}
    assert agents and all("capfilt" in agent for agent in agents)
    # The opted-out page was requested (its header is only seen on the answer), not kept.
    rows = read_images(fetched["dataset"])
    (opt_out,) = [r for r in rows if r["url"].endswith(toyweb.BROKEN_PAGES["opt_out"].path)]
    assert opt_out["status"] == "failed_to_download"


def assert_write_ids(root) -> None:
    """Every images/ shard carries a write id of its own in its footer."""
    import pyarrow.parquet as pq

    from capfilt.core.parquet import WRITE_ID

    ids = [
        pq.read_schema(path).metadata[WRITE_ID]
        for path in sorted(Path(root, "images").glob("*.parquet"))
    ]
    assert ids and len(set(ids)) == len(ids)


def test_shards_are_whole_and_recorded(fetched):
    ds = Dataset(str(fetched["dataset"]))
    assert ds.shards("images") == [0, 1, 2]
    assert_write_ids(fetched["dataset"])
    assert not (fetched["dataset"] / "images" / "_incoming").exists()
    for shard in range(3):
        stats = json.loads(Path(ds.stats_path("images", shard)).read_text())
        assert stats["count"] == (8 if shard < 2 else 1)
    assert fetched["progress"][-1] == (17, 17, 13)
    manifest = ds.read_manifest()
    assert manifest["source"]["url_list"] == str(fetched["url_list"])
    assert manifest["source"]["extra_columns"] == ["true_caption", "caption_is_wrong", "wrong_kind"]
    (run,) = manifest["runs"]
    assert run["stage"] == "fetch" and run["counts"]["rows_in_images"] == 17
    assert run["options"]["shard_size"] == 8 and run["user_agent_token"] == "capfilt"


def test_rerun_resumes_only_missing_shards(web, fetched, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(fetched["dataset"], ds)
    (ds / "images" / "00001.parquet").unlink()
    Path(Dataset(str(ds)).stats_path("images", 1)).unlink()
    # As if the first run had been killed before it could record itself.
    manifest = json.loads((ds / "capfilt.json").read_text())
    (ds / "capfilt.json").write_text(json.dumps({**manifest, "runs": []}))
    web.server.requests.clear()
    result = fetch(str(fetched["url_list"]), str(ds), FetchOptions(shard_size=8, **FAST))
    assert result.shards_done_now == [1] and result.shards_skipped == [0, 2]
    rows = read_images(ds)
    assert Counter(r["url"] for r in rows) == Counter(r["url"] for r in web.rows())
    shard_1_urls = {r["url"] for r in web.rows()[8:16]}
    requested = {web.base_url + path for path in web.requested()}
    assert requested - {web.base_url + "/broken/redirect-target.jpg"} <= shard_1_urls

    # Nothing missing: no download at all, and no row twice.
    web.server.requests.clear()
    again = fetch(str(fetched["url_list"]), str(ds), FetchOptions(shard_size=8, **FAST))
    assert again.shards_done_now == [] and again.counts["count"] == 0
    assert web.requested() == [] and len(read_images(ds)) == 17
    assert [r["stage"] for r in Dataset(str(ds)).read_manifest()["runs"]] == ["fetch"] * 2


def test_rerun_with_another_shard_size_is_refused(fetched, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(fetched["dataset"], ds)
    result = CliRunner().invoke(
        app, ["fetch", str(fetched["url_list"]), str(ds), "--shard-size", "5"]
    )
    assert result.exit_code == 2
    assert "--shard-size" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl", "json", "txt"])
def test_every_url_list_format_is_read_in_order(fmt, tmp_path):
    rows = [
        {
            "url": f"http://127.0.0.1:9/{i}.jpg",
            "caption": f"a red circle {i}",
            "n": i,
            "wrong_kind": None if i % 2 else "file_name",
        }
        for i in range(5)
    ]
    listing = read_url_list(str(write_list(rows, tmp_path / f"urls.{fmt}", fmt)), FetchOptions())
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(listing.files[0])
        assert listing.rows == 5 and listing.input_format == fmt
        assert table.column(listing.url_col).to_pylist() == [r["url"] for r in rows]
        if fmt == "txt":
            assert listing.caption_col is None and listing.extra_columns == []
        else:
            assert listing.caption_col == "caption"
            assert listing.extra_columns == ["n", "wrong_kind"]
            assert table.column("wrong_kind").to_pylist() == [r["wrong_kind"] for r in rows]
    finally:
        listing.cleanup()


def test_txt_list_end_to_end(web, tmp_path):
    url_list = write_list(web.rows(broken=False)[:3], tmp_path / "urls.txt", "txt")
    result = fetch(str(url_list), str(tmp_path / "ds"), FetchOptions(**FAST))
    rows = read_images(tmp_path / "ds")
    assert result.complete and [r["status"] for r in rows] == ["success"] * 3
    assert "caption" not in rows[0]


def test_pyspark_distributor_in_local_mode(web, tmp_path, monkeypatch):
    # capfilt starts its own local[2] session; a JVM that skips its slowest JIT tier starts
    # in about half the time, which is all this test needs of it.
    monkeypatch.setenv(
        "PYSPARK_SUBMIT_ARGS",
        "--driver-java-options '-XX:TieredStopAtLevel=1 -XX:+UseSerialGC' pyspark-shell",
    )
    rows = web.rows()[:2] + web.rows()[-3:]
    url_list = write_list(rows, tmp_path / "urls.jsonl", "jsonl")
    result = fetch(
        str(url_list),
        str(tmp_path / "ds"),
        FetchOptions(distributor="pyspark", processes=2, shard_size=5, **FAST),
    )
    assert result.complete and result.shards_done_now == [0]
    assert_write_ids(tmp_path / "ds")  # img2dataset's own writer, swapped for capfilt's
    got = read_images(tmp_path / "ds")
    assert sorted(r["url"] for r in got) == sorted(r["url"] for r in rows)
    for row in got:
        assert row["status"] == expected_status(row["url"])[0]


def test_cli_fetch_applies_a_manifest(web, tmp_path):
    """A headerless tsv whose columns and settings come from a data manifest TOML."""
    rows = web.rows(broken=False)[:3]
    url_list = tmp_path / "list.tsv"
    url_list.write_text("".join(f"{r['caption']}\t{r['url']}\n" for r in rows))
    manifest = tmp_path / "toy.toml"
    manifest.write_text(
        '[source]\nname = "toy"\nlicence = "synthetic"\n'
        '[fetch]\ninput_format = "tsv"\ncolumn_names = ["caption", "url"]\n'
        "image_size = 24\nshard_size = 2\nthreads = 2\ntimeout = 5\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "fetch",
            str(url_list),
            str(tmp_path / "ds"),
            "--manifest",
            str(manifest),
            "--allow-private-addresses",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 ok (100.0%)" in result.output and "3 of 3 rows" in result.output
    got = read_images(tmp_path / "ds")
    assert [r["caption"] for r in sorted(got, key=lambda r: r["key"])] == [
        r["caption"] for r in rows
    ]
    assert {r["width"] for r in got} == {24}
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.shards("images") == [0, 1]
    assert ds.read_manifest()["source"]["manifest"]["name"] == "toy"


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_data_manifests_parse_and_apply(path):
    from capfilt.sources.manifests import load_manifest
    from capfilt.stages.ingest import IngestOptions

    manifest = load_manifest(path)
    source = manifest["source"]
    for key in ("name", "title", "homepage", "licence", "expected_rows", "command"):
        assert source.get(key), f"{path.name}: [source] needs {key}"
    assert source["name"] == path.stem
    assert ("fetch" in manifest) != ("ingest" in manifest)
    if "fetch" in manifest:
        assert source["command"].startswith("capfilt fetch ")
        assert f"--manifest data_manifests/{path.name}" in source["command"]
        options, recorded = options_from_manifest(path, threads=7)
        for key, value in manifest["fetch"].items():
            got = getattr(options, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key
        assert options.threads == 7 and recorded["name"] == path.stem
    else:
        assert source["command"].startswith("capfilt ingest ")
        fields = set(IngestOptions.__dataclass_fields__)
        assert set(manifest["ingest"]) - {"kind"} <= fields


def _fails_cleanly(args: list[str], *needles: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    return text


def test_bad_input_gets_one_line_errors(tmp_path, monkeypatch):
    ds = str(tmp_path / "ds")
    good = write_list(
        [{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}], tmp_path / "u.csv", "csv"
    )
    _fails_cleanly(["fetch", str(tmp_path / "nope.csv"), ds], "not found")
    _fails_cleanly(["fetch", str(good), ds, "--url-col", "link"], "no column 'link'", "--url-col")
    _fails_cleanly(["fetch", str(good), ds, "--caption-col", "alt"], "no column 'alt'")
    empty = tmp_path / "empty.csv"
    empty.write_text("url,caption\n")
    _fails_cleanly(["fetch", str(empty), ds], "has no rows")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    _fails_cleanly(["fetch", str(broken), ds], "cannot read URL list")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('url,caption\nhttp://x/a.jpg,"a, b",extra,more\n')
    _fails_cleanly(["fetch", str(ragged), ds], "cannot read URL list")
    _fails_cleanly(["fetch", str(tmp_path / "u.xyz"), ds], "not found")
    (tmp_path / "u.xyz").write_text("x")
    _fails_cleanly(["fetch", str(tmp_path / "u.xyz"), ds], "--input-format")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _fails_cleanly(["fetch", str(good), str(a_file / "ds")], "cannot write to dataset folder")
    _fails_cleanly(["fetch", str(good), ds, "--manifest", str(tmp_path / "m.toml")], "not found")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[fetch\n")
    _fails_cleanly(["fetch", str(good), ds, "--manifest", str(bad_toml)], "cannot read")
    coco = MANIFESTS[[p.stem for p in MANIFESTS].index("coco_karpathy")]
    _fails_cleanly(["fetch", str(good), ds, "--manifest", str(coco)], "capfilt ingest", "[ingest]")


def test_missing_engines_fail_clearly(tmp_path, monkeypatch):
    import importlib.util

    good = write_list([{"url": "http://127.0.0.1:9/a.jpg"}], tmp_path / "u.csv", "csv")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("ray", "pyspark") else real(name, *a),
    )
    for engine in ("ray", "pyspark"):
        text = _fails_cleanly(
            ["fetch", str(good), str(tmp_path / "ds"), "--distributor", engine],
            f"--distributor {engine} needs",
            "pip install",
        )
        assert "multiprocessing" in text
    assert not (tmp_path / "ds" / "images").exists()


def test_a_folder_of_lists_numbers_shards_across_files(web, tmp_path):
    rows = web.rows(broken=False)
    folder = tmp_path / "lists"
    write_list(rows[:3], folder / "part-0.csv", "csv")
    write_list(rows[3:5], folder / "part-1.csv", "csv")
    listing = read_url_list(str(folder), FetchOptions())
    assert listing.rows == 5 and listing.rows_per_file == [3, 2]
    listing.cleanup()
    result = fetch(str(folder), str(tmp_path / "ds"), FetchOptions(shard_size=2, **FAST))
    assert result.complete and result.shards_done_now == [0, 1, 2]
    got = read_images(tmp_path / "ds")
    assert sorted(r["url"] for r in got) == sorted(r["url"] for r in rows[:5])


def test_reserved_column_names_are_not_kept(tmp_path):
    rows = [
        {
            "url": "http://127.0.0.1:9/a.jpg",
            "caption": "a",
            "key": "k1",
            "status": "new",
            "licence": "cc-by",
        }
    ]
    listing = read_url_list(str(write_list(rows, tmp_path / "u.csv", "csv")), FetchOptions())
    listing.cleanup()
    assert listing.extra_columns == ["licence"]
    assert listing.skipped_columns == ["key", "status"]


def test_folder_readers_read_images_as_one_table(fetched):
    """pandas, pyarrow and datasets read a stage folder whole: only shards sit in it (the stats
    and provenance files live in the hidden .stats/ and .provenance/, which they skip)."""
    import pandas as pd
    from datasets import load_dataset

    images = Path(fetched["dataset"]) / "images"
    assert sorted(p.name for p in images.iterdir() if p.is_file()) == [
        "00000.parquet",
        "00001.parquet",
        "00002.parquet",
    ]
    rows = len(pd.read_parquet(images, columns=["key"]))
    assert rows == 17
    loaded = load_dataset("parquet", data_dir=str(images), split="train")
    assert loaded.num_rows == 17
