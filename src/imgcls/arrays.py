""".npy files read and written by rows with positional I/O (``os.preadv``/``os.pwrite``), never mapped.

Why not ``np.load(mmap_mode="r")`` or ``open_memmap``: every page a mapping touches stays in the process's
resident set until the kernel needs the memory, so one pass over a 10 GB mapped array shows 10 GB resident.
Positional reads into a batch-sized buffer keep what a stage holds bounded by the batch, while the kernel's
page cache still serves repeated reads from memory when there is room. The files stay plain ``.npy``
(numpy, torch and DVC read them as before); a header that asks for pickled objects is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Parsing a header larger than this is refused (numpy's own limit for untrusted files is 10,000 bytes).
MAX_HEADER_BYTES = 10_000


class ArrayFileError(ValueError):
    """A file that is not a plain, complete .npy array."""


class NpyReader:
    """Rows of a C-ordered .npy array, read on demand. ``rows`` limits it to the first rows (a file written
    with spare capacity). Safe to share between threads: every read names its own offset."""

    def __init__(self, path: Path | str, rows: int | None = None):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_HEADER_BYTES)
                else:
                    raise ArrayFileError(f"unsupported .npy version {version}")
                self.offset = f.tell()
        except (OSError, ValueError, SyntaxError) as error:  # read_magic/header raise ValueError on junk
            raise ArrayFileError(f"not a readable .npy array ({type(error).__name__}: {str(error)[:200]})") from None
        if dtype.hasobject:
            raise ArrayFileError("holds Python objects (a pickle); refused")
        if fortran or len(shape) < 1:
            raise ArrayFileError(
                f"expected a C-ordered array with at least one axis, found shape {shape}, fortran_order {fortran}"
            )
        self.dtype = dtype
        self.row_shape = tuple(int(s) for s in shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        capacity = int(shape[0])
        size = self.path.stat().st_size
        if size < self.offset + capacity * self.row_bytes:
            raise ArrayFileError(
                f"truncated: the header says {capacity} rows of {self.row_bytes} bytes "
                f"({self.offset + capacity * self.row_bytes:,} bytes), the file has {size:,}"
            )
        self.rows = capacity if rows is None else min(rows, capacity)
        self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def __len__(self) -> int:
        return self.rows

    def _read_into(self, buffer: np.ndarray, first_row: int) -> None:
        view, position = memoryview(buffer).cast("B"), self.offset + first_row * self.row_bytes
        while len(view):
            n = os.preadv(self._fd, [view], position)
            if n <= 0:
                raise ArrayFileError(f"{self.path}: ended early (truncated while being read?)")
            view, position = view[n:], position + n

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new, writable array (one read)."""
        start, stop, _ = slice(start, stop).indices(self.rows)
        out = np.empty((max(stop - start, 0), *self.row_shape), dtype=self.dtype)
        if len(out):
            self._read_into(out, start)
        return out

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed), read in ascending order with consecutive rows
        coalesced into one read."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.rows):
            raise IndexError(f"row index out of range 0..{self.rows - 1}")
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        rows = np.empty((len(indices), *self.row_shape), dtype=self.dtype)
        if not len(indices):
            return rows
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)], strict=False):
            self._read_into(rows[lo:hi], int(ordered[lo]))
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            if key.step not in (None, 1):
                return self.take(np.arange(self.rows)[key])
            return self.read(key.start or 0, key.stop)
        if isinstance(key, (int, np.integer)):
            index = int(key) + (self.rows if key < 0 else 0)
            return self.read(index, index + 1)[0]
        return self.take(np.asarray(key))

    def load(self) -> np.ndarray:
        """The whole array in memory."""
        return self.read()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __repr__(self) -> str:
        return f"NpyReader({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


class NpyWriter:
    """A .npy file of a known shape, written by rows at any position. The file has its full size from the
    start (sparse until written); rows never written read as zeros."""

    def __init__(self, path: Path | str, shape: tuple[int, ...], dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self.offset = f.tell()
            f.truncate(self.offset + self.shape[0] * self.row_bytes)
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, first_row: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or first_row < 0 or first_row + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} at {first_row} do not fit {self.shape}")
        view, position = memoryview(rows).cast("B"), self.offset + first_row * self.row_bytes
        while len(view):
            n = os.pwrite(self._fd, view, position)
            view, position = view[n:], position + n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_array(path: Path | str, array: np.ndarray) -> None:
    """A whole in-memory array as .npy, through the same writer."""
    with NpyWriter(path, array.shape, array.dtype) as writer:
        if len(array):
            writer.write(0, array)
