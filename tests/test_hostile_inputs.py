"""Hostile URL lists, Parquet shards, capfilt.json manifests, data manifests and pipeline files
through every command that reads them (the image and caption kinds are in test_hostile.py).

What must come of each: every row of a URL list is exactly one row of images/ with a status,
or the list is refused in one line before anything is written; a shard another tool put in a
dataset gives correct output (every row once) or a one-line error naming the file; a damaged
manifest, data manifest or pipeline file is a one-line error, and nothing in any of them is
ever run by a shell. The last test counts the registry (tests/_hostile.py).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from _hostile import (
    DATA_MANIFESTS,
    LONG_PATH,
    MANIFESTS,
    PIPELINES,
    SHARDS,
    URL_LISTS,
    exercised,
    hostile_server,
    jpeg,
    registry,
)
from conftest import write_images_dataset
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.layout import Dataset
from capfilt.images.decode import decode_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOOD = jpeg()


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "2000"})


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    error = result.exception
    assert error is None or isinstance(error, SystemExit), f"traceback: {error!r}"


def error_line(result) -> str:
    """The CLI's one-line error: exit code 2, no traceback, the last line `error: ...` (a
    progress bar may come before it, no other error line)."""
    no_traceback(result)
    output = result.output.strip()
    assert result.exit_code == 2, output
    *before, last = output.splitlines()
    assert last.startswith("error: "), output
    assert not any(line.startswith("error") for line in before), output
    return last


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (none when it does not exist), with its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- URL lists ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    routes = {f"/{i}.jpg": (lambda page: page.body(GOOD)) for i in range(10)}
    routes[LONG_PATH] = lambda page: page.body(GOOD)
    with hostile_server("127.0.0.1", routes) as (base, handler):
        yield base, handler


@pytest.fixture(scope="module")
def fetched_lists(served, tmp_path_factory):
    """Each hostile URL list fetched once with the CLI: (list file, dataset, result)."""
    base, handler = served
    folder = tmp_path_factory.mktemp("lists")
    fetched = {}
    for listed in URL_LISTS:
        path = folder / f"{listed.name}.{listed.suffix}"
        path.write_bytes(listed.build(base))
        ds = folder / f"ds-{listed.name}"
        result = invoke(
            "fetch", path, ds, "--allow-private-addresses", "--resize-mode", "no", "--timeout", "5"
        )
        fetched[listed.name] = (path, ds, result)
    return folder, fetched, handler


@pytest.mark.parametrize("listed", URL_LISTS, ids=[u.name for u in URL_LISTS])
def test_every_row_of_a_url_list_is_one_row_or_the_list_is_refused(listed, fetched_lists):
    _, fetched, _ = fetched_lists
    path, ds, result = fetched[listed.name]
    if listed.refused:
        line = error_line(result)
        assert listed.refused in line and str(path) in line, line
        assert not ds.exists()  # refused before anything was written
        return
    no_traceback(result)
    assert result.exit_code == 0, result.output
    rows = sorted(
        Dataset(str(ds)).read_stage("images").to_pylist(), key=lambda row: row["key"]
    )  # img2dataset numbers the keys in list order
    assert len(rows) == len(listed.rows), [r["url"] for r in rows]
    assert len({row["key"] for row in rows}) == len(rows)
    for row, (url_end, status, error) in zip(rows, listed.rows, strict=True):
        assert (row["url"] or "").endswith(url_end), (row["url"], url_end)
        assert row["status"] == status, row["error_message"]
        if error is None:
            assert row["error_message"] is None and (row["width"], row["height"]) == (40, 20)
            assert decode_image(row["jpg"]).image.size == (40, 20)
        else:
            assert error in row["error_message"] and row["jpg"] is None, row["error_message"]
    if listed.captions is not None:
        assert [row.get("caption") for row in rows] == list(listed.captions)


def test_url_lists_reach_only_http_and_write_only_the_dataset(fetched_lists):
    folder, fetched, handler = fetched_lists
    # Only the hostile server's own paths were asked for: no file, data or javascript URL went
    # anywhere, and the reserved columns a list brought (key, status, jpg, …) are not the rows'.
    assert set(handler.requests) <= set(handler.routes), set(handler.requests)
    _, ds, result = fetched["list_reserved_columns"]
    said = next(line for line in result.output.splitlines() if line.startswith("not kept"))
    assert said.endswith(": key, status, error_message, jpg, width, sha256"), said
    rows = Dataset(str(ds)).read_stage("images").to_pylist()
    assert {row["note"] for row in rows} == {"n0", "n1"}
    assert {row["key"] for row in rows} == {"000000000", "000000001"}
    made = {p.name for p in folder.iterdir()}
    wanted = {f"{u.name}.{u.suffix}" for u in URL_LISTS}
    wanted |= {f"ds-{u.name}" for u in URL_LISTS if not u.refused}
    assert made == wanted  # nothing beside the lists and their datasets
    exercised("url_list", "fetch", fetched)


# --- Parquet shards placed in a dataset ---------------------------------------------------------
def _shard_params() -> list:
    return [
        pytest.param(
            shard,
            id=shard.name,
            marks=[pytest.mark.xfail(strict=True, reason=shard.bug)] if shard.bug else [],
        )
        for shard in SHARDS
    ]


def _ended(result, shard_file: Path) -> bool:
    """True when the stage wrote its output; False after a one-line error that names the
    shard (or says that the stage it needs could not run)."""
    no_traceback(result)
    if result.exit_code == 0:
        return True
    line = error_line(result)
    named = str(shard_file) in line or "images/00000.parquet" in line
    assert named or "shards yet" in line or "first" in line, line
    return False


def _pairs(table, *columns) -> Counter:
    return Counter(tuple(row[c] for c in columns) for row in table.to_pylist())


def _through_every_stage(root: Path, shard_file: Path, tmp_path: Path, models) -> dict:
    """Run each stage of the registry's shard kinds over `root`, in order; returns what went
    wrong, by stage (every stage runs, whatever an earlier one did)."""
    tiny_captioner, tiny_filter = models
    ds = Dataset(str(root))
    source = pq_rows(shard_file)
    downloaded = [r for r in source if r.get("status") == "success"]
    out = tmp_path / "export"

    def caption():
        if _ended(
            invoke("caption", root, "--model", tiny_captioner, "--max-length", "6"), shard_file
        ):
            captions = ds.read_stage("captions")
            rows = captions.num_rows if captions is not None else 0
            # one caption row per downloaded image
            assert rows == len(downloaded), f"{rows} captions of {len(downloaded)} images"
            if rows:  # one row per (key, caption): an image is never taken for another
                twice = _pairs(captions, "key", "caption_id").most_common(1)[0]
                assert twice[1] == 1, f"captions/ has (key, caption_id) {twice[0]} {twice[1]}x"
                keys = set(captions["key"].to_pylist())
                assert keys == {str(r["key"]) for r in downloaded}, f"captions/ keys {keys}"

    def filter_():
        if _ended(invoke("filter", root, "--model", tiny_filter, "--threshold", "0"), shard_file):
            scores = ds.read_stage("scores")
            if scores is not None and scores.num_rows:
                twice = _pairs(scores, "key", "text_id").most_common(1)[0]  # scored once
                assert twice[1] == 1, f"scores/ has (key, text_id) {twice[0]} {twice[1]}x"
                web = [r for r in scores.to_pylist() if r["source"] == "web"]
                assert len(web) == len(downloaded), f"{len(web)} web scores"

    def query():
        result = invoke("query", root, "select count(*) as n from images", "-f", "csv")
        if _ended(result, shard_file):
            assert result.output.split() == ["n", str(len(source))]

    def report():
        if _ended(invoke("report", root), shard_file):
            summary = json.loads(next(root.glob("reports/gen-*/summary.json")).read_text())
            assert summary["stages"]["images"]["rows"] == len(source)

    def status():
        _ended(invoke("status", root), shard_file)

    def export():
        result = invoke("export-data", root, "--format", "webdataset", "--out", out)
        if _ended(result, shard_file):
            curated = ds.read_stage("curated")
            kept = curated.num_rows if curated is not None else 0
            marker = json.loads((out / "_capfilt_export.json").read_text())
            # each curated pair once, none made up
            assert marker["pairs"] == kept, f"{marker['pairs']} pairs exported of {kept} curated"

    stages = {
        "caption": caption,
        "filter": filter_,
        "query": query,
        "report": report,
        "status": status,
        "export-data": export,
    }
    assert tuple(stages) == _shard_stages()
    problems = {}
    for stage, check in stages.items():
        try:
            check()
        except AssertionError as e:
            problems[stage] = (str(e).strip().splitlines() or ["?"])[0][:200]
    return problems


def pq_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("shard", _shard_params())
def test_a_foreign_shard_gives_correct_output_or_a_one_line_error(
    shard, tmp_path, tiny_captioner, tiny_filter
):
    import pyarrow.parquet as pq

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    shard_file = root / "images" / "00000.parquet"
    pq.write_table(shard.build(), shard_file)
    problems = _through_every_stage(root, shard_file, tmp_path, (tiny_captioner, tiny_filter))
    assert not problems, problems


def _shard_stages() -> tuple[str, ...]:
    return next(k.stages for k in registry() if k.category == "shard")


def test_the_shard_tests_cover_the_registry():
    for stage in _shard_stages():
        exercised("shard", stage, [s.name for s in SHARDS])


# --- capfilt.json ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_manifests(tmp_path_factory):
    """A small images/ dataset per hostile capfilt.json."""
    folder = tmp_path_factory.mktemp("manifests")
    made = {}
    for manifest in MANIFESTS:
        root = folder / manifest.name
        write_images_dataset(root, n_shards=1, per_shard=3)
        (root / "capfilt.json").write_bytes(manifest.data)
        made[manifest.name] = root
    return folder, made


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.name for m in MANIFESTS])
def test_a_damaged_capfilt_json_is_one_line_in_status_fetch_and_run(
    manifest, broken_manifests, served
):
    folder, made = broken_manifests
    root = made[manifest.name]
    before = tree(root)
    line = error_line(invoke("status", root))
    assert manifest.message in line and str(root / "capfilt.json") in line, line

    base, _ = served
    urls = folder / f"{manifest.name}.csv"
    urls.write_text(f"url,caption\n{base}/0.jpg,a\n")
    result = invoke("fetch", urls, root, "--allow-private-addresses", "--overwrite")
    line = error_line(result)
    assert manifest.message in line and "capfilt.json" in line, line

    pipeline = folder / f"{manifest.name}.toml"
    pipeline.write_text(f'[pipeline]\ndataset = "{root}"\n[[stage]]\ncommand = "status"\n')
    result = invoke("run", pipeline)
    no_traceback(result)
    assert result.exit_code == 2
    assert f"error: {root / 'capfilt.json'}" in result.output and "stage 1 (status) failed" in (
        result.output
    )
    # Nothing was written: the lock files of the refused runs are all that is new.
    after = {k: v for k, v in tree(root).items() if not k.startswith(".capfilt")}
    assert after == before


def test_a_damaged_capfilt_json_stops_caption_filter_and_export_before_they_write(
    tmp_path, tiny_captioner, tiny_filter
):
    refused = {}
    for manifest in MANIFESTS:
        root = tmp_path / manifest.name
        write_images_dataset(root, n_shards=1, per_shard=2)
        (root / "capfilt.json").write_bytes(manifest.data)
        out = tmp_path / f"{manifest.name}-export"
        for stage, args in (
            ("caption", ["--model", tiny_captioner, "--max-length", "6"]),
            ("filter", ["--model", tiny_filter, "--threshold", "0"]),
            ("export-data", ["--format", "parquet", "--out", out]),
        ):
            before = tree(root)
            result = invoke(stage, root, *args)
            line = error_line(result)
            assert "capfilt.json" in line
            written = set(tree(root)) - set(before)
            written = {p for p in written if not p.startswith(".capfilt")}
            refused[(manifest.name, stage)] = not written and not out.exists()
    assert all(refused.values()), [k for k, ok in refused.items() if not ok]


def test_the_manifest_tests_cover_the_registry():
    for stage in ("status", "fetch", "run", "caption", "filter", "export-data"):
        exercised("manifest", stage, [m.name for m in MANIFESTS])


# --- data manifests ----------------------------------------------------------------------------
@pytest.mark.parametrize("manifest", DATA_MANIFESTS, ids=[d.name for d in DATA_MANIFESTS])
def test_a_hostile_data_manifest_is_one_line_before_anything_is_written(manifest, tmp_path, served):
    base, _ = served
    path = tmp_path / "source.toml"
    path.write_text(manifest.text)
    urls = tmp_path / "urls.csv"
    urls.write_text(f"url,caption\n{base}/0.jpg,a\n")
    line = error_line(invoke("fetch", urls, tmp_path / "ds", "--manifest", path))
    assert manifest.message in line, line
    assert not (tmp_path / "ds").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.toml", "urls.csv"]


def test_the_data_manifest_tests_cover_the_registry():
    exercised("data_manifest", "fetch --manifest", [d.name for d in DATA_MANIFESTS])


# --- pipeline files ----------------------------------------------------------------------------
def _pipeline_params() -> list:
    return [
        pytest.param(
            p, id=p.name, marks=[pytest.mark.xfail(strict=True, reason=p.bug)] if p.bug else []
        )
        for p in PIPELINES
    ]


@pytest.fixture
def pipeline_file(tmp_path):
    """Write a hostile pipeline for an existing dataset; the marker is what no stage may
    create (a shell would)."""
    dataset = tmp_path / "ds"
    write_images_dataset(dataset, n_shards=1, per_shard=2)
    marker = tmp_path / "marker"

    def write(pipeline) -> Path:
        text = pipeline.text.format(dataset=dataset, marker=marker)
        path = tmp_path / f"{pipeline.name}.toml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        return path

    return write, dataset, marker


@pytest.mark.parametrize("pipeline", _pipeline_params())
def test_a_hostile_pipeline_is_one_line_and_never_reaches_a_shell(pipeline, pipeline_file):
    write, dataset, marker = pipeline_file
    path = write(pipeline)
    before = tree(dataset)
    dry = invoke("run", path, "--dry-run")
    real = invoke("run", path, "--set", f"evil=$(touch {marker})")
    for result in (dry, real):
        no_traceback(result)
    if pipeline.message is not None and pipeline.at_load:
        for result in (dry, real):
            line = error_line(result)
            assert pipeline.message in line and str(path) in line, line
            assert "▶" not in result.output  # refused before any stage ran
    elif pipeline.message is not None:  # a stage's command line: refused when it comes
        assert dry.exit_code == 0
        line = error_line(real)
        assert pipeline.message in line and "stage 2 (" in line, line
    else:
        assert dry.exit_code == 0
        assert real.exit_code == 2 and "failed" in real.output  # a stage, not the file
    assert not marker.exists()
    assert {k: v for k, v in tree(dataset).items() if not k.startswith(".")} == {
        k: v for k, v in before.items() if not k.startswith(".")
    }


def test_shell_words_in_a_pipeline_are_arguments(pipeline_file):
    write, dataset, marker = pipeline_file
    shell = next(p for p in PIPELINES if p.name == "pipeline_shell_injection")
    result = invoke("run", write(shell), "--set", f"evil=$(touch {marker})")
    assert f"$(touch {marker}),`touch {marker}`,$(touch {marker})" in result.output  # as data
    assert f"capfilt status '{dataset}; touch {marker}'" in result.output
    assert f"error: dataset folder '{dataset}; touch {marker}' does not exist" in result.output
    assert not marker.exists()
    recursion = next(p for p in PIPELINES if p.name == "pipeline_variable_recursion")
    result = invoke("run", write(recursion), "--dry-run")
    assert "capfilt status '{b}'" in result.output  # a value is substituted once, not again


def test_the_pipeline_tests_cover_the_registry():
    for stage in ("run --dry-run", "run"):
        exercised("pipeline", stage, [p.name for p in PIPELINES])


# --- the registry ------------------------------------------------------------------------------
def test_the_registry_counts_at_least_30_kinds(capsys):
    kinds = registry()
    assert len(kinds) >= 30
    by_category: dict[str, list] = {}
    for kind in kinds:
        by_category.setdefault(kind.category, []).append(kind)
    pairs = sum(len(k.stages) for k in kinds)
    buggy = sum(len(k.bug_stages) for k in kinds)
    bugs = {bug for k in kinds for _, bug in k.bugs}
    with capsys.disabled():
        print(f"\nhostile kinds tried: {len(kinds)}; kind × stage pairs: {pairs}")
        for category, members in by_category.items():
            stages = sorted({s for k in members for s in k.stages})
            print(
                f"  {category:14s} {len(members):3d} kinds × {len(stages)} stages "
                f"({', '.join(stages)}) = {sum(len(k.stages) for k in members)} pairs"
            )
        print(
            f"  {sum(1 for k in kinds if k.bugs)} kinds meet one of {len(bugs)} known bugs "
            f"in {buggy} pairs (strict xfail tests); the other {pairs - buggy} pairs pass"
        )
    assert {"image", "caption", "url_list", "shard", "manifest", "data_manifest", "pipeline"} <= (
        set(by_category)
    )
    assert all(k.stages and k.expect for k in kinds)
