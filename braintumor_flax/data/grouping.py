"""A validation split drawn by groups of look-alike images, so that it resembles a test set of unseen patients.

Neither dataset gives patient IDs, and a random validation split keeps a patient's neighbouring slices on both
sides: most validation images then have a close look-alike of their own label in training, and validation
overstates the test sets (docs/experiments/why-validation-overstates-the-test-sets.md). Here look-alike images are
linked, the links are followed to groups, and validation takes whole groups, stratified as the random draw is
(dataset × tumour × plane). A grouping is named by a spec (`TrainConfig.val_grouping`):

* `""`: no grouping, images drawn one by one (every checkpoint before this option);
* `"imagenet:C"`: cosine similarity ≥ C between ImageNet VGG16 features (blocks 1-5 at 128 px, flattened; no
  label ever trained them, so the split is a fixed function of the data at any training size);
* `"phash:T"`: perceptual hashes (the deduplication's) within T bits.

How far each makes validation resemble the test sets: `benchmarks/eval_val_grouping.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from braintumor_flax.data.dedup import linked_groups, near_pairs

GROUPING_SIZE = 128  # the input size of the ImageNet features, whatever size a recipe trains at
KINDS = ("imagenet", "phash")


def parse_grouping(spec: str) -> tuple[str, float] | None:
    """`"kind:threshold"` → (kind, threshold); `""` → None. Raises ValueError for anything else."""
    if not spec:
        return None
    kind, _, value = spec.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if kind not in KINDS or threshold != threshold:
        raise ValueError(f"validation grouping {spec!r}: expected '' or one of "
                         + ", ".join(f"'{k}:<threshold>'" for k in KINDS))
    return kind, threshold


def cosine_pairs(features: np.ndarray, threshold: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j whose features have cosine similarity ≥ threshold (blocked: [block, N] at a time)."""
    unit = features.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True).clip(1e-12)
    first, second = [], []
    for start in range(0, len(unit), block):
        rows, cols = np.nonzero(unit[start:start + block] @ unit.T >= threshold)
        rows += start
        keep = cols > rows
        first.append(rows[keep])
        second.append(cols[keep])
    if not first:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(first), np.concatenate(second)


Features = Callable[[np.ndarray], np.ndarray]  # uint8 RGB [N, 128, 128, 3] -> [N, D]


def look_alike_groups(spec: str, *, phashes: np.ndarray, images: Callable[[], np.ndarray],
                      features: Features | None = None) -> np.ndarray:
    """Group ids of the pool under a grouping spec. `images`: the pool at GROUPING_SIZE px (uint8 RGB), asked for
    only by the ImageNet kind, whose `features` the caller gives (`models.pretrained.imagenet_features`: the data
    package does not import the models; `TrainConfig.split_args()` passes it)."""
    parsed = parse_grouping(spec)
    if parsed is None:
        return np.arange(len(phashes), dtype=np.int64)
    kind, threshold = parsed
    if kind == "phash":
        first, second, _ = near_pairs(np.asarray(phashes, np.uint64), int(threshold))
    else:
        if features is None:
            raise ValueError(f"validation grouping {spec!r} needs the ImageNet features: prepare the data through "
                             "TrainConfig.split_args() (train.py, the evaluation and the benchmarks do)")
        first, second = cosine_pairs(features(images()), threshold)
    return linked_groups(len(phashes), first, second)


def grouped_stratified_val(keys: list[tuple], groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: whole groups, taken in a seeded random order while no stratum (`keys`)
    exceeds round(n × fraction) of its images. A group too large for the room left stays in training, so each
    stratum gets at most its share (small groups fill it)."""
    strata = {k: i for i, k in enumerate(sorted(set(keys), key=repr))}
    stratum = np.array([strata[k] for k in keys], np.int64)
    room = np.round(np.bincount(stratum, minlength=len(strata)) * val_fraction)
    members: dict[int, list[int]] = defaultdict(list)
    for row, group in enumerate(np.asarray(groups).tolist()):
        members[group].append(row)
    val = np.zeros(len(keys), bool)
    for group in np.random.default_rng(seed).permutation(sorted(members)).tolist():
        need = np.bincount(stratum[members[group]], minlength=len(strata))
        if np.all(need <= room):
            room -= need
            val[members[group]] = True
    return val
