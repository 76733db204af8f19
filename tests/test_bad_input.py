"""Bad input never ends in a traceback, a silent success or a lost run (issue 15, items 4-8, 10,
11 and the closed pipe of 13).

The table-driven tests walk the real parser, so a numeric option added later without a
validating type, or a subcommand missing from the table, fails here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuroviz import datasets, jobs
from neuroviz.cli import BROKEN_PIPE_EXIT, COMMANDS, build_parser, main
from neuroviz.cli._common import (
    non_negative_float,
    non_negative_int,
    output_dir,
    output_path,
    parse_neurons,
    positive_float,
    positive_int,
    unit_float,
)
from neuroviz.store import CacheUnusableError, Store

REPO = Path(__file__).resolve().parent.parent
MODEL = "torchvision:resnet18@random"

# Values each validating type must refuse, and one it accepts (to fill required options).
BAD_VALUES = {
    positive_int: ["0", "-5", "1.5", "x"],
    non_negative_int: ["-1", "2.5", "x"],
    positive_float: ["0", "-0.5", "nan", "x"],
    non_negative_float: ["-0.1", "inf"],
    unit_float: ["1.5", "-0.1", "nan"],
    output_path: [],  # path rows are in PATH_CASES
    output_dir: [],
}
GOOD_VALUE = {positive_int: "1", non_negative_int: "0", positive_float: "0.5", non_negative_float: "0", unit_float: "0.5"}


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand ('study export', 'extract', ...) and its parser."""
    out = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[prefix.strip()] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk(f"{prefix} {name}", sub)

    walk("", build_parser())
    return out


def base_argv(command: str, parser: argparse.ArgumentParser, skip: argparse.Action | None = None) -> list[str]:
    """The command with every positional and required option filled with an acceptable value."""
    argv = command.split()
    for action in parser._actions:
        if action is skip or isinstance(action, argparse._HelpAction):
            continue
        value = GOOD_VALUE.get(action.type, "x")
        if not action.option_strings:
            argv.append(value)
        elif action.required:
            argv += [action.option_strings[0], value]
    return argv


def numeric_cases() -> list[tuple[str, str, str]]:
    cases = []
    for command, parser in leaf_parsers().items():
        for action in parser._actions:
            for bad in BAD_VALUES.get(action.type, []):
                cases.append((command, action.option_strings[0] if action.option_strings else action.dest, bad))
    return cases


def assert_one_error_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_numeric_option_of_every_command_has_a_validating_type():
    """No int/float reaches a command unchecked; every command is in the table below."""
    unchecked = [(command, action.dest) for command, parser in leaf_parsers().items() for action in parser._actions
                 if action.type in (int, float)]
    assert unchecked == []
    commands = {command.split()[0] for command in leaf_parsers()}
    assert commands == {name.rstrip("_").replace("_", "-") for name in COMMANDS}
    assert len(numeric_cases()) > 80  # the walk found the options (48 numeric options x 2-4 values at the time of writing)


@pytest.mark.parametrize(("command", "option", "bad"), numeric_cases())
def test_a_bad_number_is_one_line_and_exit_2(command, option, bad, tmp_path, capsys):
    parser = leaf_parsers()[command]
    action = next(a for a in parser._actions if option in a.option_strings or a.dest == option)
    argv = ["--cache", str(tmp_path)] + base_argv(command, parser, skip=action)
    argv += [option, bad] if action.option_strings else [bad]
    assert main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, option, bad)


@pytest.mark.parametrize("argv", [
    ["extract", MODEL, "--chunk-size", "0"], ["extract", MODEL, "--batch-size", "0"], ["extract", MODEL, "--k", "-5"],
    ["extract", MODEL, "--k", "0"], ["extract", MODEL, "--image-size", "0"],
])
def test_the_numbers_of_the_issue_are_refused_before_any_work(argv, tmp_path, capsys):
    assert main(["--cache", str(tmp_path), *argv]) == 2
    assert_one_error_line(capsys.readouterr().err, argv[-2])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("text", "message"), [("5-2", "empty range"), ("-3", "not a neuron"), ("a-b", "not a neuron"),
                                                (",", "names no neuron")])
