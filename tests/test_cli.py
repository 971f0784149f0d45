"""The command line: help texts, one-line errors, exit codes."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from neurosem.cli import cli, main

COMMANDS = sorted(cli.commands)


def test_every_command_is_listed():
    assert COMMANDS == ["dissect", "distill", "distill-table", "doctor", "embed", "figures", "kl", "layers", "query",
                        "quickstart", "record"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_has_an_example(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"neurosem {name}" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from neurosem.cli import main\n" \
           "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported by --help'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_user_errors_are_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["query", "--neuron", "layer4", "--run", "nowhere"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_unknown_model_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["layers", "no_such_model_xyz"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no_such_model_xyz'") and "\n" not in err
