"""Exact and near-duplicate images within and across the prepared splits (a test image that is a copy of a
training image measures memory, not generalisation).

Method. ``exact``: a BLAKE2b digest of each image's pixels. ``near``: a 63-bit DCT pHash (grayscale, PIL's
antialiased bilinear resize to 32 x 32, 2-D DCT, the top-left 8 x 8 coefficients without DC, each bit "above
their median"; every hash has 31 bits set, so distances are even) within ``max_distance`` bits, *confirmed* by
the correlation of the two 16 x 16 grayscale thumbnails (zero mean, so brightness drops out) reaching
``min_correlation``. Near-constant ("flat") images are never near pairs: their pHash is rounding noise.
Search: XOR + popcount of every pair, a bounded block of rows at a time on every core.

Which pairs are reported (so k copies give O(k) pairs, not k(k-1)/2): every image is linked, for each *other*
split that holds a duplicate of it, to one image there (the first identical copy, else the nearest near copy,
ties to the lowest index), and within its own split to one *earlier* duplicate (the first copy, else the
nearest). An exact link to a split replaces any near link to it. Every image with a duplicate in another split
therefore appears in at least one cross-split pair (``cross_split_test_rows`` relies on it); a count of pairs
within a split is the number of images that repeat an earlier one.

Calibration (500 test images per data set, each edited 12 ways and decoded back to the prepared size with
``prepare_image``; crops remove pixels at the 32/28-pixel size, then resize back; "pairs" are raw train x test
pairs that pass, counted before the linking above):

==============================  ======================  ======================
setting                         CIFAR-10 (JPEG copy)    Fashion-MNIST
==============================  ======================  ======================
recall, JPEG q60/75/90          1.00                    1.00
recall, resize 0.9x / 1.1x      1.00                    1.00
recall, brightness 0.9 / 1.1    1.00                    1.00
recall, Gaussian blur r 0.5, 1  1.00                    1.00
recall, crop 1 px one side      0.99                    0.71
recall, crop 1 px every side    0.94                    0.59
recall, crop 2 px top and left  0.96                    0.50
recall, crop + JPEG + 8% bright 0.94                    0.58
pHash <= 10 alone: pairs        1,548 (938 test imgs)   1.8 M (8,882 test imgs)
pHash <= 10, corr >= 0.9        430 (259 test imgs)     1.15 M (7,653 test imgs)
pHash <= 4, corr >= 0.99        19                      486
==============================  ======================  ======================

Default: ``max_distance`` 10, ``min_correlation`` 0.9 (the setting of the recall rows above). On natural
photos (CIFAR-10) it catches every photometric edit and >= 94% of 1-pixel crops, and the pairs it adds are
mostly *real* near duplicates: 12 of 12 inspected above correlation 0.99 and about 10 of 12 in the 0.90-0.95
band are the same photograph re-processed or re-cropped, in line with the ~3% of CIFAR-10 test images with a
training near-duplicate that Barz & Denzler (2020, "Do we train on test data?") report. The thumbnail check
removes ~70% of the pHash-only matches there for ~1 point of crop recall; 8 bits finds only 84% of the
crops, 12 bits adds 120 pairs for 4 more points. On Fashion-MNIST no setting of these two numbers works: its
items are centred silhouettes on black, so distinct plain shirts or trousers match as closely (pHash 0-4
bits, full-resolution correlation >= 0.99) as a JPEG copy, and a 1-pixel crop of an item moves it further
than a different item is (12 of 12 inspected pairs at pHash <= 4, correlation >= 0.99 were different
articles). There, use the exact pairs only (``max_distance=None``) or read near pairs as "looks alike", not
as leaks.

Timing (2-core Intel Xeon, Sapphire Rapids under KVM, shared): hashing 70,000 Fashion-MNIST images ~1 s; the
search over 70,000 hashes 10-13 s (random hashes) and ~29 s on Fashion-MNIST at the default, where millions of
pHash matches need the thumbnail check; exact pairs only: 0.1 s.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..fileio import atomic_path

HASH_SIZE = 32  # pHash resamples the grayscale picture to 32 x 32 ...
LOW_FREQUENCIES = 8  # ... and keeps the top-left 8 x 8 DCT coefficients; without DC: 63 bits
HASH_BITS = LOW_FREQUENCIES * LOW_FREQUENCIES - 1
# An image whose low-frequency content has a standard deviation under this many gray levels is "flat":
# its hash bits are signs of rounding noise, so it is never paired as a near duplicate (an exact copy still is).
FLAT_CONTRAST = 2.0
THUMBNAIL_SIZE = 16  # the confirming check compares 16 x 16 grayscale thumbnails
# A pHash match is kept as a near pair only when the thumbnails' correlation reaches this (calibration above).
MIN_CORRELATION = 0.9
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's convert("L")
# Pairwise search: at most this many Hamming distances in one block (uint64 XOR + uint8 count: ~150 MB).
SEARCH_BLOCK = 1 << 24
KINDS = ("exact", "near")


@dataclass(frozen=True)
class ImageHashes:
    """Per image of one split: ``exact`` a 16-byte BLAKE2b digest of its shape and pixels (dtype V16; equal
    <=> identical pixels), ``perceptual`` a 63-bit DCT pHash (uint64), ``flat`` True where the image has
    (almost) no content and its pHash means nothing."""

    exact: np.ndarray  # V16 (N,)
    perceptual: np.ndarray  # uint64 (N,)
    flat: np.ndarray  # bool (N,)
    thumbnail: np.ndarray  # float16 (N, 256): the 16 x 16 grayscale thumbnail, zero mean, unit length

    def __len__(self) -> int:
        return len(self.exact)


@dataclass(frozen=True)
class DuplicatePair:
    """Two images with identical pixels (``kind`` "exact", distance 0) or pHashes within the threshold
    ("near", ``distance`` in bits). ``a`` comes first in split order, then by index."""

    split_a: str
    index_a: int
    split_b: str
    index_b: int
    kind: str  # "exact" | "near"
    distance: int  # Hamming distance of the pHashes in bits; 0 for exact

    @property
    def cross_split(self) -> bool:
        return self.split_a != self.split_b


@cache
def _resize_matrix(size: int, target: int = HASH_SIZE) -> np.ndarray:
    """(target, size) float64: resampling one axis of ``size`` pixels to ``target`` with PIL's bilinear filter
    (antialiased when shrinking), built by resizing unit vectors: the filter is linear and separable, so an
    image G resizes to R @ G @ R.T."""
    rows = []
    for i in range(size):
        unit = np.zeros((1, size), np.float32)
        unit[0, i] = 1.0
        resized = Image.fromarray(unit, mode="F").resize((target, 1), Image.Resampling.BILINEAR)
        rows.append(np.asarray(resized, np.float64)[0])
    return np.stack(rows, axis=1)


@cache
def _hash_projection(size: int) -> np.ndarray:
    """(8, size): the first 8 rows of the orthonormal 32-point DCT-II after the resize, so the pHash's 8 x 8
    coefficients of a (size x size) grayscale image G are M @ G @ M.T (resize and DCT are both linear)."""
    n = np.arange(HASH_SIZE)
    k = np.arange(LOW_FREQUENCIES)[:, None]
    dct = np.sqrt(2.0 / HASH_SIZE) * np.cos(np.pi * (2 * n + 1) * k / (2 * HASH_SIZE))
    dct[0] /= np.sqrt(2.0)
    return dct @ _resize_matrix(size)


def _check_images(images: Any) -> tuple[int, ...]:
    shape = tuple(int(s) for s in images.shape)
    if len(shape) != 4 or shape[1] not in (1, 3) or np.dtype(images.dtype) != np.uint8:
        raise ValueError(
            f"expected prepared images: uint8 (N, C, H, W) with C 1 or 3; found {np.dtype(images.dtype)} {shape}"
        )
    return shape


def _digests(batch: np.ndarray) -> np.ndarray:
    """V16 (B,): BLAKE2b-128 of each image's shape and pixel bytes."""
    batch = np.ascontiguousarray(batch)
    prefix = hashlib.blake2b(repr(batch.shape[1:]).encode(), digest_size=16)
    out = bytearray()
    for row in batch:
        digest = prefix.copy()
        digest.update(row.data)
        out += digest.digest()
    return np.frombuffer(bytes(out), dtype="V16")


