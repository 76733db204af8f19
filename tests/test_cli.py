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

    assert ["default", *POOLINGS] == POOLING_CHOICES
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


def test_probe_arguments_name_stored_sets_by_id_or_name_and_register_new_ones(tiny_workspace, image_folder, tmp_path):
    """--probe of analyze, audit, edit and synthesize: the catalogue's probe_set_for."""
    from neuroviz.catalog import probe_set_for, probe_set_from_store
    from neuroviz.datasets import ProbeSetError
    from neuroviz.store import Store

    store, probe_set = tiny_workspace["store"], tiny_workspace["probe_set"]
    ids = [im.image_id for im in probe_set.images]
    assert [im.image_id for im in probe_set_for(store, probe_set.id).images] == ids  # read back, not rescanned
    assert probe_set_for(store, probe_set.name).id == probe_set.id
    fresh = Store(tmp_path / "cache")
    opened = probe_set_for(fresh, str(image_folder))
    assert opened.id == probe_set.id and [p["probe_set_id"] for p in fresh.probe_sets()] == [probe_set.id]
    assert [im.path for im in probe_set_from_store(fresh, opened.id).images] == [im.path for im in opened.images]
    with pytest.raises(ProbeSetError, match="Unknown probe set 'nope'"):
        probe_set_for(fresh, "nope")
    with pytest.raises(ProbeSetError, match="not in the store"):
        probe_set_from_store(fresh, "0123456789")


def test_edit_and_audit_commands_run_on_a_stored_probe_set(tiny_workspace, tmp_path, capsys):
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(tiny_workspace["store"].root, root)
    model, probe_set_id = tiny_workspace["model"].spec, tiny_workspace["probe_set"].id
    edit = ["--cache", str(root), "edit", model, "--image-size", "64", "--probe", probe_set_id, "--max-images", "4"]
    assert main(edit + ["--neurons", "layer4:1,2", "--name", "two", "--save"]) == 0
    assert "n_images                 4" in capsys.readouterr().out
    assert main(edit + ["--name", "two"]) == 0  # the saved edit, evaluated again
    assert main(["--cache", str(root), "audit", "--list"]) == 0
    assert main(["--cache", str(root), "audit", model]) == 2
    assert "Give a model and a query" in capsys.readouterr().err
