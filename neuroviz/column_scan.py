"""Reading a large (images x columns) array a row block at a time.

At paper scale a run's ``acts.npy`` (ImageNet train x ResNet-50's layer4: 1.28M x 2,048
float32, 10 GB) or a probe set's image embeddings must never be held whole. The functions
here read such an array in row blocks of bounded size and keep only what the caller needs:
each column's top-k rows and range (:func:`scan_columns`), a few columns over all images
(:func:`column_block`), or chosen rows (:func:`take_rows`).

A memory-mapped array (``np.load(..., mmap_mode="r")``) is read through a short-lived map per
block: pages read through the long-lived map would stay in the process's resident set until
the array object dies, so a "streamed" pass would still end holding the whole file.

NumPy and torch have top-k but no streaming top-k whose ties are resolved the same way
whatever the block size, hence :func:`scan_columns` (ties go to the lower row, as in
extraction's top-k table).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

ROW_BLOCK_BYTES = 16 * 2**20  # bytes of whole rows read at once (a pass holds a few times this)


@dataclass(frozen=True)
class ColumnScan:
    """Per column: the k largest values (descending, ties by lower row) with their rows, min and max."""

    values: np.ndarray  # (columns, k) float32
    indices: np.ndarray  # (columns, k) int64 row numbers
    minimum: np.ndarray  # (columns,)
    maximum: np.ndarray  # (columns,)

    @property
    def constant(self) -> np.ndarray:
        """(columns,) bool: the column never varies."""
        return self.maximum <= self.minimum


def _is_file_map(matrix: np.ndarray) -> bool:
    """True for the array np.load(mmap_mode=...) returns (not a view of it): its file layout is known."""
    return isinstance(matrix, np.memmap) and isinstance(matrix.base, mmap.mmap) and matrix.flags.c_contiguous \
        and matrix.ndim == 2 and bool(matrix.filename)


def _read_slice(matrix: np.ndarray, start: int, stop: int) -> np.ndarray:
    """matrix[start:stop] as an in-memory copy (through a map that is closed at once for a file map)."""
    if not _is_file_map(matrix):
        return np.array(matrix[start:stop])
    assert isinstance(matrix, np.memmap) and matrix.filename is not None
    row_bytes = matrix.shape[1] * matrix.dtype.itemsize
    piece = np.memmap(matrix.filename, dtype=matrix.dtype, mode="r", offset=matrix.offset + start * row_bytes,
                      shape=(stop - start, matrix.shape[1]))
    block = np.array(piece)
    del piece  # the last reference: the map is closed and its pages leave the process now
    return block


def take_rows(matrix: np.ndarray, index: np.ndarray | Sequence[int]) -> np.ndarray:
    """matrix[index] as float32, read so that no page outside the result stays resident."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
        return np.asarray(_read_slice(matrix, int(index[0]), int(index[-1]) + 1), dtype=np.float32)
    if not _is_file_map(matrix) or not len(index):
        return np.asarray(matrix[index], dtype=np.float32)
    lo, hi = int(index.min()), int(index.max()) + 1
    out = np.empty((len(index), matrix.shape[1]), dtype=np.float32)
    rows = max(1, ROW_BLOCK_BYTES // max(1, matrix.shape[1] * matrix.dtype.itemsize))
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    for start in range(lo, hi, rows):  # one short-lived map per span of rows that holds some wanted ones
        first, last = np.searchsorted(sorted_index, [start, start + rows])
        if first == last:
            continue
        span = _read_slice(matrix, start, min(hi, start + rows))
        out[order[first:last]] = span[sorted_index[first:last] - start]
    return out


BlockTransform = Callable[[int, int, np.ndarray], np.ndarray]


def row_blocks(matrix: np.ndarray, columns: np.ndarray | None = None, block_bytes: int | None = None,
               transform: BlockTransform | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, float32 rows start:stop, only ``columns`` if given), each block about
    ``block_bytes`` (default ROW_BLOCK_BYTES) of the stored rows.

    ``transform(start, stop, block)`` turns each block into the rows of a derived matrix
    (e.g. image embeddings into image-text similarities), so a matrix that is never stored
    (images x candidates) is read in the same bounded blocks.
    """
    n_rows, n_cols = matrix.shape
    rows = max(1, (block_bytes or ROW_BLOCK_BYTES) // max(1, n_cols * matrix.dtype.itemsize))
    for start in range(0, n_rows, rows):
        stop = min(n_rows, start + rows)
        block = _read_slice(matrix, start, stop)
        if transform is not None:
            block = transform(start, stop, np.asarray(block, dtype=np.float32))
        if columns is not None:
            block = block[:, columns]
        yield start, stop, np.asarray(block, dtype=np.float32)


def column_block(matrix: np.ndarray, columns: Sequence[int] | np.ndarray, block_bytes: int | None = None) -> np.ndarray:
    """matrix[:, columns] as float32 (images x len(columns)), read a row block at a time."""
    columns = np.asarray(columns, dtype=np.int64)
    out = np.empty((matrix.shape[0], len(columns)), dtype=np.float32)
    for start, stop, block in row_blocks(matrix, columns, block_bytes):
        out[start:stop] = block
    return out


def _keep_top(values: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each column of (candidates x columns), ties to the earlier candidate.

    Candidates are ordered by row number, so "earlier" is "lower row"; the result keeps that
    order. ``rows`` gives each candidate's row (default: its position), and only the k
    chosen per column are ever gathered, so a whole block costs no index matrix.
    """
    n, n_cols = values.shape
    threshold = np.partition(values, n - k, axis=0)[n - k]  # each column's k-th largest
    above = values > threshold
    tied = values == threshold
    take = above
    take |= tied & (np.cumsum(tied, axis=0, dtype=np.int32) <= k - above.sum(axis=0, dtype=np.int32))
    mask = take.T  # exactly k per column, in candidate order
    chosen = values.T[mask].reshape(n_cols, k).T
    position = np.nonzero(mask)[1].reshape(n_cols, k).T
    return chosen, position if rows is None else np.take_along_axis(rows, position, axis=0)


def scan_columns(matrix: np.ndarray, k: int, columns: Sequence[int] | np.ndarray | None = None,
                 block_bytes: int | None = None, transform: BlockTransform | None = None,
                 width: int | None = None) -> ColumnScan:
    """One pass over ``matrix`` in row blocks: each column's top-k rows, min and max.

    The result does not depend on the block size: ties go to the lower row. Each block is
    cut to its own top k before it meets the running top k, so a pass holds a few blocks.
    With ``transform`` (see :func:`row_blocks`) the columns are those of the derived
    matrix, ``width`` of them.
    """
    cols = None if columns is None else np.asarray(columns, dtype=np.int64)
    n_rows = matrix.shape[0]
    if transform is not None and width is None and cols is None:
        raise ValueError("scan_columns with a transform needs the derived matrix's width")
    n_cols = (matrix.shape[1] if width is None else width) if cols is None else len(cols)
    k = max(0, min(int(k), n_rows))
    top_v = np.empty((0, n_cols), dtype=np.float32)
    top_i = np.empty((0, n_cols), dtype=np.int64)
    lo = np.full(n_cols, np.inf, dtype=np.float32)
    hi = np.full(n_cols, -np.inf, dtype=np.float32)
    for start, _stop, block in row_blocks(matrix, cols, block_bytes, transform):
        np.minimum(lo, block.min(axis=0), out=lo)
        np.maximum(hi, block.max(axis=0), out=hi)
        if k == 0:
            continue
        if len(block) > k:
            block_v, block_i = _keep_top(block, k)
        else:
            block_v, block_i = block, np.broadcast_to(np.arange(len(block))[:, None], block.shape)
        del block
        cand_v = np.concatenate([top_v, block_v])
        cand_i = np.concatenate([top_i, block_i + start])
        top_v, top_i = _keep_top(cand_v, k, cand_i) if len(cand_v) > k else (cand_v, cand_i)
    order = np.argsort(-top_v, axis=0, kind="stable")  # candidates are in row order: ties stay lower-row first
    return ColumnScan(np.take_along_axis(top_v, order, 0).T.copy(), np.take_along_axis(top_i, order, 0).T.copy(), lo, hi)
