"""Duplicate links and the leakage policy built on them.

Three kinds of evidence link two images as the same picture: identical decoded pixels, 64-bit perceptual
hashes (pHash of the greyscale image) within NEAR_DUP_THRESHOLD bits, and the twins of `data.twins` (mirrored,
rotated, re-encoded, re-processed copies, confirmed by an aligned pixel measure). Linked images form groups;
`plan` decides what each group may keep (docs/duplicates.md).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from braintumor_flax.data.twins import TwinLinks

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


def linked_groups(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """int64 [n] group ids: rows are in one group when a chain of (first[k], second[k]) links joins them
    (union-find; an id is the group's smallest row)."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(np.asarray(first).tolist(), np.asarray(second).tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(a) for a in range(n)], np.int64)


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
    group: np.ndarray  # int64 [N]: twin group of each item (its smallest row), over every decoded item
    removed: list[dict]  # one entry per dropped item: path, reason, kind, match, cross_dataset, group
    conflicts: list[dict]  # twin groups with conflicting labels (all members dropped)
    stats: dict


def _preference(item: Item) -> tuple:
    # Keep the copy with the most label information, then a stable order.
    return (item.plane is None, item.tumor is None, item.dataset, item.path)


@dataclass(frozen=True)
class Link:
    """Two items showing the same picture, and how (one of twins.KINDS)."""

    first: int
    second: int
    kind: str
    score: float = 1.0


def links_of(items: Sequence[Item], twins: TwinLinks | None = None,
             threshold: int = NEAR_DUP_THRESHOLD) -> list[Link]:
    """Every link between items: identical pixels, pHash within `threshold` bits, and the confirmed twins of
    the index (`data.twins`), one link per pair, the most specific kind kept."""
    found: dict[tuple[int, int], Link] = {}

    def add(a: int, b: int, kind: str, score: float = 1.0) -> None:
        a, b = min(a, b), max(a, b)
        if items[a].pixel_hash == items[b].pixel_hash:
            kind, score = "exact", 1.0
        old = found.get((a, b))
        if old is None or (old.kind != "exact" and (kind == "exact" or score > old.score)):
            found[(a, b)] = Link(a, b, kind, score)

    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_pixels[it.pixel_hash].append(i)
    for members in by_pixels.values():
        for other in members[1:]:
            add(members[0], other, "exact")
    pi, pj, _ = near_pairs(np.array([it.phash for it in items], np.uint64), threshold)
    for a, b in zip(pi.tolist(), pj.tolist(), strict=True):
        add(a, b, "re-encoded", 0.0)  # pHash alone: the weakest evidence, so any twin score replaces it
    if twins is not None:
        p = twins.pairs
        for k, (a, b) in enumerate(zip(p.first.tolist(), p.second.tolist(), strict=True)):
            add(a, b, twins.kind(k, items[a].pixel_hash == items[b].pixel_hash), float(p.score[k]))
    return sorted(found.values(), key=lambda link: (link.first, link.second))


def plan(items: Sequence[Item], twins: TwinLinks | None = None, threshold: int = NEAR_DUP_THRESHOLD) -> DedupResult:
    """The leakage policy, by twin groups (connected components of the links):

    1. a group whose members carry different tumour or plane labels is dropped whole (its label is untrusted);
    2. a group with any test member loses every training member, so no test picture is trained on in any form;
    3. each split keeps one member of each group (the one with the most labels), so the training pool holds no
       two copies of a picture and a validation draw from it can never put a picture on both sides.
    """
    n = len(items)
    links = links_of(items, twins, threshold)
    group = linked_groups(n, np.array([x.first for x in links], np.int64), np.array([x.second for x in links],
                                                                                   np.int64))
    neighbours: list[list[tuple[int, Link]]] = [[] for _ in range(n)]
    for link in links:
        neighbours[link.first].append((link.second, link))
        neighbours[link.second].append((link.first, link))
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group.tolist()):
        members[g].append(i)

    keep = np.ones(n, bool)
    removed: list[dict] = []
    conflicts: list[dict] = []

    def drop(i: int, reason: str, among: list[int]) -> None:
        """Remove item i, naming the member of `among` it is most directly a copy of."""
        direct = [(j, link) for j, link in neighbours[i] if j in among]
        if direct:
            j, link = max(direct, key=lambda x: (x[1].kind == "exact", x[1].score, -x[0]))
            kind = link.kind
        else:
            j, kind = min(among, key=lambda j: _preference(items[j])), "chained"
        keep[i] = False
        removed.append({"path": items[i].path, "reason": reason, "kind": kind, "match": items[j].path,
                        "cross_dataset": items[i].dataset != items[j].dataset, "group": int(group[i])})

    for g, rows in members.items():
        if len(rows) < 2:
            continue
        tumors = {items[i].tumor for i in rows if items[i].tumor is not None}
        planes = {items[i].plane for i in rows if items[i].plane is not None}
        if len(tumors) > 1 or len(planes) > 1:
            conflicts.append({"paths": [items[i].path for i in rows], "tumor": [items[i].tumor for i in rows],
                              "plane": [items[i].plane for i in rows]})
            for i in rows:
                keep[i] = False
                removed.append({"path": items[i].path, "reason": "conflicting_labels", "kind": "group",
                                "match": None, "cross_dataset": False, "group": int(g)})
            continue
        tests = [i for i in rows if items[i].role.startswith("test")]
        if tests:
            for i in rows:
                if items[i].role == "train":
                    drop(i, "train_test_leak", tests)
        by_role: dict[str, list[int]] = defaultdict(list)
        for i in rows:
            if keep[i]:
                by_role[items[i].role].append(i)
        for same in by_role.values():
            same.sort(key=lambda i: _preference(items[i]))
            for i in same[1:]:
                drop(i, "within_split", same[:1])

    stats = _stats(items, links, group, keep, removed, conflicts, threshold)
    if twins is not None:
        stats["twin_finder"] = {"candidates_scored": twins.candidates, "twin_pairs": len(twins.pairs.first),
                                "threshold": twins.pairs.threshold, "seconds": round(twins.seconds, 1)}
    return DedupResult(keep=keep, group=group, removed=removed, conflicts=conflicts, stats=stats)


