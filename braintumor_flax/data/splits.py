"""What a prepared dataset is: records, splits and their defaults, without the machinery that makes them.

Light on purpose (numpy only): the GPU training command reads packed splits into these on a machine that has
none of the deduplication libraries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# The validation split's size and the seed of its stratified draw (also training's seed by default): a
# checkpoint records both, so evaluation re-creates exactly the split training held out.
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Record:
    path: Path
    dataset: str  # "brisc2025" | "kaggle" | "folder"
    split: str  # "train" | "test" | "predict"
    tumor: str | None
    plane: str | None


@dataclass(frozen=True)
class Split:
    name: str
    images: np.ndarray  # uint8 [N, S, S, 3]
    tumor: np.ndarray  # int32 [N], index into TUMOR_CLASSES, -1 unknown
    plane: np.ndarray  # int32 [N], index into PLANES, -1 unknown
    dataset: np.ndarray  # str [N]
    paths: list[str]  # relative to the data directory
    content_hash: list[str]  # sha1 of the file bytes

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> Split:
        """Rows selected by a boolean mask or an index array."""
        idx = np.arange(len(self))[np.asarray(mask)]
        return Split(self.name, self.images[idx], self.tumor[idx], self.plane[idx], self.dataset[idx],
                     [self.paths[i] for i in idx], [self.content_hash[i] for i in idx])

    def stratified_subset(self, limit: int | None, seed: int = DEFAULT_SEED) -> Split:
        """At most `limit` rows, the same share from each tumour class (seeded): for quick runs and smoke
        tests. The first rows would not do: a split is ordered by class."""
        return self if not limit or len(self) <= limit else self.subset(stratified_rows(self.tumor, limit, seed))


def stratified_rows(labels: np.ndarray, limit: int | None, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Sorted indices of at most `limit` rows, the same number from each label (seeded); all rows without a
    limit or when there are no more than `limit`."""
    if not limit or len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(1, limit // len(classes))
    keep = [i for c in classes for i in rng.permutation(np.flatnonzero(labels == c))[:per_class].tolist()]
    return np.sort(np.asarray(keep[:limit], np.int64))


@dataclass
class PreparedData:
    splits: dict[str, Split]
    report: dict
    dataset_hash: str
    image_size: int = 128
    records: list[Record] = field(default_factory=list, repr=False)

    def training_from(self, datasets: tuple[str, ...] | list[str]) -> PreparedData:
        """The same data with the train and validation splits limited to `datasets` (all when empty), the test
        splits untouched: training on one source and testing on another (leave-one-dataset-out)."""
        if not datasets:
            return self
        unknown = set(datasets) - {d for s in self.splits.values() for d in s.dataset}
        if unknown:
            raise ValueError(f"no images from {sorted(unknown)} in this data")
        splits = {name: split.subset(np.isin(split.dataset, list(datasets))) if name in ("train", "val") else split
                  for name, split in self.splits.items()}
        return replace(self, splits=splits)
