"""Who runs the shards of an extraction: this process, or the actors of a Ray cluster.

Both engines call the same :func:`neuroviz.shards.extract_shard` on the same shard
descriptors and write the same files under the cache; only the reduce, in the calling
process, turns them into a run. Ray Data (an optional extra, ``pip install -r
requirements-ray.txt``) runs a dataset of shard descriptors through ``map_batches`` with an
actor pool: each actor creates the model once (on a GPU when the cluster has them) and
extracts the shards it is given, so the cache must be storage that every node sees.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from .errors import NeurovizError
from .progress import Progress
from .shards import Shard, ShardJob, extract_shard, shard_done, work_dir

ENGINES = ("inprocess", "ray")
RAY_INSTALL_HINT = "pip install -r requirements-ray.txt"
PROGRESS_POLL_S = 1.0  # how often the Ray driver reports the images its workers have written


class EngineError(NeurovizError, RuntimeError):
    """An engine that cannot run here (unknown, not installed, cluster unreachable); says what to do."""


def check_engine(engine: str) -> None:
    """Fail early, with what to do, for an unknown engine or a missing Ray."""
    if engine not in ENGINES:
        raise EngineError(f"Unknown engine '{engine}'; choose one of {', '.join(ENGINES)}.")
    if engine == "ray":
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise EngineError(f"The Ray engine needs Ray Data, which is not installed: {RAY_INSTALL_HINT}") from None


def run_shards(engine: str, model, model_factory: Callable[[], Any], job: ShardJob, shards: Sequence[Shard],
               n_images: int, done_images: int, progress: Progress | None = None, address: str | None = None,
               chunk_budget: int | None = None) -> None:
    """Extract ``shards`` (those not finished yet) with ``engine``.

    ``model`` is used by the in-process engine; Ray actors call ``model_factory()`` instead.
    ``done_images`` counts the images of shards already finished, for progress.
    ``chunk_budget`` (in-process only) stops after that many chunks: tests of resumption.
    """
    check_engine(engine)
    if engine == "ray":
        _run_on_ray(model_factory, job, shards, n_images, done_images, progress, address)
        return
    budget = chunk_budget
    for shard in shards:
        base = done_images

        def shard_progress(pos: int, _total: int, message: str, base: int = base, shard: Shard = shard) -> None:
            if progress:
                progress(base + pos - shard.start, n_images, message)

        written = extract_shard(model, job, shard, shard_progress, budget)
        done_images += len(shard)
        if budget is not None:
            budget -= written
            if budget <= 0:
                return


class _ShardActor:
    """A Ray Data actor: one model, any number of shards (one per call)."""

    def __init__(self, model_factory: Callable[[], Any], job: ShardJob):
        import torch

        torch.set_num_threads(1)  # each actor has one CPU (num_cpus=1): more threads fight the other actors for it
        self.model, self.job = model_factory(), job

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        done = []
        for i in range(len(batch["index"])):
            shard = Shard(*(int(batch[f][i]) for f in ("index", "count", "start", "stop")))
            extract_shard(self.model, self.job, shard)
            done.append(shard.index)
        return {"index": np.asarray(done, dtype=np.int64), "images": np.asarray([int(batch["stop"][i]) - int(batch["start"][i])
                                                                                 for i in range(len(done))], dtype=np.int64)}


def images_written(job: ShardJob, shards: Sequence[Shard]) -> int:
    """Images of ``shards`` extracted so far, read from the files the workers write (finished
    shards, and the chunk files of unfinished ones, of the job's first layer): progress finer
    than a shard, whichever machine runs it, as long as it writes to this cache."""
    plan = job.plans[0]
    done = 0
    for shard in shards:
        if shard_done(plan, shard.index):
            done += len(shard)
        else:
            done += min(len(shard), job.chunk_size * sum(1 for _ in work_dir(plan, shard.index).glob("chunk-*.npy")))
    return done


def _import_path() -> str:
    """PYTHONPATH for the actors: where this neuroviz (and the driver's own modules) are found."""
    import os
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent.parent)
    parts = [here, os.getcwd(), *[p for p in sys.path if p and Path(p).is_dir()]]
    return os.pathsep.join(dict.fromkeys(parts))


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[Any]:
    """The ``ray`` module connected to ``address`` ("auto", "HOST:PORT", or None for a new local
    cluster, shut down after the block); a connection made before is used as it is."""
    check_engine("ray")
    import ray

    started_here = False
    if not ray.is_initialized():
        try:
            # "local", not None: Ray's None would join a cluster that `ray start` left on this machine. A
            # cluster started for one extraction skips the dashboard (seconds of start-up on a small machine)
            runtime_env = {"env_vars": {"PYTHONPATH": _import_path(), "TOKENIZERS_PARALLELISM": "false"}}
            if address:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(address="local", include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                         runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(f"Cannot reach a Ray cluster at '{address or 'a new local one'}': {exc}") from None
        started_here = True
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def actor_slots(ray: Any, tasks: int, use_gpus: bool = True) -> tuple[int, int]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has them (and ``use_gpus``),
    else one per CPU; no more actors than ``tasks``."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if use_gpus else 0
    slots = gpus if gpus else max(1, int(resources.get("CPU", 1)))
    return max(1, min(tasks, slots)), 1 if gpus else 0


def _run_on_ray(model_factory: Callable[[], Any], job: ShardJob, shards: Sequence[Shard], n_images: int, done_images: int,
                progress: Progress | None, address: str | None) -> None:
    with ray_connection(address) as ray:
        actors, gpus = actor_slots(ray, len(shards))
        ds = ray.data.from_items([asdict(s) for s in shards], override_num_blocks=len(shards))
        results = ds.map_batches(_ShardActor, fn_constructor_kwargs={"model_factory": model_factory, "job": job},
                                 batch_size=1, concurrency=actors, num_gpus=gpus, num_cpus=1)
        rows: queue.Queue = queue.Queue()

        def drain() -> None:  # Ray hands back a row per finished shard; the driver polls the files in between
            try:
                for row in results.iter_rows():
                    rows.put(row)
                rows.put(None)
            except BaseException as exc:  # raised again in the driver's thread
                rows.put(exc)

        threading.Thread(target=drain, name="ray-shards", daemon=True).start()
        finished = 0
        while True:
            try:
                row = rows.get(timeout=PROGRESS_POLL_S)
            except queue.Empty:
                if progress:
                    progress(done_images + images_written(job, shards), n_images,
                             f"{finished}/{len(shards)} shards done on Ray ({actors} actors)")
                continue
            if row is None:
                break
            if isinstance(row, BaseException):
                raise row
            finished += 1
            if progress:
                progress(done_images + images_written(job, shards), n_images, f"shard {int(row['index']) + 1}/{shards[0].count} done "
                                                                     f"({finished}/{len(shards)} on Ray, {actors} actors)")
