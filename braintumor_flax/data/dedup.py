"""Exact and near-duplicate detection, and the leakage policy built on it.

Exact duplicates share the hash of their decoded pixels; near duplicates have 64-bit
perceptual hashes (pHash of the greyscale image) within NEAR_DUP_THRESHOLD bits.
The threshold was chosen from the BRISC/Kaggle distance histogram; see docs/data.md.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

NEAR_DUP_THRESHOLD = 2  # Hamming bits of 64 (pHash distances are even); chosen in docs/data.md


def pixel_hash(rgb: np.ndarray) -> str:
    """sha1 over shape + pixels: equal for identical decoded images whatever the file encoding."""
    h = hashlib.sha1(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit pHash of the greyscale image as an unsigned int (bit order: row-major DCT cells)."""
    bits = imagehash.phash(Image.fromarray(rgb).convert("L")).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def near_pairs(hashes: np.ndarray, threshold: int, block: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming(hashes[i], hashes[j]) <= threshold; returns (i, j, distance).

    Blocked all-pairs XOR + popcount: O(n^2) but vectorised, ~1 s for 13k hashes.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, block):
        rows = h[start:start + block]
        dist = np.bitwise_count(rows[:, None] ^ h[None, start:])  # only columns >= start
        ii, jj = np.nonzero(dist <= threshold)
        jj = jj + start
        ii = ii + start
        keep = jj > ii
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_d.append(dist[ii[keep] - start, jj[keep] - start])
    if not out_i:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty.astype(np.uint8)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d).astype(np.uint8)


def nearest_distances(hashes: np.ndarray, block: int = 512) -> np.ndarray:
    """Distance from each hash to its nearest other hash (for choosing the threshold)."""
    h = np.asarray(hashes, dtype=np.uint64)
    best = np.full(len(h), 64, np.uint8)
    for start in range(0, len(h), block):
        dist = np.bitwise_count(h[start:start + block, None] ^ h[None, :]).astype(np.uint8)
        idx = np.arange(start, min(start + block, len(h)))
        dist[idx - start, idx] = 64
        best[idx] = dist.min(axis=1)
    return best


@dataclass(frozen=True)
class Item:
    """What the policy needs to know about one decoded image."""

    path: str
    dataset: str
    role: str  # "train" (the pooled training data), "test_<dataset>" or "predict"
    tumor: str | None
    plane: str | None
    pixel_hash: str
    phash: int


@dataclass
class DedupResult:
    keep: np.ndarray  # bool [N]
    removed: list[dict]  # one entry per dropped item: path, reason, kind, match
    conflicts: list[dict]  # identical images with conflicting labels (all copies dropped)
    stats: dict


def _preference(item: Item) -> tuple:
    # Keep the copy with the most label information, then a stable order.
    return (item.plane is None, item.tumor is None, item.dataset, item.path)