def _stats(items, links, group, keep, removed, conflicts, threshold) -> dict:
    per_dataset: dict[str, dict] = {}
    for ds in sorted({it.dataset for it in items}):
        idx = [i for i, it in enumerate(items) if it.dataset == ds]
        per_dataset[ds] = {"files": len(idx), "distinct_pictures": len({int(group[i]) for i in idx}),
                           "distinct_pixels": len({items[i].pixel_hash for i in idx})}
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for link in links:
        a, b = items[link.first], items[link.second]
        by_kind[link.kind]["pairs"] += 1
        by_kind[link.kind]["cross_dataset"] += a.dataset != b.dataset
        roles = {a.role, b.role}
        by_kind[link.kind]["train_test"] += "train" in roles and any(r.startswith("test") for r in roles)
    sizes = np.bincount(np.unique(group, return_inverse=True)[1])
    roles_of: dict[int, set[str]] = defaultdict(set)
    for i, it in enumerate(items):
        if keep[i]:
            roles_of[int(group[i])].add(it.role)
    test_roles = sorted({it.role for it in items if it.role.startswith("test")})
    shared_tests = {f"{a}&{b}": sum(a in r and b in r for r in roles_of.values())
                    for k, a in enumerate(test_roles) for b in test_roles[k + 1:]}
    removal_counts: dict[str, int] = defaultdict(int)
    for r in removed:
        scope = "cross_dataset" if r.get("cross_dataset") else "same_dataset"
        key = r["reason"] if r["reason"] == "conflicting_labels" else f"{r['reason']}/{r['kind']}/{scope}"
        removal_counts[key] += 1
    return {
        "near_dup_threshold_bits": threshold,
        "links_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "groups": {"pictures": len(sizes), "with_copies": int((sizes > 1).sum()), "largest": int(sizes.max(initial=0)),
                   "by_size": {str(s): int(c) for s, c in enumerate(np.bincount(sizes)) if c and s > 0}},
        "kept_test_groups_shared": shared_tests,
        "per_dataset": per_dataset,
        "conflict_groups": len(conflicts),
        "removed_by_reason": dict(sorted(removal_counts.items())),
        "removed_total": len(removed),
    }
