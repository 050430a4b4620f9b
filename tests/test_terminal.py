"""What capfilt prints: user data as written, one-line errors before any model loads, a quiet
screen without third-party bars or network calls, bars that fit 80 columns, closed pipes."""

from __future__ import annotations

import errno
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import write_images_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.text import printable

CAPFILT = [sys.executable, "-m", "capfilt"]
WIDE = {"COLUMNS": "2000"}  # rich wraps nothing at this width: every value is on one line
HOSTILE_TEXTS = [
    "[/b] nice pic",
    "[red]hi[/red]",
    ":x: :thumbs_up:",
    "[link=http://evil]click[/link]",
    "\x1b[31mred\x1b[0m \x1b]0;title\x07",
    "back\\[slash] [bold",
]


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})})


def one_line_error(result) -> str:
    """The CLI's error: exit code 2, one line at the end (after a progress bar, if work had
    begun), no traceback."""
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    *before, last = output.splitlines()
    assert last.startswith("error: ") and not any("error" in line for line in before), output
    return last


# --- user data as written ----------------------------------------------------------------------
@pytest.fixture
def hostile_captions(tmp_path):
    """A dataset whose web captions are markup, emoji codes and terminal escapes."""
    import pyarrow as pa

    from capfilt.core.layout import Dataset

    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=1, per_shard=len(HOSTILE_TEXTS))
    ds = Dataset(str(root))
    table = ds.read_shard("images", 0)
    captions = pa.array(HOSTILE_TEXTS, pa.string())
    ds.write_shard("images", 0, table.set_column(2, "caption", captions))
    return root


def test_query_prints_captions_as_written(hostile_captions):
    result = invoke("query", str(hostile_captions), "select caption from images order by key")
    assert result.exit_code == 0, result.output
    for text in HOSTILE_TEXTS:
        assert printable(text) in result.output
    assert "\x1b" not in result.output and "❌" not in result.output
    # The machine formats keep the bytes: they are for programs, not terminals.
    rows = invoke("query", str(hostile_captions), "select caption from images", "-f", "json")
    assert sorted(json.loads(line)["caption"] for line in rows.output.splitlines()) == sorted(
        HOSTILE_TEXTS
    )


class _Gone(http.server.BaseHTTPRequestHandler):
    """Every page: 410 with a reason phrase that is rich markup."""

    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(410, "[/red] :x: gone")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_message_that_is_markup_is_a_row_not_a_crash(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gone)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = tmp_path / "urls.csv"
        urls.write_text(f"url,caption\nhttp://127.0.0.1:{server.server_port}/a.jpg,a cat\n")
        result = invoke(
            "fetch", str(urls), str(tmp_path / "ds"), "--allow-private-addresses", "--timeout", "5"
        )
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert "[/red] :x: gone" in result.output
    rows = invoke("query", str(tmp_path / "ds"), "select error_message from images", "-f", "csv")
    assert "[/red] :x: gone" in rows.output


PRINTED_TEXT = (
    st.lists(
        st.sampled_from(
            list("[]/:\\=#ab x_") + ["\x1b", "\x07", "\x9b", "é", "[/]", ":x:", "[red]", "[link=a]"]
        ),
        min_size=1,
        max_size=12,
    )
    .map("".join)
    .filter(lambda s: s.strip())
)


def _rendered(print_it) -> str:
    """What `print_it()` shows through the consoles of the CLI's modules."""
    import importlib

    from rich.console import Console

    buffer = io.StringIO()
    modules = [importlib.import_module(f"capfilt.cli.{m}") for m in ("app", "data", "tools")]
    originals = [m.console for m in modules]
    for module in modules:
        module.console = lambda stderr=False: Console(
            file=buffer, width=2000, highlight=False, emoji=False
        )
    try:
        print_it()
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.console = original
    return buffer.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=PRINTED_TEXT)
