"""The command line as a whole: documented commands, fast start, one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from typer.main import get_command
from typer.testing import CliRunner

from capfilt.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
COMMANDS = get_command(app).commands


def test_every_command_has_an_example_and_documented_options():
    runner = CliRunner()
    for name, command in COMMANDS.items():
        assert command.help and "Example:" in command.help, f"{name} has no Example: in its help"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"capfilt {name} {param.opts[0]} has no help text"
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, result.output


def test_every_file_a_help_text_names_exists():
    """`capfilt run --help` once named pipelines/blip_base_cc3m.toml, which never existed."""
    import re

    root = Path(__file__).resolve().parent.parent
    runner = CliRunner()
    for name in COMMANDS:
        text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        for path in re.findall(r"(?:pipelines|data_manifests)/[\w.-]+\.toml", text):
            assert (root / path).is_file(), f"capfilt {name} --help names {path}"


def test_readme_documents_every_command():
    for name in COMMANDS:
        assert f"`capfilt {name}" in README, f"README does not document `capfilt {name}`"


def test_readme_command_reference_is_generated_from_help():
    """The README's reference is what `make docs` renders from the commands, word for word."""
    from capfilt.cli.reference import END, START, render, replace_block

    assert START in README and END in README
    assert replace_block(README, render()) == README, "README is stale: run `make docs`"
    for name, command in COMMANDS.items():
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert f"`{param.opts[0]}" in README, f"capfilt {name} {param.opts[0]}"


def test_options_are_declared_once_and_the_commands_derive_from_them():
    """caption/filter/fetch/...: each declared option is on its command with its default."""
    from capfilt.core.options import declared, default_of, flag_of
    from capfilt.stages.caption import CaptionOptions
    from capfilt.stages.filter import FilterOptions
    from capfilt.training.config import FINETUNE_DEFAULTS, TrainConfig

    for name, options, defaults in (
        ("caption", CaptionOptions, {}),
        ("filter", FilterOptions, {}),
        ("finetune", TrainConfig, FINETUNE_DEFAULTS),
    ):
        params = {p.opts[0]: p for p in COMMANDS[name].params if p.param_type_name == "option"}
        for field, spec, _ in declared(options):
            if spec.positional or flag_of(field) not in params:
                continue
            param = params[flag_of(field)]
            want = defaults.get(field.name, default_of(field))
            got = param.default
            got = getattr(got, "value", got)
            if isinstance(want, tuple) and spec.split:  # one string on the command line
                want = spec.split.join(map(str, want))
            elif isinstance(want, tuple):
                got = tuple(got or ())
            assert got == want or (want is dataclasses.MISSING and param.required), (
                name,
                field.name,
            )
    # finetune is pretrain with its own defaults, not a copy of it
    assert {p.name for p in COMMANDS["pretrain"].params} - {"preset", "tokenizer", "sharing"} == {
        p.name for p in COMMANDS["finetune"].params
    } - {"task", "prompt"}


def test_readme_starts_with_the_two_setup_commands():
    first_lines = README.splitlines()[:5]
    assert any(line.strip().startswith("make demo") for line in first_lines)
    assert any(line.strip().startswith("make test") for line in first_lines)


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from capfilt.cli import main; sys.argv = ['capfilt', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'img2dataset', 'pyarrow', 'duckdb', 'PIL')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout[-500:]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    result = CliRunner().invoke(app, ["query", str(tmp_path / "missing"), "select 1"])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert "Traceback" not in result.output


def test_python_dash_m_capfilt_works():
    out = subprocess.run(
        [sys.executable, "-m", "capfilt", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("capfilt ")