def _perceptual(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint64 pHashes (B,), the flat mask (B,) and the normalized thumbnails (B, 256) of a uint8 (B, C, H, W)
    batch."""
    pixels = batch.astype(np.float64)
    gray = pixels[:, 0] if batch.shape[1] == 1 else np.einsum("bchw,c->bhw", pixels, LUMA)  # (B, H, W)
    rows, columns = _hash_projection(batch.shape[2]), _hash_projection(batch.shape[3])
    coefficients = (rows @ gray @ columns.T).reshape(len(batch), -1)[:, 1:]  # (B, 63): without DC
    bits = coefficients > np.median(coefficients, axis=1, keepdims=True)
    weights = np.left_shift(np.uint64(1), np.arange(HASH_BITS, dtype=np.uint64))
    hashes = np.bitwise_or.reduce(np.where(bits, weights, np.uint64(0)), axis=1)
    # Orthonormal DCT: the sum of squared AC coefficients / pixels is the low-frequency variance (gray levels^2).
    contrast = np.sqrt((coefficients**2).sum(axis=1) / HASH_SIZE**2)
    thumbnail = _resize_matrix(batch.shape[2], THUMBNAIL_SIZE) @ gray @ _resize_matrix(batch.shape[3], THUMBNAIL_SIZE).T
    thumbnail = thumbnail.reshape(len(batch), -1)
    thumbnail -= thumbnail.mean(axis=1, keepdims=True)
    thumbnail /= np.maximum(np.linalg.norm(thumbnail, axis=1, keepdims=True), 1e-9)
    return hashes.astype(np.uint64), contrast < FLAT_CONTRAST, thumbnail.astype(np.float16)


def hash_images(images: Any, batch_size: int = 4096) -> ImageHashes:
    """Exact digests, pHashes and flat flags of uint8 (N, C, H, W) images (an array or an NpyReader), read
    ``batch_size`` rows at a time, so memory is bounded by a batch whatever N is."""
    shape = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    exact = np.empty(shape[0], dtype="V16")
    perceptual = np.empty(shape[0], dtype=np.uint64)
    flat = np.empty(shape[0], dtype=bool)
    thumbnail = np.empty((shape[0], THUMBNAIL_SIZE * THUMBNAIL_SIZE), dtype=np.float16)
    for start in range(0, shape[0], batch_size):
        batch = np.asarray(images[start : start + batch_size])
        stop = start + len(batch)
        exact[start:stop] = _digests(batch)
        perceptual[start:stop], flat[start:stop], thumbnail[start:stop] = _perceptual(batch)
    return ImageHashes(exact, perceptual, flat, thumbnail)


@dataclass
class _Pooled:
    """Every split's hashes concatenated in split order; global index g is split ``split[g]``, row g - start."""

    names: list[str]
    starts: np.ndarray  # int64 (splits + 1,)
    split: np.ndarray  # int64 (N,)
    digest: np.ndarray  # uint64 (N, 2): the exact digest as two words
    perceptual: np.ndarray  # uint64 (N,)
    flat: np.ndarray  # bool (N,)
    thumbnail: np.ndarray  # float16 (N, 256)

    def pair(self, first: int, second: int, kind: str, distance: int) -> DuplicatePair:
        a, b = min(first, second), max(first, second)
        sa, sb = int(self.split[a]), int(self.split[b])
        return DuplicatePair(
            self.names[sa], a - int(self.starts[sa]), self.names[sb], b - int(self.starts[sb]), kind, distance
        )


def _pool(hashes: dict[str, ImageHashes]) -> _Pooled:
    sizes = [len(h) for h in hashes.values()]
    return _Pooled(
        list(hashes),
        np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        np.repeat(np.arange(len(sizes)), sizes).astype(np.int64),
        np.concatenate([h.exact for h in hashes.values()]).view(np.uint64).reshape(-1, 2),
        np.concatenate([h.perceptual for h in hashes.values()]).astype(np.uint64),
        np.concatenate([h.flat for h in hashes.values()]).astype(bool),
        np.concatenate([h.thumbnail for h in hashes.values()]),
    )


def _exact_links(pooled: _Pooled) -> tuple[set[tuple[int, int]], np.ndarray]:
    """Pairs (earlier, later) of identical images, linked as stars (module docstring), and a bool
    (N, splits) table: image g has an exact pair with split s."""
    n, splits = len(pooled.split), len(pooled.names)
    linked = np.zeros((n, splits), dtype=bool)
    pairs: set[tuple[int, int]] = set()
    order = np.lexsort((np.arange(n), pooled.digest[:, 1], pooled.digest[:, 0]))  # groups, members in order
    ordered = pooled.digest[order]
    breaks = np.flatnonzero((ordered[1:] != ordered[:-1]).any(axis=1)) + 1
    for group in np.split(order, breaks):
        if len(group) < 2:
            continue
        firsts: dict[int, int] = {}
        for g in group.tolist():  # ascending: the first member seen in a split is that split's first copy
            s = int(pooled.split[g])
            if s in firsts:
                pairs.add((firsts[s], g))
                linked[g, s] = True
            else:
                firsts[s] = g
        for g in group.tolist():
            for s, first in firsts.items():
                if s != pooled.split[g]:
                    pairs.add((min(g, first), max(g, first)))
                    linked[g, s] = True
    return pairs, linked


def _block_candidates(perceptual: np.ndarray, start: int, stop: int, max_distance: int):
    """(rows, columns, distances) of the pairs rows in [start, stop) < columns within ``max_distance`` bits."""
    # (stop - start, n - start) Hamming distances; only the part right of the diagonal is kept.
    distances = np.bitwise_count(perceptual[start:stop, None] ^ perceptual[None, start:])
    rows, columns = np.nonzero(distances <= max_distance)
    keep = columns > rows
    rows, columns = rows[keep], columns[keep]
    return rows + start, columns + start, distances[rows, columns]


def _near_candidates(perceptual: np.ndarray, max_distance: int, workers: int):
    """Yield (rows, columns, distances) of every pair rows < columns of ``perceptual`` within ``max_distance``
    bits, a block of rows at a time: memory is bounded by SEARCH_BLOCK distances per worker thread (numpy
    releases the GIL in these loops, so threads use every core)."""
    n = len(perceptual)
    block = max(1, SEARCH_BLOCK // max(n, 1))
    starts = range(0, n, block)
    with ThreadPoolExecutor(workers) as pool:
        # At most two blocks per worker in flight, so finished blocks never pile up unread.
        pending = []
        for start in starts:
            pending.append(pool.submit(_block_candidates, perceptual, start, min(n, start + block), max_distance))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _correlations(thumbnails: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Correlation of the normalized thumbnails of each pair (first[k], second[k])."""
    out = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), 65536):  # bounded memory: 65,536 pairs x 256 x 4 bytes x 2 = 128 MB
        a = thumbnails[first[start : start + 65536]].astype(np.float32)
        b = thumbnails[second[start : start + 65536]].astype(np.float32)
        out[start : start + 65536] = np.einsum("ij,ij->i", a, b)
    return out


def _nearest_links(
    pooled: _Pooled, max_distance: int, min_correlation: float, exact_linked: np.ndarray, workers: int
) -> set[tuple[int, int]]:
    """Pairs (earlier, later) of near duplicates, each image linked to its nearest near-copy in every other
    split and its nearest earlier near-copy in its own split (module docstring)."""
    n, splits = len(pooled.split), len(pooled.names)
    candidates = np.flatnonzero(~pooled.flat)  # global indices of the images a pHash describes
    best_distance = np.full(n * splits, 255, dtype=np.int64)  # per (image, split): the nearest so far
    best_partner = np.full(n * splits, np.iinfo(np.int64).max, dtype=np.int64)
    for rows, columns, distances in _near_candidates(pooled.perceptual[candidates], max_distance, workers):
        earlier, later = candidates[rows], candidates[columns]
        keep = (pooled.digest[earlier] != pooled.digest[later]).any(axis=1)  # identical ones are exact pairs
        keep[keep] = _correlations(pooled.thumbnail, earlier[keep], later[keep]) >= min_correlation
        if not keep.any():
            continue
        earlier, later, distances = earlier[keep], later[keep], distances[keep].astype(np.int64)
        across = pooled.split[earlier] != pooled.split[later]
        # later -> the earlier image's split (within a split too); earlier -> the later one's (across only)
        owners = np.concatenate([later, earlier[across]])
        partners = np.concatenate([earlier, later[across]])
        keys = owners * splits + pooled.split[partners]
        distances = np.concatenate([distances, distances[across]])
        order = np.lexsort((partners, distances, keys))  # per key: the nearest, then the lowest index
        keys, partners, distances = keys[order], partners[order], distances[order]
        first = np.r_[True, keys[1:] != keys[:-1]]
        keys, partners, distances = keys[first], partners[first], distances[first]
        better = (distances < best_distance[keys]) | (
            (distances == best_distance[keys]) & (partners < best_partner[keys])
        )
        best_distance[keys[better]], best_partner[keys[better]] = distances[better], partners[better]
    found = np.flatnonzero((best_distance <= max_distance) & ~exact_linked.reshape(-1))
    owners, partners = found // splits, best_partner[found]
    return {(int(min(a, b)), int(max(a, b))) for a, b in zip(owners, partners, strict=True)}


def find_duplicates(
    hashes: dict[str, ImageHashes],
    *,
    max_distance: int | None,
    min_correlation: float = MIN_CORRELATION,
    workers: int | None = None,
) -> list[DuplicatePair]:
    """Exact and near-duplicate pairs within and across the splits of ``hashes`` (in its order: train, val,
    test), each unordered pair at most once, linked as the module docstring says; sorted by kind, then
    distance, then position. Near pairs: pHashes within ``max_distance`` bits (None: exact pairs only) and
    thumbnails correlated at least ``min_correlation``. ``workers``: threads for the search (default: every
    core)."""
    if max_distance is not None and not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"max_distance must be 0..{HASH_BITS} bits or None (exact pairs only), not {max_distance}")
    if not -1.0 <= min_correlation <= 1.0:
        raise ValueError(f"min_correlation must be in -1..1, not {min_correlation}")
    pooled = _pool(hashes)
    exact, linked = _exact_links(pooled)
    near: set[tuple[int, int]] = set()
    if max_distance is not None:
        near = _nearest_links(pooled, max_distance, min_correlation, linked, workers or os.cpu_count() or 1)
    ranked = sorted(
        [(0, 0, a, b) for a, b in exact]
        + [(1, int(np.bitwise_count(pooled.perceptual[a] ^ pooled.perceptual[b])), a, b) for a, b in near]
    )
    return [pooled.pair(a, b, KINDS[kind], distance) for kind, distance, a, b in ranked]


def cross_split_test_rows(pairs: Sequence[DuplicatePair], test_split: str = "test") -> np.ndarray:
    """Sorted int64 indices of the ``test_split`` images with an exact or near duplicate in another split."""
    rows = {p.index_a for p in pairs if p.cross_split and p.split_a == test_split}
    rows |= {p.index_b for p in pairs if p.cross_split and p.split_b == test_split}
    return np.array(sorted(rows), dtype=np.int64)


def summarize(pairs: Sequence[DuplicatePair], split_names: Sequence[str], *, test_split: str = "test") -> dict:
    """Pair counts by kind, within each split and across each pair of splits (every key present, zeros
    included, so the metrics file has the same keys every run), and the number of ``test_split`` images
    with a duplicate in another split."""
    order = {name: i for i, name in enumerate(split_names)}
    unknown = sorted(({p.split_a for p in pairs} | {p.split_b for p in pairs}) - set(order))
    if unknown:
        raise ValueError(f"pairs name split(s) {unknown} that are not in split_names {list(split_names)}")
    across_keys = [f"{a}-{b}" for i, a in enumerate(split_names) for b in split_names[i + 1 :]]
    summary: dict[str, Any] = {}
    for kind in KINDS:
        within = dict.fromkeys(split_names, 0)
        across = dict.fromkeys(across_keys, 0)
        for p in pairs:
            if p.kind != kind:
                continue
            if p.cross_split:
                first, second = sorted((p.split_a, p.split_b), key=order.__getitem__)
                across[f"{first}-{second}"] += 1
            else:
                within[p.split_a] += 1
        summary[f"{kind}_within"], summary[f"{kind}_across"] = within, across
    summary["leaked_test_images"] = len(cross_split_test_rows(pairs, test_split))
    return summary


def write_pairs_csv(path: str | Path, pairs: Sequence[DuplicatePair], names: dict[str, Sequence[str]]) -> None:
    """One row per pair (kind, distance, split_a, file_a, split_b, file_b); ``names[split][i]`` is the file or
    source name of image i of that split. Written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["kind", "distance", "split_a", "file_a", "split_b", "file_b"])
        for p in pairs:
            writer.writerow(
                [p.kind, p.distance, p.split_a, names[p.split_a][p.index_a], p.split_b, names[p.split_b][p.index_b]]
            )


def _shown(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """A (C, H, W) uint8 image as matplotlib's imshow takes it, with the arguments that keep its gray levels."""
    if image.shape[0] == 1:
        return image[0], {"cmap": "gray", "vmin": 0, "vmax": 255}
    return image.transpose(1, 2, 0), {}


def _short(text: str, width: int = 26) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def plot_pairs(
    path: str | Path,
    pairs: Sequence[DuplicatePair],
    images: dict[str, Any],
    names: dict[str, Sequence[str]],
    limit: int = 12,
    note: str = "",
) -> int:
    """A PNG grid of up to ``limit`` pairs side by side (cross-split pairs first, then in ``pairs``' order),
    each image captioned with its split/file and the pair's kind and distance; returns how many pairs it
    draws. With no pairs it still writes a picture that says so, with ``note`` (what was searched) below.
    Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = ([p for p in pairs if p.cross_split] + [p for p in pairs if not p.cross_split])[: max(limit, 0)]
    per_row = 3  # pairs per row: six images
    rows = max(1, -(-len(chosen) // per_row))
    figure = Figure(figsize=(2 * per_row * 1.6, rows * 2.0), dpi=100)
    FigureCanvasAgg(figure)
    if not chosen:
        figure.text(0.5, 0.55, "no duplicate pairs found", ha="center", va="center", fontsize=14)
        figure.text(0.5, 0.3, note, ha="center", va="center", fontsize=8, wrap=True)
    for number, pair in enumerate(chosen):
        caption = "exact copy" if pair.kind == "exact" else f"near, {pair.distance} bits"
        for side, (split, index) in enumerate(((pair.split_a, pair.index_a), (pair.split_b, pair.index_b))):
            axes = figure.add_subplot(rows, 2 * per_row, 2 * number + side + 1)
            pixels, style = _shown(np.asarray(images[split][index]))
            axes.imshow(pixels, interpolation="nearest", **style)
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(f"{split}/{_short(str(names[split][index]))}\n{caption}", fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return len(chosen)