def test_every_printer_of_user_data_prints_it_as_written(text):
    """Fuzz: a caption, a server message, a source name, a model id, a path or an error
    message reaches the screen as written, through every printer that shows one."""
    import importlib

    from capfilt.cli import data
    from capfilt.core.errors import CapfiltError
    from capfilt.report.terminal import models_table, print_summary

    shown = printable(text).strip()

    class Download:
        counts = dict(count=1, successes=0, failed_to_download=1, failed_to_resize=0)
        success_rate = 0.0
        errors = {text: 1}
        skipped_columns = [text]
        invalid_utf8_values = 0
        stale_downstream = {}

    summary = {
        "stages": {"images": {"shards": 1, "rows": 1, "images": 1}},
        "fetch": {"rows": 1, "status": {text: 1}, "error_kinds": {text: 1}},
        "captions": None,
        "scores": {
            "pairs": 1,
            "kept": 1,
            "kept_rate": 1.0,
            "by_source": {text: dict(pairs=1, mean_itm=0.5, kept=1, kept_rate=1.0)},
        },
        "selection": "threshold 0.5",
        "threshold_origin": "given",
        "truth": None,
    }
    compared = {"models": {text: {"i2t_r1": 0.5}, "other": {"i2t_r1": 0.6}}, "metrics": ["i2t_r1"]}
    cli_app = importlib.import_module("capfilt.cli.app")
    printers = [
        lambda: data.print_rows([text], [(text,)], "table"),
        lambda: data._print_download_summary(Download(), "fetch"),
        lambda: data._print_summary("caption", [("model", f"{text} @ -")]),
        lambda: print_summary(summary, cli_app.console()),
        lambda: cli_app.console().print(models_table(compared, "models")),
        lambda: cli_app.console().print(cli_app.markup("[bold]{x}[/]", x=text)),
    ]
    for print_it in printers:
        assert shown in _rendered(print_it), print_it

    def fail():  # an error message, as the command decorator prints it
        with pytest.raises(Exception) as raised:  # noqa: PT011 - typer.Exit
            cli_app._fail(CapfiltError(f"bad {text}"))
        assert type(raised.value).__name__ == "Exit"

    assert f"bad {printable(text)}".strip() in _rendered(fail)


# --- one-line errors, before any model loads ---------------------------------------------------
@pytest.fixture
def captioned(tmp_path, tiny_captioner, tiny_filter):
    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=2, per_shard=4)
    assert invoke("caption", str(root), "--model", str(tiny_captioner)).exit_code == 0
    result = invoke("filter", str(root), "--model", str(tiny_filter), "--threshold", "0.3")
    assert result.exit_code == 0, result.output
    return root


def test_a_truncated_shard_is_named_in_one_line(captioned, tmp_path):
    shard = captioned / "images" / "00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-200])
    # The model is never loaded: a model that does not exist is not reached.
    error = one_line_error(
        invoke("caption", str(captioned), "--model", str(tmp_path / "none"), "--overwrite")
    )
    assert str(shard) in error and "damaged" in error
    for args in (["report", str(captioned)], ["query", str(captioned), "select 1 from images"]):
        assert "00001.parquet" in one_line_error(invoke(*args))
    status = invoke("status", str(captioned))
    assert "images/ 00001 stale: damaged, not a Parquet file" in status.output


def test_a_damaged_captions_shard_is_named_when_read(captioned, tmp_path):
    """Damaged in place (same size, so its fingerprint still matches): the reader names it."""
    shard = captioned / "captions" / "00000.parquet"
    data = bytearray(shard.read_bytes())
    data[4:64] = b"\0" * 60  # the first column chunk
    shard.write_bytes(bytes(data))
    from capfilt.core.layout import Dataset
    from capfilt.core.parquet import UnreadableShard

    with pytest.raises(UnreadableShard, match="00000.parquet"):
        Dataset(str(captioned)).read_shard("captions", 0)


