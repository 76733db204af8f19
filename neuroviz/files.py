"""Atomic file writes: readers see the old file or the new one, never half of either.

Files and folders get the modes a plain ``open``/``mkdir`` would give them (0666/0777 less
the umask): ``mkstemp``/``mkdtemp`` create them private (0600/0700), which would leave
arrays and thumbnails unreadable to the other users of a shared cache.

Every artefact under the cache is written through these helpers (temporary name in the same
folder, flush, ``os.replace``), which is what lets a job be killed at any point and lets
DuckDB and the pages read results in place without a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

TMP_MARK = ".tmp"  # every temporary name below contains it: what crash clean-up looks for


def _umask() -> int:
    """The process umask (read by setting and restoring it: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", suffix: str = TMP_MARK) -> Iterator[IO[Any]]:
    """A file handle whose content appears at ``path`` only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: Path | str, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, default=str))


def atomic_save_npy(path: Path | str, array: np.ndarray) -> None:
    """Write an .npy through a temporary name and rename."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, array)


def atomic_save_npy_blocks(path: Path | str, shape: tuple[int, ...], blocks: Iterable[np.ndarray], dtype: str = "<f4") -> None:
    """Write an .npy of ``shape`` from its row blocks, in a stream (the array is never whole in memory)."""
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with atomic_open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
        written = 0
        for block in blocks:
            data = np.ascontiguousarray(block, dtype=dtype)
            fh.write(data.data)
            written += data.nbytes
        if written != expected:
            raise ValueError(f"{path}: the blocks hold {written} bytes, the shape {shape} needs {expected}")


def atomic_link(source: Path | str, path: Path | str) -> None:
    """Make ``path`` the same file as ``source`` (a hard link, through a temporary name and
    rename); a copy where the file system cannot link. ``source`` stays as it was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}{TMP_MARK}"
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not supported: copy
        with atomic_open(path, "wb") as fh, open(source, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- row blocks: reading an activation matrix in a stream ----------------------------------
# Streams read .npy files with plain reads, not memory maps: the pages of a mapped file count in
# the process's RSS for as long as the map lives, so streaming a 100,000-image layer through maps
# held ~200 MB of file pages at the reduce's peak (BENCHMARKS.md, issue 11). Read pages go to the
# kernel's page cache instead, which the process does not own.
ROW_BLOCK_ROWS = 4096


def npy_header(path: Path | str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-ordered .npy file, from its header alone."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"{path}: .npy format {version} is not read in row blocks")
        shape, fortran, dtype = read(fh)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays cannot be read in row blocks")
        return tuple(shape), dtype, fh.tell()


def npy_row_blocks(paths: Iterable[Path | str], rows: int = ROW_BLOCK_ROWS) -> Iterator[np.ndarray]:
    """The rows of 2-D .npy files, one after the other, in fresh blocks of at most ``rows`` rows."""
    for path in paths:
        shape, dtype, offset = npy_header(path)
        n_rows, width = shape[0], int(np.prod(shape[1:]))
        with open(path, "rb") as fh:
            fh.seek(offset)
            for start in range(0, n_rows, rows):
                count = min(rows, n_rows - start)
                block = np.empty((count, width), dtype=dtype)
                if fh.readinto(block.data.cast("B")) != block.nbytes:
                    raise ValueError(f"{path}: shorter than its header says ({n_rows} rows)")
                yield block


def array_row_blocks(arrays: Iterable[np.ndarray], rows: int = ROW_BLOCK_ROWS) -> Iterator[np.ndarray]:
    """The rows of in-memory arrays, one after the other, in views of at most ``rows`` rows."""
    for array in arrays:
        for start in range(0, len(array), rows):
            yield array[start:start + rows]


def atomic_savez(path: Path | str, **arrays: np.ndarray) -> None:
    """Write an .npz (uncompressed) through a temporary name and rename."""
    with atomic_open(path, "wb", suffix=".tmp.npz") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # mypy matches **arrays against savez's allow_pickle: bool


@contextlib.contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """A private folder that becomes ``path`` when the block ends (kept if ``path`` appeared meanwhile)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_MARK))
    try:
        os.chmod(tmp, DIR_MODE)
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: Path | str, recursive: bool = False) -> int:
    """Delete what a killed writer left in ``folder``: hidden files and folders whose name
    carries TMP_MARK (only call it while no other process writes there). Returns how many."""
    import shutil

    folder = Path(folder)
    try:
        entries = list(folder.rglob(f".*{TMP_MARK}*") if recursive else folder.glob(f".*{TMP_MARK}*"))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        if not entry.exists():
            continue  # inside a folder removed just before
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
