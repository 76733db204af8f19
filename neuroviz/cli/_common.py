"""What every command module shares: the store named by ``--cache``, progress bars that
also feed the job record when the command runs as a background job, the parsing of list
arguments, the parser's value types (every number is checked where it is parsed, so a bad
one is one ``error:`` line and exit 2, never a traceback deep in the library), the checked
writing of output files, and the one error for command lines that ask for something impossible."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from ..errors import NeurovizError
from ..progress import Progress, TqdmProgress, chain
from ..store import DEFAULT_CACHE, Store

if TYPE_CHECKING:
    from ..datasets import ProbeSet
    from ..models import ProbedModel


class CommandLineError(NeurovizError, ValueError):
    """Flags that are missing, malformed or contradict each other; the message says what to give."""


class OutputFileError(NeurovizError, OSError):
    """An output file the command was asked to write could not be written (or is not there after)."""


class UsageError(SystemExit):
    """The parser refused the command line (exit 2); ``message`` is the one line it printed."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: <what>; see `<prog> --help```, exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        line = f"{message}; see `{self.prog} --help`"
        print(f"error: {line}", file=sys.stderr)
        raise UsageError(line)


Number = TypeVar("Number", int, float)


def _number(parse: Callable[[str], Number], kind: str, ok: Callable[[Number], bool], rule: str) -> Callable[[str], Number]:
    """An argparse type: ``parse`` the text, then refuse non-finite values and those ``ok`` rejects."""

    def convert(text: str) -> Number:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {kind}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule} (got {text})")
        return value

    convert.__name__ = rule
    return convert


positive_int = _number(int, "a whole number", lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _number(int, "a whole number", lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, "a number", lambda v: v > 0, "a number > 0")
non_negative_float = _number(float, "a number", lambda v: v >= 0, "a number >= 0")
unit_float = _number(float, "a number", lambda v: 0 <= v <= 1, "a number from 0 to 1")


def store_from(args: argparse.Namespace) -> Store:
    """The workspace store the command works on (``--cache``, else $NEUROVIZ_CACHE, else ./cache)."""
    return Store(Path(args.cache) if getattr(args, "cache", None) else DEFAULT_CACHE)


def report_skipped(probe_set: ProbeSet) -> None:
    """Say on stderr which files of a scanned probe folder were left out, and why (corrupt, not an image ...)."""
    if probe_set.skipped:
        print(f"skipped {probe_set.n_skipped} files: {probe_set.skipped_summary()}", file=sys.stderr)


def progress_for(args: argparse.Namespace, desc: str, unit: str = "img") -> Progress:
    """A tqdm bar, plus the job record when running as a background job."""
    return chain(TqdmProgress(desc, unit), getattr(args, "_job_reporter", None))


def comma_list(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None (the flag's "all"/"default") when nothing is given."""
    items = [part.strip() for part in (text or "").split(",") if part.strip()]
    return items or None


def parse_neurons(text: str | None) -> list[int] | None:
    """'0,1,5' or '0-15,40' -> a sorted list; None means all neurons. A reversed range ('5-2')
    or a negative number is refused: it would select nothing and report success."""
    if not text:
        return None
    out: set[int] = set()
    for part in comma_list(text) or []:
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise CommandLineError(f"'{part}' is not a neuron number or range (write e.g. 0,1,5 or 0-15).") from None
        if lo > hi:
            raise CommandLineError(f"'{part}' is an empty range: write the smaller neuron first (e.g. {hi}-{lo}).")
        out.update(range(lo, hi + 1))
    if not out:
        raise CommandLineError(f"'{text}' names no neuron (write e.g. 0,1,5 or 0-15).")
    return sorted(out)


def _output_problem(target: Path, folder: bool) -> str | None:
    """Why ``target`` cannot be written as a file (or created as a folder), seen before any work."""
    if not folder and target.is_dir():
        return "it is a folder; give a file name"
    blocking = next((f for f in ((target,) if folder else ()) + tuple(target.parents) if f.exists() and not f.is_dir()), None)
    return f"{blocking} is a file, not a folder" if blocking is not None else None


def _checked(folder: bool) -> Callable[[str], Path]:
    def convert(text: str) -> Path:
        target = Path(text).expanduser().absolute()
        problem = _output_problem(target, folder)
        if problem:
            raise argparse.ArgumentTypeError(f"cannot write {target}: {problem}")
        return target

    convert.__name__ = "output folder" if folder else "output file"
    return convert


output_path = _checked(folder=False)  # parser types of output options: refused before any work is done
output_dir = _checked(folder=True)


@contextlib.contextmanager
def output_file(path: str | Path) -> Iterator[Path]:
    """The absolute path to write an output file to, checked after the block: its folder is
    created, a failure is one clear line (naming the path and the reason), and a file that is
    not there afterwards is an error, so no command says "wrote" for a write that did not happen."""
    target = Path(path).expanduser().absolute()
    problem = _output_problem(target, folder=False)
    if problem:
        raise OutputFileError(f"Cannot write {target}: {problem}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield target
    except OSError as exc:
        if isinstance(exc, NeurovizError):
            raise
        raise OutputFileError(f"Cannot write {target}: {exc.strerror or exc}.") from None
    if not target.is_file():
        raise OutputFileError(f"Writing {target} did not leave a file there.")


def output_folder(path: str | Path) -> Path:
    """The absolute path of an output folder, created now; one clear line when it cannot be."""
    target = Path(path).expanduser().absolute()
    problem = _output_problem(target, folder=True)
    if problem:
        raise OutputFileError(f"Cannot create the folder {target}: {problem}.")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFileError(f"Cannot create the folder {target}: {exc.strerror or exc}.") from None
    return target


def open_model_and_probe_set(args: argparse.Namespace) -> tuple[Store, ProbedModel, ProbeSet]:
    """The store, the probed model (``args.model`` at ``--image-size``) and the probe set of ``--probe``."""
    from ..catalog import probe_set_for
    from ..models import create

    store = store_from(args)
    model = create(args.model, image_size=args.image_size)
    return store, model, probe_set_for(store, args.probe)


def add_run_arguments(parser: argparse.ArgumentParser, one_layer: bool = False) -> None:
    """The arguments that name runs in the catalogue: MODEL, --probe, --layers (or --layer), --pooling."""
    parser.add_argument("model", help="model spec, e.g. offline:mobilenet_v2")
    parser.add_argument("--probe", default="demo", help="'demo', an image folder, an image list or a probe-set id")
    if one_layer:
        parser.add_argument("--layer", required=True, help="layer name")
    else:
        parser.add_argument("--layers", help="comma-separated layer names (default: every extracted layer)")
    parser.add_argument("--pooling", help="only runs with this pooling (mean, max, cls, ...)")
    parser.add_argument("--units", help="the layer's units: neurons (default), or a dictionary such as sae:<key> "
                                        "(python -m neuroviz units list)")
