"""Every `python -m neuroviz ...` command the README shows must run as written.

The commands are read from README.md itself: every line of a fenced code block that starts
with ``python -m neuroviz``, and every complete inline code span of one (templates with
``...``, ``[optional]`` parts or UPPER-CASE placeholders are left out). Each must be accepted
by the command line's parser (a dry parse: no model is loaded, nothing is run), and the
commands that need no model run for real against an empty workspace.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PREFIX = "python -m neuroviz"
RUN_FOR_REAL = ("models", "cache", "jobs")  # no model, no download: cheap on an empty workspace


def readme_commands(text: str) -> list[str]:
    """The README's neuroviz commands, in order, without shell comments, each once."""
    found: list[str] = []
    in_block = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block and line.strip().startswith(PREFIX):
            found.append(line.strip())
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", outside):
        span = " ".join(span.split())
        if span.startswith(PREFIX + " ") and not re.search(r"\.\.\.|\[|\b[A-Z]{3,}\b", span):
            found.append(span)
    commands = []
    for command in found:
        argv = shlex.split(command, comments=True)
        commands.append(shlex.join(argv))
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def argv_of(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:3] == PREFIX.split(), command
    return argv[3:]


def test_the_readme_shows_commands():
    names = {argv_of(c)[0] for c in COMMANDS}
    assert len(COMMANDS) >= 10 and {"extract", "label", "export", "study"} <= names, COMMANDS


def test_extraction_of_commands_strips_comments_and_skips_templates():
    text = ("```bash\npython -m neuroviz cache        # what the cache holds\n```\n"
            "Run `python -m neuroviz evaluate m --layer LAYER [--common]` or "
            "`python -m neuroviz audit m\n--probe demo \"text\"`.")
    assert readme_commands(text) == ["python -m neuroviz cache", "python -m neuroviz audit m --probe demo text"]


def _ids(commands: list[str]) -> list[str]:
    return [" ".join(argv_of(c)[:3]) for c in commands]


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_readme_command_parses(command, capsys):
    """The parser accepts the command exactly as the README prints it (exit 2 = it does not)."""
    from neuroviz.cli import build_parser

    try:
        args = build_parser().parse_args(argv_of(command))
    except SystemExit as exc:
        message = capsys.readouterr().err.strip().splitlines()[-1:]
        pytest.fail(f"README command does not parse (exit {exc.code}): {command}\n{message}")
    assert callable(args.func)


@pytest.mark.parametrize("command", [c for c in COMMANDS if argv_of(c)[0] in RUN_FOR_REAL],
                         ids=_ids([c for c in COMMANDS if argv_of(c)[0] in RUN_FOR_REAL]))
def test_readme_command_runs(command, tmp_path):
    env = dict(os.environ, NEUROVIZ_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "neuroviz", *argv_of(command)], capture_output=True, text=True,
                          env=env, cwd=README.parent, timeout=300)
    assert done.returncode == 0, (command, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
