"""`capfilt run`: pipeline files become the same command lines a user would type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.cli.pipeline import Stage, load_pipeline
from capfilt.core.errors import CapfiltError

ROOT = Path(__file__).resolve().parent.parent


def test_stage_argv_spells_options_like_the_cli():
    stage = Stage(
        "caption",
        ("ds",),
        {"num_captions": 3, "overwrite": True, "seed": 0, "fp16": False, "tag": ["a", "b"]},
    )
    assert stage.argv() == [
        "caption",
        "ds",
        "--num-captions",
        "3",
        "--overwrite",
        "--seed",
        "0",
        "--no-fp16",
        "--tag",
        "a",
        "--tag",
        "b",
    ]


def test_variables_expand_and_overrides_win(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        '[pipeline]\ndataset = "a"\n[[stage]]\ncommand = "report"\nout = "{dataset}/r"\n'
        'evaluation = ["x={dataset}/e.json", 3]\n'
    )
    pipeline = load_pipeline(path, {"dataset": "b"})
    assert pipeline.stages[0].args == ("b",)
    assert pipeline.stages[0].options == {"out": "b/r", "evaluation": ["x=b/e.json", 3]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("not toml [", "not valid TOML"),
        ("[pipeline]\n", "no [[stage]]"),
        ("[[stage]]\nargs = []\n", "no `command"),
        ("[[stage]]\ncommand = 'query'\n", "does not set"),
    ],
)
def test_bad_pipeline_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(CapfiltError, match=re.escape(message)):
        load_pipeline(path)


def test_run_executes_stages_in_order_and_stops_at_a_failure(tmp_path):
    (tmp_path / "ds").mkdir()
    path = tmp_path / "p.toml"
    path.write_text(f'''
[pipeline]
dataset = "{tmp_path / "ds"}"
[[stage]]
command = "query"
args = ["{{dataset}}", "select 41 + 1 as answer"]
format = "csv"
[[stage]]
command = "query"
args = ["{{dataset}}", "select * from scores"]
[[stage]]
command = "query"
args = ["{{dataset}}", "select 'never' as reached"]
''')
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "answer\n42" in result.output
    assert "never" not in result.output.split("3/3")[0] and "reached" not in result.output


def test_shipped_pipelines_parse_and_name_known_commands():
    from typer.main import get_command

    commands = set(get_command(app).commands)
    files = sorted((ROOT / "pipelines").glob("*.toml"))
    for path in files:
        tomllib.loads(path.read_text())
        for stage in load_pipeline(path).stages:
            assert stage.command in commands, f"{path.name}: unknown command {stage.command}"


def _flags(command) -> set[str]:
    """Every flag a click command accepts, `--no-x` forms included."""
    flags = set()
    for param in command.params:
        flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return flags


def test_shipped_pipelines_use_only_real_options_of_each_command():
    from typer.main import get_command

    commands = get_command(app).commands
    files = sorted((ROOT / "pipelines").glob("*.toml"))
    assert {"demo.toml", "blip_base_cc3m_coco.toml", "blip_large.toml"} <= {p.name for p in files}
    for path in files:
        for i, stage in enumerate(load_pipeline(path).stages, 1):
            command = commands[stage.command]
            flags = _flags(command)
            for option in stage.argv()[1 + len(stage.args) :]:
                if option.startswith("--"):
                    assert option in flags, f"{path.name} stage {i} ({stage.command}): {option}"
            # The whole line parses: types, choices and the number of arguments are right.
            command.make_context(stage.command, stage.argv()[1:])


def test_an_unknown_option_in_a_pipeline_is_caught(tmp_path):
    from typer.main import get_command

    path = tmp_path / "p.toml"
    path.write_text('[[stage]]\ncommand = "caption"\nnum_caption = 3\n')
    stage = load_pipeline(path, {"dataset": "ds"}).stages[0]
    assert "--num-caption" not in _flags(get_command(app).commands["caption"])
    result = CliRunner().invoke(app, ["run", str(path), "--set", "dataset=ds"])
    assert result.exit_code == 2 and "--num-caption" in result.output
    assert stage.argv() == ["caption", "ds", "--num-caption", "3"]
