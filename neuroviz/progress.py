"""Progress callbacks ``(done, total, message)`` shared by the library, the CLI and jobs."""

from __future__ import annotations

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
