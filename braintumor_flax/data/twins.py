"""Twins: the same picture under another copy — mirrored or rotated, re-encoded, rescaled, cropped or padded,
blurred or sharpened (another dataset's processing), brighter or of other contrast.

Two steps, so the cost stays near-linear in the number of images:

1. **Candidates from an index.** Each image becomes a *normalised view*: greyscale, cropped to the bounding box
   of the head (so padding, background crops and rescaling drop out), resampled to VIEW_SIZE², smoothed (so a
   smoothed and a sharp copy look alike) and standardised (so brightness and contrast drop out). Its 16 × 16
   average is the index descriptor. A faiss HNSW index of every image's descriptor is queried with all eight
   mirror / rotation variants of every image (the dihedral group: a left-right mirrored copy is variant 4).
2. **Confirmation by an aligned pixel measure.** For each candidate pair, the correlation of the two views'
   local structure (`structure_view`: locally contrast-normalised, so that BRISC's re-processing of a Kaggle
   slice drops out), the second in the variant that matched, at the best of the small shifts within ±SHIFT
   pixels. Twins are the pairs at or above TWIN_THRESHOLD, placed where neighbouring slices of one scan stop
   appearing (docs/duplicates.md shows the measured distribution and example pairs on both sides).

Twins then form groups (connected components); `dedup.plan` decides what each group may keep.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

VIEW_SIZE = 64
DESCRIPTOR_SIZE = 16
SHIFT = 2  # pixels of VIEW_SIZE: what the bounding-box normalisation leaves of a crop or a one-sided pad
TWINS_VERSION = 2  # bump when a view, the measure or the candidates change: the cache key
TWIN_THRESHOLD = 0.93  # aligned structure correlation; chosen from the measured distribution (docs/duplicates.md)
LOCAL_SIGMA = 3.0  # pixels of VIEW_SIZE: the scale below which structure counts
LOCAL_FLOOR = 0.3  # added to the local deviation, so flat background does not amplify noise
CANDIDATE_NEIGHBOURS = 8  # per query variant
CANDIDATE_MIN_SIMILARITY = 0.85  # cosine of descriptors below which a pair is not even scored
PREFILTER_MARGIN = 0.25  # unshifted correlation this far below the threshold: no shift search
# Variant k of the dihedral group: k % 4 quarter turns, then a left-right mirror when k >= 4.
VARIANT_NAMES = ("identity", "rot90", "rot180", "rot270", "mirror", "mirror+rot90", "mirror+rot180",
                 "mirror+rot270")
REPROCESSED_SHARPNESS_RATIO = 1.35  # one copy this much sharper than the other: another pipeline's processing


def dihedral(view: np.ndarray, variant: int) -> np.ndarray:
    """Variant `variant` (0..7) of [..., H, W] arrays: a left-right mirror, then k quarter turns."""
    out = view[..., ::-1] if variant >= 4 else view
    return np.rot90(out, variant % 4, axes=(-2, -1))


def _head_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """Rows and columns [r0, r1) x [c0, c1) of the head: the extent of the thresholded, smoothed image,
    ignoring rows / columns with under 2 % foreground (burnt-in text, stray marks)."""
    smooth = ndimage.uniform_filter(grey, 5)
    mask = smooth > 0.15 * max(float(np.percentile(smooth, 99)), 1.0)
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if len(rows) < 8 or len(cols) < 8:  # nearly empty: the whole frame
        return 0, grey.shape[0], 0, grey.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def normalised_view(image: np.ndarray) -> np.ndarray:
    """float32 [VIEW_SIZE, VIEW_SIZE], zero mean, unit variance: the head's box of a uint8 RGB (or grey) image,
    resampled and smoothed (sigma 1 px), so the copies of one picture have nearly equal views."""
    grey = image.astype(np.float32).mean(axis=-1) if image.ndim == 3 else image.astype(np.float32)
    r0, r1, c0, c1 = _head_box(grey)
    crop = Image.fromarray(np.ascontiguousarray(grey[r0:r1, c0:c1]), mode="F")
    view = ndimage.gaussian_filter(np.asarray(crop.resize((VIEW_SIZE, VIEW_SIZE), Image.BILINEAR)), 1.0)
    view -= view.mean()
    return (view / max(float(view.std()), 1e-3)).astype(np.float32)


def sharpness(image: np.ndarray) -> float:
    """Mean |Laplacian| inside the head (grey levels): BRISC's smoothed copies score lower than Kaggle's."""
    grey = image.astype(np.float32).mean(axis=-1) if image.ndim == 3 else image.astype(np.float32)
    r0, r1, c0, c1 = _head_box(grey)
    return float(np.abs(ndimage.laplace(grey[r0:r1, c0:c1])).mean())


def descriptors(views: np.ndarray) -> np.ndarray:
    """float32 [..., DESCRIPTOR_SIZE²] unit vectors: the views averaged to DESCRIPTOR_SIZE², standardised."""
    f = VIEW_SIZE // DESCRIPTOR_SIZE
    small = views.reshape(*views.shape[:-2], DESCRIPTOR_SIZE, f, DESCRIPTOR_SIZE, f).mean(axis=(-3, -1))
    flat = small.reshape(*views.shape[:-2], -1)
    flat = flat - flat.mean(axis=-1, keepdims=True)
    return (flat / np.linalg.norm(flat, axis=-1, keepdims=True).clip(1e-6)).astype(np.float32)


def structure_view(views: np.ndarray) -> np.ndarray:
    """float32 [..., VIEW_SIZE, VIEW_SIZE]: each view locally contrast-normalised (minus its local mean, over its
    local standard deviation, both Gaussian-weighted over LOCAL_SIGMA pixels), then standardised. What is left is
    the anatomy's structure: another dataset's processing (bias-field correction, local contrast enhancement,
    windowing, gamma) changes intensities slowly across the image and drops out, a neighbouring slice does not."""
    sigma = (0,) * (views.ndim - 2) + (LOCAL_SIGMA, LOCAL_SIGMA)
    local = views - ndimage.gaussian_filter(views, sigma)
    local /= np.sqrt(ndimage.gaussian_filter(local * local, sigma)) + LOCAL_FLOOR
    local -= local.mean(axis=(-2, -1), keepdims=True)
    local /= local.std(axis=(-2, -1), keepdims=True).clip(1e-6)
    return local.astype(np.float32)


def candidate_pairs(views: np.ndarray, *, neighbours: int = CANDIDATE_NEIGHBOURS,
                    min_similarity: float = CANDIDATE_MIN_SIMILARITY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, match, variant): `match` is among the nearest neighbours in the index of variant `variant` of
    `query`. Near-linear: an HNSW graph (faiss), not all pairs; each unordered pair appears once per variant
    and direction in which it was found."""
    import faiss  # imported here so that reading a prepared split needs none of it

    n = len(views)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    faiss.omp_set_num_threads(max(1, os.cpu_count() or 1))
    index = faiss.IndexHNSWFlat(DESCRIPTOR_SIZE ** 2, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = 96
    index.add(descriptors(views))
    k = min(neighbours + 1, n)
    found = []
    for variant in range(8):
        sim, nbr = index.search(descriptors(dihedral(views, variant)), k)
        rows = np.repeat(np.arange(n), k)
        nbr, sim = nbr.ravel(), sim.ravel()
        ok = (nbr >= 0) & (nbr != rows) & (sim >= min_similarity)
        found.append(np.stack([rows[ok], nbr[ok], np.full(int(ok.sum()), variant)], axis=1))
    key = np.unique(np.concatenate(found), axis=0)
    return key[:, 0], key[:, 1], key[:, 2]


def aligned_correlation(a: np.ndarray, b: np.ndarray, shift: int = SHIFT) -> np.ndarray:
    """Per pair, the highest Pearson correlation of `a` with `b` over shifts of `b` within ±shift pixels.

    a, b: float32 [P, VIEW_SIZE, VIEW_SIZE] (b already in the matching variant). Only the central region that
    every shift covers is compared."""
    s = shift
    size = a.shape[-1]
    core = a[:, s:size - s, s:size - s]
    core = core - core.mean(axis=(1, 2), keepdims=True)
    core /= np.sqrt((core ** 2).sum(axis=(1, 2), keepdims=True)).clip(1e-6)
    best = np.full(len(a), -1.0, np.float32)
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            moved = b[:, s + dy:size - s + dy, s + dx:size - s + dx]
            moved = moved - moved.mean(axis=(1, 2), keepdims=True)
            corr = np.einsum("pij,pij->p", core, moved) / np.sqrt(
                np.einsum("pij,pij->p", moved, moved)).clip(1e-6)
            np.maximum(best, corr, out=best)
    return best


@dataclass(frozen=True)
class TwinPairs:
    """Scored candidate pairs, one row per unordered pair: first < second (rows of the images given), the
    variant of `first` that matches `second` as it is, and the aligned structure correlation; `twin` marks the
    pairs at or above `threshold`."""

    first: np.ndarray
    second: np.ndarray
    variant: np.ndarray
    score: np.ndarray
    threshold: float

    @property
    def twin(self) -> np.ndarray:
        return self.score >= self.threshold

    def twins(self) -> TwinPairs:
        keep = self.twin
        return TwinPairs(self.first[keep], self.second[keep], self.variant[keep], self.score[keep], self.threshold)


def score_pairs(structure: np.ndarray, first: np.ndarray, second: np.ndarray, variant: np.ndarray, *,
                shift: int = SHIFT, chunk: int = 4096) -> np.ndarray:
    """Aligned correlation of structure views `structure[first]` in `variant` and `structure[second]`, batched
    per variant."""
    score = np.empty(len(first), np.float32)
    for v in range(8):
        rows = np.flatnonzero(variant == v)
        for start in range(0, len(rows), chunk):
            sel = rows[start:start + chunk]
            score[sel] = aligned_correlation(dihedral(structure[first[sel]], v), structure[second[sel]], shift)
    return score


def find_twins(views: np.ndarray, threshold: float = TWIN_THRESHOLD) -> TwinPairs:
    """Every candidate pair of the index scored by the aligned structure correlation, the best variant per pair.

    Pairs whose unshifted correlation is below threshold - PREFILTER_MARGIN are not searched over shifts (none
    of those became twins on the BRISC + Kaggle collection; the shift search is 25 times the cost)."""
    query, match, variant = candidate_pairs(views)
    # One row per unordered pair and variant, as the variant that maps `first` onto `second`.
    forward = query < match
    variant = np.where(forward, variant, np.array(_INVERSE)[variant])
    rows = np.unique(np.stack([np.minimum(query, match), np.maximum(query, match), variant], axis=1), axis=0)
    first, second, variant = rows[:, 0], rows[:, 1], rows[:, 2]
    structure = structure_view(views)
    score = score_pairs(structure, first, second, variant, shift=0)
    near = np.flatnonzero(score >= threshold - PREFILTER_MARGIN)
    score[near] = score_pairs(structure, first[near], second[near], variant[near])
    order = np.lexsort((-score, second, first))
    first, second, variant, score = first[order], second[order], variant[order], score[order]
    keep = np.ones(len(first), bool)
    keep[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return TwinPairs(first[keep], second[keep], variant[keep], score[keep], threshold)


def _inverse_variants() -> tuple[int, ...]:
    probe = np.arange(16).reshape(4, 4)
    return tuple(next(w for w in range(8) if np.array_equal(dihedral(dihedral(probe, v), w), probe))
                 for v in range(8))


_INVERSE = _inverse_variants()


# ---------------------------------------------------------------------------------------------
# the finder over a whole collection, cached


@dataclass(frozen=True)
class TwinLinks:
    """The confirmed twins of a collection, for the deduplication policy: pairs of rows with their score, the
    variant of `first` that matches `second`, and each image's sharpness (for telling re-processed copies)."""

    pairs: TwinPairs
    sharpness: np.ndarray
    candidates: int  # scored candidate pairs (the histogram of docs/duplicates.md is theirs)
    seconds: float

    def kind(self, k: int, exact: bool) -> str:
        """One of KINDS for twin pair k: exact pixels, a mirror or rotation, another processing, else a
        re-encoded copy (re-compression, rescaling, crop or padding, brightness)."""
        if exact:
            return "exact"
        if self.pairs.variant[k] != 0:
            return "mirrored"
        a, b = self.sharpness[self.pairs.first[k]], self.sharpness[self.pairs.second[k]]
        if max(a, b) >= REPROCESSED_SHARPNESS_RATIO * max(min(a, b), 1e-6):
            return "re-processed"
        return "re-encoded"


KINDS = ("exact", "re-encoded", "mirrored", "re-processed")


def collection_twins(images: Callable[[], np.ndarray], content_hashes: Sequence[str], *,
                     cache: Path | None = None, threshold: float = TWIN_THRESHOLD) -> TwinLinks:
    """Twins among the images (uint8 RGB [N, H, W, 3], asked for only on a cache miss). The result is cached
    under `cache` by the ordered content hashes, so an unchanged collection is not rescored."""
    key = hashlib.sha256(f"twins v{TWINS_VERSION} threshold={threshold}\n".encode()
                         + "\n".join(content_hashes).encode()).hexdigest()[:32]
    path = cache / f"{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as z:
            pairs = TwinPairs(z["first"], z["second"], z["variant"], z["score"], threshold)
            return TwinLinks(pairs, z["sharpness"], int(z["candidates"]), float(z["seconds"]))
    t0 = time.perf_counter()
    pixels = images()
    views = np.stack([normalised_view(im) for im in pixels]) if len(pixels) else np.zeros((0, VIEW_SIZE, VIEW_SIZE),
                                                                                         np.float32)
    sharp = np.array([sharpness(im) for im in pixels], np.float32)
    scored = find_twins(views, threshold)
    links = TwinLinks(scored.twins(), sharp, len(scored.first), time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        p = links.pairs
        np.savez(tmp, first=p.first, second=p.second, variant=p.variant, score=p.score, sharpness=sharp,
                 candidates=links.candidates, seconds=links.seconds)
        os.replace(tmp, path)
    return links


def pair_score(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(score, variant) of two uint8 images: the aligned structure correlation of `b` with the best of the eight
    variants of `a`; the images are twins when the score is at least TWIN_THRESHOLD."""
    structure = structure_view(np.stack([normalised_view(a), normalised_view(b)]))
    scores = score_pairs(structure, np.zeros(8, np.int64), np.ones(8, np.int64), np.arange(8))
    return float(scores.max()), int(scores.argmax())