def test_a_dataset_in_a_foreign_schema_is_refused_before_the_model_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    pq.write_table(pa.table({"image": [b"x"], "text": ["a cat"]}), root / "images/00000.parquet")
    for command in (["caption"], ["filter", "--threshold", "0.5"]):
        error = one_line_error(
            invoke(command[0], str(root), "--model", str(tmp_path / "none"), *command[1:])
        )
        assert "has no column key, jpg (its columns: image, text)" in error


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, tiny_captioner, monkeypatch):
    from capfilt.core import parquet

    root = tmp_path / "ds"
    write_images_dataset(root, n_shards=2, per_shard=4)
    real = parquet.write_table_atomic
    calls = []

    def second_write_fails(fs, path, table, before_rename=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fs, path, table, before_rename)

    monkeypatch.setattr(parquet, "write_table_atomic", second_write_fails)
    error = one_line_error(invoke("caption", str(root), "--model", str(tiny_captioner)))
    assert "No space left on device" in error and "captions/00001.parquet" in error
    monkeypatch.setattr(parquet, "write_table_atomic", real)
    result = invoke("caption", str(root), "--model", str(tiny_captioner))
    assert result.exit_code == 0 and "1 " in result.output
    assert sorted(p.name for p in (root / "captions").glob("*.parquet")) == [
        "00000.parquet",
        "00001.parquet",
    ]


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only with a bind mount (root sees through chmod); skip where mounts
    are not allowed."""
    mounted = []

    def make(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if not (
            _mount("--bind", str(folder), str(folder))
            and _mount("-o", "remount,bind,ro", str(folder))
        ):
            pytest.skip("bind mounts are not allowed here")
        mounted.append(folder)

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_stage_folder_is_refused_before_the_model_loads(captioned, tmp_path, read_only):
    missing = str(tmp_path / "none")
    read_only(captioned / "captions")
    error = one_line_error(invoke("caption", str(captioned), "--model", missing, "--overwrite"))
    assert "captions" in error and "Read-only file system" in error
    read_only(captioned / "reports")
    assert "reports" in one_line_error(invoke("report", str(captioned)))


def test_a_full_disk_on_a_real_small_filesystem(tmp_path, tiny_captioner):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)):
        pytest.skip("tmpfs mounts are not allowed here")
    try:
        write_images_dataset(disk / "ds", n_shards=2, per_shard=4)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 6 * 1024))
        args = ("caption", str(disk / "ds"), "--model", str(tiny_captioner), "--num-captions", "5")
        error = one_line_error(invoke(*args))
        assert "No space left on device" in error
        (disk / "filler").unlink()
        assert invoke(*args).exit_code == 0
        assert len(list((disk / "ds" / "captions").glob("*.parquet"))) == 2
        assert not [p for p in (disk / "ds").rglob("*") if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_run_folder_given_as_a_model_names_capfilt_export(tmp_path, images_dataset):
    run = tmp_path / "run"
    (run / "step-10").mkdir(parents=True)
    (run / "step-10" / "metadata.json").write_text("{}")
    error = one_line_error(invoke("caption", str(images_dataset), "--model", str(run)))
    assert "capfilt export" in error and "captioner" in error


@pytest.mark.parametrize(
    "args",
    [
        ["finetune", "{ds}", "--init", "{ds}", "--batch-size", "0", "--out", "{out}"],
        ["pretrain", "{ds}", "--lr", "-1", "--out", "{out}"],
        ["pretrain", "{ds}", "--max-steps", "0", "--out", "{out}"],
        ["caption", "{ds}", "--top-p", "1.5"],
        ["filter", "{ds}", "--threshold", "2"],
    ],
)
def test_bad_option_values_fail_in_one_line_and_leave_nothing(images_dataset, tmp_path, args):
    out = tmp_path / "run"
    args = [a.format(ds=images_dataset, out=out) for a in args]
    before = sorted(p.name for p in images_dataset.iterdir())
    one_line_error(invoke(*args))
    assert not out.exists()
    assert sorted(p.name for p in images_dataset.iterdir()) == before


def test_a_refused_fetch_leaves_no_log_and_no_bar(tmp_path, monkeypatch):
    logs = tmp_path / "tmp"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    urls = tmp_path / "urls.csv"
    urls.write_text("link,caption\nhttp://example.com/a.jpg,a cat\n")
    result = invoke("fetch", str(urls), str(tmp_path / "ds"))
    error = one_line_error(result)
    assert "url" in error
    assert result.output.strip().splitlines() == [error]  # no "fetch 0/? rows" bar before it
    assert list(logs.iterdir()) == []


# --- the screen --------------------------------------------------------------------------------
def test_the_training_bar_keeps_its_step_count_at_80_columns():
    from rich.console import Console

    from capfilt.core.progress import step_progress

    for width in (60, 80):
        buffer = io.StringIO()
        progress = step_progress(Console(file=buffer, width=width))
        with progress:
            task = progress.add_task("pretrain", total=1200, stats="itc 1.234  " * 6)
            progress.update(task, completed=600)
        line = buffer.getvalue().splitlines()[-1]
        assert "600/1200" in line and "pretrain" in line and "-:--:--" in line, line


def test_caption_rate_leaves_out_loading_the_model(images_dataset, tiny_captioner):
    from capfilt.stages.caption import CaptionOptions, caption_dataset

    result = caption_dataset(str(images_dataset), CaptionOptions(model=str(tiny_captioner)))
    run = result.run
    assert 0 < run.work_seconds < run.seconds
    assert result.images_per_second == pytest.approx(result.images / run.work_seconds)


def _capfilt(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CAPFILT, *args], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


def test_piped_help_shows_every_option_whole():
    result = _capfilt("fetch", "--help")
    assert result.returncode == 0
    assert "--allow-private-addresses" in result.stdout and "…" not in result.stdout
    assert "--repetition-penalty" in _capfilt("caption", "--help").stdout


def test_a_closed_output_pipe_is_not_an_error(images_dataset):
    script = (
        f"{' '.join(CAPFILT)} query {images_dataset} 'select * from range(200000)' -f csv "
        f"| head -1; echo ${{PIPESTATUS[0]}}; {' '.join(CAPFILT)} fetch --help | grep -q Usage; "
        "echo ${PIPESTATUS[0]}"
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["range", "0", "0"], result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


AUDIT_HOOK = """
import os, sys
def _hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        address = args[1] if event == "socket.connect" else args
        with open(os.environ["CAPFILT_AUDIT_LOG"], "a") as f:
            f.write(f"{event} {address!r}\\n")
