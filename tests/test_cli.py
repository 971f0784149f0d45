"""The command line: help texts, one-line errors, exit codes."""
import subprocess
import sys
from pathlib import Path

import click

import pytest
from click.testing import CliRunner

from neurosem.cli import cli, main

COMMANDS = sorted(cli.commands)


def test_every_command_is_listed():
    assert COMMANDS == ["concepts", "dissect", "distill", "distill-table", "doctor", "embed", "explain", "figures",
                        "kl", "layers", "query", "quickstart", "record", "synth"]


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


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_text(name):
    command = cli.commands[name]
    bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert bare == [], f"neurosem {name}: options without help text: {bare}"
    assert all((p.help or "").strip() for p in cli.params if isinstance(p, click.Option))


def test_distill_protocol_help_gives_both_schedules():
    text = CliRunner().invoke(cli, ["distill", "--help"]).output
    flat = " ".join(text.split())
    assert "paper = 100 epochs, lr 0.1, milestones 50/75/90" in flat
    assert "crd = the CRD/RepDistiller benchmark's 240 epochs, lr 0.05, milestones 150/180/210" in flat


def _one_error_line(capsys, argv, code=2):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["record", "m", "--data", "d", "--workers", "-1"], "Invalid value for '--workers': -1 is not in the range x>=0."),
    (["record", "m", "--data", "d", "-b", "99999999999999999999"],
     "Invalid value for '--batch-size' / '-b': 99999999999999999999 is not in the range 1<=x<=65536."),
    (["embed", "m", "-b", "0"], "Invalid value for '--batch-size' / '-b': 0 is not in the range 1<=x<=65536."),
    (["distill", "--student", "s", "--data", "d", "--workers", "-1"], "'--workers': -1 is not in the range x>=0."),
    (["record", "m", "--data", "d", "--limit", "0"], "'--limit': 0 is not in the range x>=1."),
    (["record", "--bogus"], "No such option '--bogus'."),
    (["record"], "Missing argument 'MODEL'."),
])
def test_bad_options_are_one_line_with_exit_2(capsys, argv, says):
    line = _one_error_line(capsys, argv)
    assert says in line and f"(see `neurosem {argv[0]} --help`)" in line


def test_run_json_holding_a_list_is_one_line(capsys, tmp_path, tiny_broden):
    (tmp_path / "run.json").write_text("[1, 2]")
    planted = Path(__file__).parent / "_planted.py"
    line = _one_error_line(capsys, ["record", f"{planted}:tiny_cnn", "--data", str(tiny_broden), "--run",
                                    str(tmp_path), "--workers", "0", "-q"])
    assert line == f"error: {tmp_path / 'run.json'} holds a JSON list, not an object ({{\"record\": ...}}); fix or delete it"


def test_unwritable_path_is_one_line_with_exit_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _one_error_line(capsys, ["synth", str(blocker / "sub"), "--images", "1"])
    assert line == f"error: Not a directory: {blocker / 'sub' / 'images' / 'synthetic'}; check the path and its permissions"


def test_internal_error_is_one_line_with_exit_1(capsys, monkeypatch):
    import neurosem.data.synthetic as synthetic

    def broken(*args, **kwargs):
        raise ValueError("bad\nthing")

    monkeypatch.setattr(synthetic, "synth", broken)
    line = _one_error_line(capsys, ["synth", "x"], code=1)
    assert line == ("error: internal error, please report it: ValueError: bad thing "
                    "(set NEUROSEM_DEBUG=1 for the traceback)")


@pytest.mark.parametrize("command, target, says", [
    (["record", "m", "--data", "d"], "neurosem.record.record",
     "interrupted: the images recorded so far are saved; run the same command again to resume"),
    (["embed", "m"], "neurosem.embed.embed",
     "interrupted: the embedding is not saved: its training starts over when you run the same command again "
     "(the run's activations are kept, and an unfinished recording resumes)"),
    (["dissect", "--broden", "b"], "neurosem.dissect.dissect",
     "interrupted: the dissection is not saved: it starts over when you run the same command again (the "
     "run's activations are kept, and an unfinished recording resumes)"),
    (["kl"], "neurosem.analysis.commands.kl_report", "interrupted: nothing to resume; run the command again"),
])
def test_interrupt_says_what_really_is_kept(capsys, monkeypatch, command, target, says):
    module, _, name = target.rpartition(".")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == says


def test_synth_writes_a_broden_set(tmp_path):
    from neurosem.data.broden import BrodenDataset

    out = tmp_path / "synthetic"
    result = CliRunner().invoke(cli, ["synth", str(out), "--images", "8", "--image-size", "32",
                                      "--seg-size", "16", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.output == (f"synthetic Broden set: {out} (8 images of 32x32, label maps 16x16, 34 labels in "
                             f"6 categories, seed 3)\nnext: neurosem dissect MODEL --broden {out}\n")
    ds = BrodenDataset(out, with_labels=True)
    assert len(ds) == 8 and tuple(ds[0]["image"].shape) == (3, 32, 32)
    # the same bytes as the library's writer with the same arguments
    from neurosem.data.synthetic import write_synthetic_broden

    write_synthetic_broden(tmp_path / "lib", n_images=8, image_size=32, seg_size=16, seed=3)
    assert (out / "index.csv").read_bytes() == (tmp_path / "lib" / "index.csv").read_bytes()


def test_synth_refuses_a_folder_that_is_not_empty(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    line = _one_error_line(capsys, ["synth", str(tmp_path), "--images", "2"])
    assert line == (f"error: {tmp_path} is not empty: choose a new folder, or pass --force to overwrite the "
                    "synthetic set's files in it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    main(["synth", str(tmp_path), "--images", "2", "--force"])
    assert (tmp_path / "index.csv").exists() and (tmp_path / "keep.txt").read_text() == "mine"


def test_no_command_prints_the_help(capsys):
    with pytest.raises(SystemExit):
        main([])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Usage: neurosem" in text and "neurosem synth OUT" in text and "error:" not in text