def test_neuron_lists_that_select_nothing_are_errors(text, message, tmp_path, capsys):
    with pytest.raises(Exception, match=message):
        parse_neurons(text)
    assert main(["--cache", str(tmp_path), "label", MODEL, "--neurons", text]) == 2
    assert_one_error_line(capsys.readouterr().err, message)


@pytest.mark.parametrize("command", sorted(leaf_parsers()))
def test_a_cache_under_a_file_is_one_line_for_every_command(command, tmp_path, capsys):
    """Every command that opens the cache says which path cannot be used and why."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    code = main(["--cache", str(a_file / "cache"), *base_argv(command, leaf_parsers()[command])])
    err = capsys.readouterr().err
    if command in ("models", "layers"):  # they never open the cache
        assert code != 2 or "Cannot use the cache" not in err
        return
    assert code == 2
    assert_one_error_line(err, str(a_file / "cache"), "Not a directory")


def test_an_unusable_cache_in_the_environment_and_read_only(tmp_path):
    env = dict(os.environ, NEUROVIZ_CACHE="/proc/neuroviz-cache")
    proc = subprocess.run([sys.executable, "-m", "neuroviz", "cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "/proc/neuroviz-cache")
    with pytest.raises(CacheUnusableError, match="/proc/neuroviz-cache"):
        Store("/proc/neuroviz-cache")  # the dashboard's get_store raises the same, which its guard shows


def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in a forked child running as the unprivileged user 'nobody': (exit code, stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report, exit without pytest's clean-up
        code = 99
        try:
            import io

            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = io.StringIO()
            code = main(argv)
            os.write(write, f"{code}\n{sys.stderr.getvalue()}".encode())
        finally:
            os._exit(0 if code != 99 else 1)
    os.close(write)
    with os.fdopen(read) as fh:
        out = fh.read()
    os.waitpid(pid, 0)
    code, _, err = out.partition("\n")
    return int(code), err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the unprivileged user 'nobody'")
def test_a_cache_without_write_permission_as_a_plain_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(tmp_path, 0o755)
    for target in (locked / "new-cache", locked):  # cannot be created; exists but is not writable
        code, err = _as_nobody(["--cache", str(target), "cache"])
        assert code == 2, err
        assert_one_error_line(err, str(target))


# -- paths given to commands ---------------------------------------------------------------------

@pytest.fixture()
def blocked(tmp_path) -> Path:
    """A path whose parent is a file: nothing can be written there."""
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "out"


PATH_CASES = [
    (["export", MODEL, "--out", "{blocked}.csv"], "is a file, not a folder"),
    (["export", MODEL, "--out", "{tmp}"], "it is a folder"),
    (["synthesize", MODEL, "--neuron", "0", "--out", "{blocked}.png"], "is a file, not a folder"),
    (["study", "export", "s1", "--votes", "{blocked}.csv"], "is a file, not a folder"),
    (["study", "export", "s1", "--results", "{blocked}.csv"], "is a file, not a folder"),
    (["audit", MODEL, "face", "--export", "{blocked}"], "is a file, not a folder"),
    (["extract", MODEL, "--probe", "{tmp}/missing-folder"], "missing-folder"),
    (["extract", MODEL, "--probe", "{image}"], "is an image, not a probe set"),
    (["import", "{tmp}/missing.csv", MODEL, "--layer", "fc"], ""),
    (["labels", MODEL, "--layer", "fc", "--probe", "{tmp}/missing"], "Unknown probe set"),
]


@pytest.mark.parametrize(("argv", "needle"), PATH_CASES, ids=[" ".join(c[0][:1] + c[0][-2:-1]) for c in PATH_CASES])
def test_a_bad_path_is_one_line_and_exit_2(argv, needle, tmp_path, blocked, capsys):
    image = tmp_path / "one.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = [a.format(blocked=blocked, tmp=tmp_path, image=image) for a in argv]
    assert main(["--cache", str(tmp_path / "cache"), *argv]) == 2
    assert_one_error_line(capsys.readouterr().err, needle)


@pytest.fixture(scope="module")
def labelled_workspace(tiny_workspace, tmp_path_factory) -> tuple[list[str], list[str]]:
    """``--cache COPY --probe ID`` of a copy of the tiny workspace with imported labels on fc
    (the shared workspace stays untouched)."""
    root = tmp_path_factory.mktemp("labelled") / "cache"
    shutil.copytree(tiny_workspace["store"].root, root)
    csv = root.parent / "labels.csv"
    csv.write_text("layer,unit,description,similarity\n" + "".join(f"fc,{n},thing {n},0.5\n" for n in range(4)))
    probe = tiny_workspace["probe_set"].id
    assert main(["--cache", str(root), "import", str(csv), MODEL, "--probe", probe, "--layer", "fc",
                 "--method", "clip_dissect"]) == 0
    return ["--cache", str(root)], ["--probe", probe]


def test_export_to_a_missing_folder_creates_it_and_the_file_is_there(labelled_workspace, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "x.csv"
    assert main([*labelled_workspace[0], "export", MODEL, *labelled_workspace[1], "--layers", "fc", "--out", str(out)]) == 0
    assert f"wrote {out} " in capsys.readouterr().out
    assert out.read_text().startswith("layer,unit,description")


def test_export_never_says_wrote_for_a_file_that_is_not_there(labelled_workspace, tmp_path, capsys, monkeypatch):
    from neuroviz import labels_io

    monkeypatch.setattr(labels_io, "export_labels", lambda store, runs, method, path, *a: Path(path))  # writes nothing
    out = tmp_path / "x.csv"
    assert main([*labelled_workspace[0], "export", MODEL, *labelled_workspace[1], "--layers", "fc", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert_one_error_line(captured.err, str(out), "did not leave a file")


def test_a_file_system_refusal_mid_command_is_one_line(labelled_workspace, tmp_path, capsys, monkeypatch):
    from neuroviz import labels_io

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.csv"))

    monkeypatch.setattr(labels_io, "export_labels", refuse)
    assert main([*labelled_workspace[0], "export", MODEL, *labelled_workspace[1], "--layers", "fc", "--out", str(tmp_path / "x.csv")]) == 2
    assert_one_error_line(capsys.readouterr().err, "x.csv", "Permission denied")


# -- probe folders -------------------------------------------------------------------------------

def _png(path: Path, value: int = 0, size: int = 24) -> Path:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def test_non_utf8_file_names_are_extracted_and_stored_losslessly(tmp_path, capsys):
    folder = tmp_path / "probe"
    (folder / os.fsdecode(b"sub-\xff")).mkdir(parents=True)
    odd = folder / os.fsdecode(b"caf\xe9.png")
    _png(odd, 1)
    _png(folder / os.fsdecode(b"sub-\xff") / "b.png", 2)
    _png(folder / "plain.png", 3)
    cache = tmp_path / "cache"
    code = main(["--cache", str(cache), "extract", MODEL, "--image-size", "32", "--probe", str(folder), "--layers", "fc",
                 "--k", "2", "--no-thumbnails"])
    assert code == 0, capsys.readouterr().err
    store = Store(cache)
    (probe_set,) = store.probe_sets()
    stored = store.probe_images(probe_set["probe_set_id"])
    assert len(stored) == 3 and os.fsencode(str(odd)) in {os.fsencode(r["path"]) for r in stored}
    assert all(Path(r["path"]).is_file() for r in stored)  # each stored path opens the file
    assert "sub-\\xff" in {r["label"] for r in stored}  # labels are text, shown readably
    assert datasets.display_path(str(odd)).endswith("caf\\xe9.png")
    assert main(["--cache", str(cache), "cache"]) == 0 and "3 images" in capsys.readouterr().out


def test_the_bad_input_report_counts_links_fifos_text_and_bombs(tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    for i in range(2):
        _png(folder / f"ok{i}.png", i)
    (folder / "broken.png").symlink_to(folder / "nowhere.png")
    (folder / "loop-a").symlink_to(folder / "loop-b")
    (folder / "loop-b").symlink_to(folder / "loop-a")
    (folder / "up").symlink_to(folder)  # a folder link: not followed, reported
    os.mkfifo(folder / "pipe.png")
    (folder / "notes.jpg").write_text("a text file with an image's name\n" * 4)
    (folder / "page.png").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 M pixels in a few kB
    (folder / "cut.png").write_bytes((folder / "ok0.png").read_bytes()[:200])
    ps = datasets.from_folder(folder)
    assert len(ps) == 2
    counts = {reason: len(paths) for reason, paths in ps.skipped.items()}
    assert counts == {"broken link": 1, "looping link": 2, "link to a folder (not followed)": 1,
                      "not a regular file (FIFO, socket or device)": 1, "not an image": 2, "huge image": 1,
                      "corrupt or truncated image": 1}


def test_an_image_given_as_probe_set_is_refused_clearly(tmp_path):
    image = _png(tmp_path / "file.png")
    with pytest.raises(datasets.ProbeSetError, match="is an image, not a probe set"):
        datasets.open_probe_set(str(image), tmp_path)
    binary = tmp_path / "list.txt"
    binary.write_bytes(b"a\0b")
    with pytest.raises(datasets.ProbeSetError, match="not a text list"):
        datasets.open_probe_set(str(binary), tmp_path)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray(np.linspace(-3, 7, 64 * 64).reshape(64, 64).astype(np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(tmp_path / "nan.tif")
    for name in ("g16.png", "f.tif", "unit.tif"):
        assert datasets.check_image(tmp_path / name)[1] is None
        rgb = np.asarray(datasets.load_rgb(tmp_path / name))
        assert rgb.min() == 0 and rgb.max() == 255  # the whole range, not clipped
        assert (rgb == 255).mean() < 0.01 and 100 < rgb.mean() < 155  # a ramp stays a ramp
        assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0)  # order kept
    assert datasets.check_image(tmp_path / "nan.tif") == (None, "unusable image (no finite pixel values)")
    eight = np.arange(256, dtype=np.int32).reshape(16, 16)
    assert np.array_equal(np.asarray(datasets.to_rgb(Image.fromarray(eight)))[..., 0], eight)  # 0..255 in 32 bits: kept


def test_thumbnails_of_a_sixteen_bit_image_are_scaled_too(tmp_path):
    from neuroviz import images

    ramp = np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(images.thumbnail(tmp_path / "cache", tmp_path / "g16.png", 32, geometry=None)) as thumb:
        assert (np.asarray(thumb.convert("L")) >= 250).mean() < 0.1


# -- jobs ----------------------------------------------------------------------------------------

def test_cancelling_an_unknown_job_exits_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neuroviz", "--cache", str(tmp_path), "jobs", "--cancel", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "No job 'nope'")


def _state(pid: int) -> str | None:
    """The process state letter (Z: defunct), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _gone(pid: int, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _state(pid) is None:
            return True
        time.sleep(0.1)
    return False


def test_finished_and_cancelled_jobs_leave_no_defunct_process(tmp_path, image_folder):
    store = Store(tmp_path / "cache")
    quick = jobs.start_job(store, "cache", ["cache"])
    assert _gone(quick.pid), f"job process {quick.pid} state {_state(quick.pid)}"  # Z here: nobody waited for it
    slow = jobs.start_job(store, "extract", ["extract", "custom:tests.slow_model:build", "--image-size", "32", "--probe",
                                            str(image_folder), "--layers", "conv2", "--batch-size", "1", "--no-thumbnails"])
    deadline = time.monotonic() + 60
    while jobs.read_job(store, slow.job_id).done == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs.read_job(store, slow.job_id).status == "running", jobs.job_log(store, slow.job_id)
    cancelled = jobs.cancel_job(store, slow.job_id)
    assert cancelled.status == "cancelled"
    assert _gone(slow.pid), f"job process {slow.pid} state {_state(slow.pid)}"
    assert jobs.read_job(store, slow.job_id).status == "cancelled"


def test_a_job_refused_by_the_parser_is_recorded_as_failed(tmp_path, capsys):
    store = Store(tmp_path)
    jobs.write_job(store, jobs.JobRecord("job-9", "extract", ["extract", MODEL, "--k", "0"], status="running"))
    assert main(["--cache", str(tmp_path), "--job", "job-9", "extract", MODEL, "--k", "0"]) == 2
    record = jobs.read_job(store, "job-9")
    assert record.status == "failed" and "--k" in record.error
    capsys.readouterr()


# -- closed pipes --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--all"]])
def test_layers_into_a_closed_pipe_ends_quietly(extra):
    """`python -m neuroviz layers ... | head`: the reader is gone before the first write."""
    proc = subprocess.Popen([sys.executable, "-m", "neuroviz", "layers", MODEL, *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == BROKEN_PIPE_EXIT
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert BROKEN_PIPE_EXIT == 128 + signal.SIGPIPE


def test_layers_lists_the_suggested_ones_and_all_with_all(capsys):
    assert main(["layers", MODEL]) == 0
    short = capsys.readouterr().out.splitlines()
    assert main(["layers", MODEL, "--all"]) == 0
    full = capsys.readouterr().out.splitlines()
    rows = [line for line in short if line[:1] in "* " and "neurons=" in line]
    assert [line.split()[1] for line in rows if line.startswith("*")] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert [line.split()[0] for line in rows if not line.startswith("*")] == ["fc"]  # the output layer
    assert len(full) > 50 and "more with --all" in short[-1] and "layer1.0.conv1" in "\n".join(full)


def test_the_dashboard_names_the_cache_it_cannot_use(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import APP_PATH, dashboard_env

    (tmp_path / "a-file").write_text("x")
    dashboard_env(monkeypatch, tmp_path / "a-file" / "cache")
    at = AppTest.from_file(str(APP_PATH), default_timeout=120)
    at.run()
    assert not at.exception
    assert any(f"Cannot use the cache folder {tmp_path / 'a-file' / 'cache'}: Not a directory" in e.value for e in at.error)


def test_an_image_list_with_non_utf8_names_finds_its_files(tmp_path):
    odd = _png(tmp_path / os.fsdecode(b"na\xefve.png"), 4)
    _png(tmp_path / "plain.png", 5)
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"na\xefve.png\nplain.png\nmissing.png\n")
    ps = datasets.open_probe_set(str(listing), tmp_path / "cache")
    assert len(ps) == 2 and os.fsencode(str(odd)) in {os.fsencode(im.path) for im in ps.images}
    assert ps.skipped == {"missing file": [str(tmp_path / "missing.png")]}


def test_a_file_system_refusal_anywhere_is_one_line_but_other_os_errors_stay_bugs(tmp_path, capsys, monkeypatch):
    from neuroviz.cli import cache

    def refuse(args):
        raise OSError(30, "Read-only file system", str(tmp_path / "runs" / "x.npy"))

    monkeypatch.setattr(cache, "cmd_cache", refuse)
    assert main(["--cache", str(tmp_path), "cache"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(tmp_path / "runs" / "x.npy"), "Read-only file system")

    def bug(args):
        raise FileNotFoundError(2, "No such file or directory", "internal.json")

    monkeypatch.setattr(cache, "cmd_cache", bug)
    assert main(["--cache", str(tmp_path), "cache"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_embed_says_which_files_of_its_probe_folder_it_skipped(tmp_path, monkeypatch, capsys):
    """`embed` on a folder with a corrupt file embeds the rest and names what it left out, as `extract` does."""
    from types import SimpleNamespace

    from neuroviz import embeddings
    from neuroviz.backends import multimodal

    folder = tmp_path / "probe"
    folder.mkdir()
    for i in range(2):
        _png(folder / f"ok{i}.png", i)
    (folder / "broken.png").write_text("not an image")
    monkeypatch.setattr(multimodal, "create_multimodal", lambda spec: SimpleNamespace(id="stub"))
    seen = {}

    def fake_embeddings(backend, store, probe_set_id, **kwargs):
        seen["images"] = len(store.probe_files(probe_set_id).image_ids)
        return np.zeros((seen["images"], 4), np.float32)

    monkeypatch.setattr(embeddings, "image_embeddings", fake_embeddings)
    assert main(["--cache", str(tmp_path / "cache"), "embed", "--probe", str(folder), "--backend", "stub"]) == 0
    assert seen["images"] == 2
    assert "skipped 1 files: 1 not an image" in capsys.readouterr().err
