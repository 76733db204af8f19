"""Progress callbacks ``(done, total, message)`` shared by the library, the CLI and jobs."""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[int, int, str], None]


class TqdmProgress:
    """A progress callback drawn as a tqdm bar on stderr, from its first report on (so a
    command that fails before any progress prints its error line alone, not after a bar)."""

    def __init__(self, desc: str, unit: str = "it"):
        self.desc, self.unit = desc, unit
        self._bar = None

    @property
    def bar(self):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.desc, unit=self.unit, dynamic_ncols=True)
        return self._bar

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(message[:40], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def chain(*callbacks: Progress | None) -> Progress:
    """One callback that forwards to several (e.g. a tqdm bar and a job record)."""
    live = [c for c in callbacks if c is not None]

    def call(done: int, total: int, message: str = "") -> None:
        for c in live:
            c(done, total, message)

    return call


class RemainingTime:
    """Seconds left in the current stage, from the rate measured so far in it.

    A stage is a run of calls with one ``total``; a new total (the next layer, method or
    pass) or a count going back starts a new measurement, because stages of one job move at
    different rates. No estimate until the stage has advanced and ``min_elapsed`` seconds
    have passed: a guess from the first step alone (model loads) would not be honest.
    """

    def __init__(self, min_elapsed: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.min_elapsed, self.clock = min_elapsed, clock
        self._total: int | None = None
        self._start = (0.0, 0)  # (time, done) when the stage began
        self._last_done = 0

    def __call__(self, done: int, total: int) -> float | None:
        now = self.clock()
        went_back, self._last_done = done < self._last_done, done
        if total != self._total or went_back:
            self._total, self._start = total, (now, done)
            return None
        t0, done0 = self._start
        if not total or done <= done0 or now - t0 < self.min_elapsed:
            return None
        return max(0.0, (total - done) * (now - t0) / (done - done0))


def remaining_text(seconds: float) -> str:
    """'about 40 s left', 'about 3 min left', 'about 1.5 h left'."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s left"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"
