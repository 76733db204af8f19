"""The command line as a package: every command's --help, a light parser, one error line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from neuroviz.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parent.parent
COMMAND_NAMES = [name.rstrip("_").replace("_", "-") for name in COMMANDS]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m neuroviz " + command in capsys.readouterr().out


def test_top_level_help_lists_every_command_and_loads_no_torch():
    """`python -m neuroviz --help` builds every command's parser without the heavy library."""
    proc = python("import runpy, sys\n"
                  "sys.argv = ['neuroviz', '--help']\n"
                  "try:\n"
                  "    runpy.run_module('neuroviz', run_name='__main__')\n"
                  "except SystemExit as exc:\n"
                  "    assert exc.code == 0, exc.code\n"
                  "heavy = ('torch', 'torchvision', 'timm', 'open_clip', 'transformers', 'streamlit')\n"
                  "print('heavy modules:', sorted(m for m in heavy if m in sys.modules))\n")
    assert proc.returncode == 0, proc.stderr
    assert "heavy modules: []" in proc.stdout
    for command in COMMAND_NAMES:
        assert f"    {command} " in proc.stdout


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["--cache", str(tmp_path), "labels", "torchvision:resnet18@random", "--probe", str(tmp_path / "missing"),
                 "--layer", "fc"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line] == [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(err.strip().splitlines()) == 1 and "Unknown probe set" in err


def test_a_user_error_in_a_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neuroviz", "--cache", str(tmp_path), "label", "torchvision:resnet18@random",
                           "--neurons", "a-b"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: 'a-b' is not a neuron number or range (write e.g. 0,1,5 or 0-15)."


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path, capsys, monkeypatch):
    from neuroviz.cli import cache

    def broken(args):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(cache, "cmd_cache", broken)  # register() binds the command when main builds the parser
    assert main(["--cache", str(tmp_path), "cache"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: unexpected ZeroDivisionError: planted"


def test_a_job_records_the_users_error_as_its_failure(tmp_path, capsys):
    from neuroviz import jobs
    from neuroviz.store import Store

    argv = ["--cache", str(tmp_path), "--job", "job-1", "label", "torchvision:resnet18@random", "--neurons", "x"]
    assert main(argv) == 2
    record = jobs.read_job(Store(tmp_path), "job-1")
    assert record.status == "failed" and record.error.startswith("'x' is not a neuron number")


def test_values_the_parser_writes_out_match_the_library():
    """Lists the parser cannot import (their modules load torch) stay equal to the library's."""
    from neuroviz.cli.extract import POOLING_CHOICES
    from neuroviz.cli.synthesize import CONFIG_FLAGS
    from neuroviz.hooks import POOLINGS
    from neuroviz.methods.clip_dissect import SIMILARITY_FUNCTIONS
    from neuroviz.synthesis import STARTS, SynthesisConfig

    assert POOLING_CHOICES == ["default", *POOLINGS]
    assert set(CONFIG_FLAGS) <= {f for f in SynthesisConfig.__dataclass_fields__}
    label_help = build_parser()._subparsers._group_actions[0].choices["label"].format_help()
    synth_help = build_parser()._subparsers._group_actions[0].choices["synthesize"].format_help()
    assert all(name in " ".join(label_help.split()) for name in SIMILARITY_FUNCTIONS)
    assert all(name in synth_help for name in STARTS)


def test_method_params_override_only_what_they_name():
    from neuroviz.methods.base import MethodError
    from neuroviz.methods.params import configs_for

    configs = configs_for(["clip_dissect"], ["similarity=cos", "top_k=3"])
    assert configs["clip_dissect"].similarity == "cos" and configs["clip_dissect"].top_k == 3
    with pytest.raises(MethodError, match="KEY=VALUE"):
        configs_for(["clip_dissect"], ["top_k"])
    with pytest.raises(MethodError, match="No chosen method has the parameter"):
        configs_for(["clip_dissect"], ["nonsense=1"])
    with pytest.raises(MethodError, match="Unknown similarity"):
        configs_for(["clip_dissect"], ["similarity=bogus"])
