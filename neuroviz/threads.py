"""How many CPU threads torch's operators use in a command: fewer than the cores, on purpose.

torch runs each operator on as many OpenMP threads as there are cores, and every operator
ends at a barrier that waits for its slowest thread. On a shared machine (the dashboard's
server, a second job, other users) one of those threads is often descheduled, and the rest
spin while they wait. Measured on the shared 2-core machine (benchmarks/bench_neuron_work.py):
at load ~3.5, DnD on 2 neurons took 101 s and 92 CPU-s with 2 threads, 28 s and 22 CPU-s
with 1; at load ~11, 16 synthesis steps took 139-214 s with 2 threads and 17-23 s with 1.
numpy's BLAS (OpenBLAS) has the same barrier: evaluate_layer at 50k images took 12.8 s with
its default threads and 7.9 s with one, at load ~9 (benchmarks/bench_downstream.py). numpy is
loaded before a command starts, so its pool is set through threadpoolctl, not the environment.
So a command leaves a core for the rest
of the machine, and one more for each unit of load already on it; ``NEUROVIZ_THREADS`` (or
an ``OMP_NUM_THREADS`` set by the user) overrides the choice.
"""

from __future__ import annotations

import math
import os
import sys

THREADS_ENV = "NEUROVIZ_THREADS"


def compute_threads(cpu_count: int | None = None, load: float | None = None) -> int:
    """Threads for torch: the cores minus one, minus the load already on the machine; at least 1."""
    cpus = cpu_count or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform
            load = 0.0
    return max(1, cpus - max(1, math.ceil(load)))


def limit_compute_threads() -> int:
    """Apply :func:`compute_threads` (or the override) to this process; returns the count.

    Before torch is imported the environment decides its thread pool; after, torch is told.
    """
    chosen = os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS")
    threads = int(chosen) if chosen and chosen.isdigit() and int(chosen) > 0 else compute_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")  # numpy's pool is already started: tell it
    return threads