sys.addaudithook(_hook)
"""


def test_the_demo_makes_no_network_call_and_prints_no_third_party_output(tmp_path):
    """A small `capfilt demo` (every stage: fetch, ingest, pretrain, finetune, export, caption,
    filter, evaluate, report) from a plain environment (no NO_ALBUMENTATIONS_UPDATE, no
    HF_HUB_OFFLINE): it connects to 127.0.0.1 only, and prints neither warnings nor the
    loading bars of other libraries."""
    from test_demo import SMALL

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    audit = tmp_path / "audit.log"
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(PYTHONPATH=str(tmp_path / "hook"), CAPFILT_AUDIT_LOG=str(audit), COLUMNS="200")
    result = _capfilt("demo", str(tmp_path / "demo"), *SMALL, "--threads", "1", env=env)
    assert result.returncode == 0, result.stderr
    screen = result.stdout + result.stderr
    for noise in ("Warning", "warn", "Loading weights", "it/s]", "[transformers]", "Traceback"):
        assert noise not in screen, screen
    # A str address is a unix socket (multiprocessing's); an IP address comes as a tuple.
    calls = [c for c in audit.read_text().splitlines() if not c.split(" ", 1)[1].startswith("'")]
    outside = [c for c in calls if "127.0.0.1" not in c]
    assert calls and not outside, outside