def plan(items: Sequence[Item], threshold: int = NEAR_DUP_THRESHOLD) -> DedupResult:
    """Apply the policy: drop label conflicts, remove train copies of test images, keep one per split."""
    n = len(items)
    keep = np.ones(n, bool)
    removed: list[dict] = []
    conflicts: list[dict] = []

    # 1. Identical pixels with different labels: the label is untrustworthy, drop every copy.
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[it.pixel_hash].append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        tumors = {items[i].tumor for i in members if items[i].tumor is not None}
        planes = {items[i].plane for i in members if items[i].plane is not None}
        if len(tumors) > 1 or len(planes) > 1:
            conflicts.append({
                "paths": [items[i].path for i in members],
                "tumor": [items[i].tumor for i in members],
                "plane": [items[i].plane for i in members],
            })
            for i in members:
                keep[i] = False
                removed.append({"path": items[i].path, "reason": "conflicting_labels", "kind": "exact",
                                "match": None})

    # Neighbour lists from pHash pairs (exact duplicates have distance 0, so they are included).
    pi, pj, pd = near_pairs(np.array([it.phash for it in items], np.uint64), threshold)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(pi.tolist(), pj.tolist(), strict=True):
        neighbours[a].append(b)
        neighbours[b].append(a)
    near_label_disagreements = int(sum(
        items[a].tumor is not None and items[b].tumor is not None and items[a].tumor != items[b].tumor
        for a, b in zip(pi.tolist(), pj.tolist(), strict=True)
    ))

    def kind(a: int, b: int) -> str:
        return "exact" if items[a].pixel_hash == items[b].pixel_hash else "near"

    # 2. Leakage: a training image that matches any kept test image (any dataset) leaves training.
    for i, it in enumerate(items):
        if not keep[i] or it.role != "train":
            continue
        matches = [j for j in neighbours[i] if keep[j] and items[j].role.startswith("test")]
        if matches:
            j = min(matches, key=lambda j: (kind(i, j) != "exact", items[j].path))
            keep[i] = False
            removed.append({"path": it.path, "reason": "train_test_leak", "kind": kind(i, j),
                            "cross_dataset": it.dataset != items[j].dataset, "match": items[j].path})

    # 3. Within a split keep one copy: greedy in preference order, so an image is removed only
    #    when it directly duplicates a kept one (no chaining through intermediate images).
    order = sorted(range(n), key=lambda i: _preference(items[i]))
    kept_so_far = np.zeros(n, bool)
    for i in order:
        if not keep[i]:
            continue
        dup_of = [j for j in neighbours[i] if kept_so_far[j] and items[j].role == items[i].role]
        if dup_of:
            j = min(dup_of, key=lambda j: (kind(i, j) != "exact", items[j].path))
            keep[i] = False
            removed.append({"path": items[i].path, "reason": "within_split", "kind": kind(i, j),
                            "cross_dataset": items[i].dataset != items[j].dataset, "match": items[j].path})
        else:
            kept_so_far[i] = True

    stats = _stats(items, groups, removed, conflicts, len(pi), near_label_disagreements, threshold)
    stats["near_pairs_by_distance"] = {str(d): int(c) for d, c in enumerate(np.bincount(pd)) if c}
    stats["near_pairs_cross_dataset"] = int(sum(items[a].dataset != items[b].dataset
                                                for a, b in zip(pi.tolist(), pj.tolist(), strict=True)))
    return DedupResult(keep=keep, removed=removed, conflicts=conflicts, stats=stats)


def _stats(items, groups, removed, conflicts, n_pairs, near_disagree, threshold) -> dict:
    per_dataset: dict[str, dict] = {}
    for ds in sorted({it.dataset for it in items}):
        idx = [i for i, it in enumerate(items) if it.dataset == ds]
        ds_groups: dict[str, set[str]] = defaultdict(set)
        counts: dict[str, int] = defaultdict(int)
        for i in idx:
            counts[items[i].pixel_hash] += 1
            ds_groups[items[i].pixel_hash].add(items[i].role)
        per_dataset[ds] = {
            "files": len(idx),
            "distinct_images": len(counts),
            "exact_duplicate_files": len(idx) - len(counts),
            "exact_duplicate_groups": sum(c > 1 for c in counts.values()),
            "exact_groups_spanning_train_test": sum(
                "train" in r and any(x.startswith("test") for x in r) for r in ds_groups.values()),
        }
    cross = sum(len({items[i].dataset for i in m}) > 1 for m in groups.values())
    removal_counts: dict[str, int] = defaultdict(int)
    for r in removed:
        scope = "cross_dataset" if r.get("cross_dataset") else "same_dataset"
        key = r["reason"] if r["reason"] == "conflicting_labels" else f"{r['reason']}/{r['kind']}/{scope}"
        removal_counts[key] += 1
    return {
        "near_dup_threshold_bits": threshold,
        "near_pairs_within_threshold": n_pairs,
        "near_pairs_with_different_tumour_label": near_disagree,
        "per_dataset": per_dataset,
        "exact_groups_spanning_datasets": cross,
        "conflict_groups": len(conflicts),
        "removed_by_reason": dict(sorted(removal_counts.items())),
        "removed_total": len(removed),
    }
