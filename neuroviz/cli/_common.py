"""What every command module shares: the store named by ``--cache``, progress bars that
also feed the job record when the command runs as a background job, the parsing of list
arguments, and the one error for command lines that ask for something impossible."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import NeurovizError
from ..progress import Progress, TqdmProgress, chain
from ..store import DEFAULT_CACHE, Store

if TYPE_CHECKING:
    from ..datasets import ProbeSet
    from ..models import ProbedModel


class CommandLineError(NeurovizError, ValueError):
    """Flags that are missing, malformed or contradict each other; the message says what to give."""


def store_from(args: argparse.Namespace) -> Store:
    """The workspace store the command works on (``--cache``, else $NEUROVIZ_CACHE, else ./cache)."""
    return Store(Path(args.cache) if getattr(args, "cache", None) else DEFAULT_CACHE)


def progress_for(args: argparse.Namespace, desc: str, unit: str = "img") -> Progress:
    """A tqdm bar, plus the job record when running as a background job."""
    return chain(TqdmProgress(desc, unit), getattr(args, "_job_reporter", None))


def comma_list(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None (the flag's "all"/"default") when nothing is given."""
    items = [part.strip() for part in (text or "").split(",") if part.strip()]
    return items or None


def parse_neurons(text: str | None) -> list[int] | None:
    """'0,1,5' or '0-15,40' -> a sorted list; None means all neurons."""
    if not text:
        return None
    out: set[int] = set()
    for part in comma_list(text) or []:
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise CommandLineError(f"'{part}' is not a neuron number or range (write e.g. 0,1,5 or 0-15).") from None
    return sorted(out)


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
