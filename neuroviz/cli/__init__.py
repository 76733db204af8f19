"""The command line: ``python -m neuroviz COMMAND ...``.

One module per command in this package, each with ``register(subparsers)``; a new command is
one module plus its name in COMMANDS. Command modules import the heavy library (torch, the
models) inside their command functions, so building the parser (``--help``) stays fast.

Errors: a :class:`~neuroviz.errors.NeurovizError` is the user's to fix and prints one
``error: ...`` line (exit 2); anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from ..errors import NeurovizError
from ._common import store_from

# In the order --help lists them; module names are the commands with '_' for '-' ('import_': a keyword).
COMMANDS = ("models", "layers", "demo_set", "extract", "cache", "jobs", "demo", "label", "labels", "export", "import_",
            "evaluate", "synthesize", "analyze", "audit", "edit", "study", "sae", "units")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (imports each command module, none of the heavy library)."""
    parser = argparse.ArgumentParser(prog="python -m neuroviz",
                                     description="Explore and describe the neurons of vision networks.")
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
    args = build_parser().parse_args(argv)
    reporter = None
    if args.job:
        from ..jobs import JobReporter

        reporter = JobReporter(store_from(args), args.job)
        args._job_reporter = reporter
    try:
        code = args.func(args) or 0
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
    except Exception as exc:  # a bug: keep the traceback for the log, and a clear summary
        if reporter:
            reporter.finish("failed", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if reporter:
        reporter.finish("done" if code == 0 else "failed", result=getattr(args, "_result", None))
    return code
