"""Who runs the shards of an extraction: this process, or the actors of a Ray cluster.

Both engines call the same :func:`neuroviz.shards.extract_shard` on the same shard
descriptors and write the same files under the cache; only the reduce, in the calling
process, turns them into a run. Ray Data (an optional extra, ``pip install -r
requirements-ray.txt``) runs a dataset of shard descriptors through ``map_batches`` with an
actor pool: each actor creates the model once (on a GPU when the cluster has them) and
extracts the shards it is given, so the cache must be storage that every node sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .errors import NeurovizError
from .progress import Progress
from .shards import Shard, ShardJob, extract_shard

ENGINES = ("inprocess", "ray")
RAY_INSTALL_HINT = "pip install -r requirements-ray.txt"


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


def _import_path() -> str:
    """PYTHONPATH for the actors: where this neuroviz (and the driver's own modules) are found."""
    import os
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent.parent)
    parts = [here, os.getcwd(), *[p for p in sys.path if p and Path(p).is_dir()]]
    return os.pathsep.join(dict.fromkeys(parts))


def _run_on_ray(model_factory: Callable[[], Any], job: ShardJob, shards: Sequence[Shard], n_images: int, done_images: int,
                progress: Progress | None, address: str | None) -> None:
    import ray

    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": _import_path(), "TOKENIZERS_PARALLELISM": "false"}})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(f"Cannot reach a Ray cluster at '{address or 'a new local one'}': {exc}") from None
        started_here = True
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        slots = gpus if gpus else max(1, int(resources.get("CPU", 1)))
        actors = max(1, min(len(shards), slots))
        ds = ray.data.from_items([asdict(s) for s in shards], override_num_blocks=len(shards))
        results = ds.map_batches(_ShardActor, fn_constructor_kwargs={"model_factory": model_factory, "job": job},
                                 batch_size=1, concurrency=actors, num_gpus=1 if gpus else 0, num_cpus=1)
        for finished, row in enumerate(results.iter_rows(), start=1):
            done_images += int(row["images"])
            if progress:
                progress(done_images, n_images, f"shard {int(row['index']) + 1}/{shards[0].count} done "
                                               f"({finished}/{len(shards)} on Ray, {actors} actors)")
    finally:
        if started_here:
            ray.shutdown()
