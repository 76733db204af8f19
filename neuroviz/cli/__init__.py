"""The command line: ``python -m neuroviz COMMAND ...``.

One module per command in this package, each with ``register(subparsers)``; a new command is
one module plus its name in COMMANDS. Command modules import the heavy library (torch, the
models) inside their command functions, so building the parser (``--help``) stays fast.

Errors: a :class:`~neuroviz.errors.NeurovizError`, a value the parser refuses, and a file
system that will not take a write (no permission, read-only, full, a file where a folder
should be) are the user's to fix and print one ``error: ...`` line (exit 2); anything else is
a bug and keeps its traceback (exit 1). Output cut short by a closed pipe (``... | head``)
ends quietly with 141, as a program killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback

from ..errors import NeurovizError
from ..threads import limit_compute_threads
from ._common import Parser, UsageError, store_from

# Failures of the machine's file system, not of the code: one line naming the file and the reason.
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                      errno.ENAMETOOLONG}
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE

# In the order --help lists them; module names are the commands with '_' for '-' ('import_': a keyword).
COMMANDS = ("models", "layers", "demo_set", "extract", "embed", "cache", "jobs", "demo", "label", "labels", "export", "import_",
            "evaluate", "synthesize", "analyze", "audit", "edit", "study", "sae", "units")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (imports each command module, none of the heavy library)."""
    parser = Parser(prog="python -m neuroviz", description="Explore and describe the neurons of vision networks.")
    parser.add_argument("--cache", help="cache folder (default: ./cache or $NEUROVIZ_CACHE)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 the user's error, 1 a bug, 130 interrupted).

    With ``--job ID`` (background jobs started by the pages) the job record follows the
    command: progress while it runs, then done, failed or cancelled with the message.
    """
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:  # the parser printed its one line
        _record_refused_job(argv, exc.message)
        return 2
    limit_compute_threads()  # before any command imports torch: see neuroviz/threads.py
    reporter = None
    try:
        if args.job:
            from ..jobs import JobReporter

            reporter = JobReporter(store_from(args), args.job)
            args._job_reporter = reporter
        code = args.func(args) or 0
    except BrokenPipeError:
        return _quiet_broken_pipe(reporter)
    except KeyboardInterrupt:
        if reporter:
            reporter.finish("cancelled", "interrupted by the user")
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except NeurovizError as exc:
        if reporter:
            reporter.finish("failed", str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            return _bug(exc, reporter)
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"cannot use {where}{exc.strerror or exc}"
        if reporter:
            reporter.finish("failed", message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _bug(exc, reporter)
    if reporter:
        reporter.finish("done" if code == 0 else "failed", result=getattr(args, "_result", None))
    return code


def _bug(exc: BaseException, reporter) -> int:
    """A bug: keep the traceback for the log, and a clear summary (exit 1)."""
    if reporter:
        reporter.finish("failed", f"{type(exc).__name__}: {exc}")
    traceback.print_exc()
    print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


def _quiet_broken_pipe(reporter) -> int:
    """The reader of stdout went away (``| head``): stop without a traceback, and point stdout at
    /dev/null so the interpreter's final flush does not raise again."""
    if reporter:
        reporter.finish("failed", "its output pipe was closed")
    silence_stdout()
    return BROKEN_PIPE_EXIT


def silence_stdout() -> None:
    """Send what is left of stdout to /dev/null (its reader is gone)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test's capture): nothing will be flushed to a pipe
        pass


def _record_refused_job(argv: list[str] | None, message: str) -> None:
    """A background job whose command line the parser refused still ends as failed, with the reason."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--cache")
    early.add_argument("--job")
    known, _ = early.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.job:
        from ..jobs import JobReporter

        try:
            JobReporter(store_from(known), known.job).finish("failed", message)
        except (NeurovizError, OSError):
            pass  # the cache itself is unusable: the printed line is all there is

