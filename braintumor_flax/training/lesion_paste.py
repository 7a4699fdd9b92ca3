"""Synthetic tumour slices for the head refit: a BRISC tumour, cut out along its expert mask and pasted into a
no-tumour training slice (`TrainConfig.head_refit_pastes`).

Why: most tumours the served model misses are called "no tumour", many on slices whose look (contrast, scanner)
the no-tumour training slices share, and the classifier answers mostly from outside the tumour (docs/experiments/
is-it-the-map-or-the-model.md). A slice with that look *and* a tumour is evidence against the shortcut "this look
means no tumour".

How: for each no-tumour slice, a donor of one of the three tumour classes (drawn uniformly) from the slice's
plane (its label, else the view model's answer); the donor's tumour goes where it lies in its own head (the two
heads' bounding boxes aligned, so a pituitary tumour stays at the sella), mirrored at random; its grey levels
are mapped from the donor's tissue (mean and spread, outside the tumour) onto the recipient's; its edge is
feathered. The new slice takes the donor's class. Everything is seeded, so a rerun gives the same slices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from braintumor_flax.data.masks import NO_TUMOR
from braintumor_flax.labels import TUMOR_CLASSES

TUMOUR_LABELS = tuple(i for i in range(len(TUMOR_CLASSES)) if i != NO_TUMOR)
TISSUE_LEVEL = 20  # grey level (0-255) above which a pixel counts as head: the padding and the air lie below


@dataclasses.dataclass(frozen=True)
class PasteSettings:
    min_area: int = 30  # donor masks smaller than this (model-grid pixels) are not used
    inside: float = 0.8  # share of the pasted tumour that must land on the recipient's head
    feather: float = 1.0  # Gaussian sigma, in pixels, of the pasted edge
    tries: int = 8  # donors tried per pasted slice before that copy is skipped


def head_box(grey: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom and right exclusive, of the pixels above TISSUE_LEVEL; None if fewer
    than 8 rows or columns hold any."""
    rows = np.flatnonzero((grey > TISSUE_LEVEL).any(axis=1))
    cols = np.flatnonzero((grey > TISSUE_LEVEL).any(axis=0))
    if len(rows) < 8 or len(cols) < 8:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _tissue_stats(grey: np.ndarray, exclude: np.ndarray | None = None) -> tuple[float, float]:
    tissue = grey > TISSUE_LEVEL
    if exclude is not None:
        tissue &= ~exclude
    values = grey[tissue] if tissue.any() else grey.ravel()
    return float(values.mean()), max(float(values.std()), 1.0)


def paste_one(recipient: np.ndarray, donor: np.ndarray, donor_mask: np.ndarray, *, mirror: bool,
              settings: PasteSettings = PasteSettings()) -> np.ndarray | None:
    """uint8 [S, S, 3] `recipient` with `donor`'s tumour (bool [S, S] `donor_mask`) pasted in, or None when the
    heads cannot be found or the tumour would fall mostly off the recipient's head."""
    r_grey = recipient.astype(np.float32).mean(axis=-1)
    d_grey = donor.astype(np.float32).mean(axis=-1)
    if mirror:
        d_grey, donor_mask = d_grey[:, ::-1], donor_mask[:, ::-1]
    r_box, d_box = head_box(r_grey), head_box(d_grey)
    if r_box is None or d_box is None:
        return None
    # Output pixel (y, x) reads the donor at d_top + (y - r_top) * scale_y: the recipient's head box onto the donor's.
    scale = np.array([(d_box[1] - d_box[0]) / (r_box[1] - r_box[0]), (d_box[3] - d_box[2]) / (r_box[3] - r_box[2])])
    offset = np.array([d_box[0] - r_box[0] * scale[0], d_box[2] - r_box[2] * scale[1]])

    def warp(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(a.astype(np.float32), scale, offset=offset, output_shape=r_grey.shape,
                                        order=1, mode="constant", cval=0.0)

    mask = warp(donor_mask) >= 0.5
    area = int(mask.sum())
    if area < settings.min_area // 2 or (mask & (r_grey > TISSUE_LEVEL)).sum() < settings.inside * area:
        return None
    d_mean, d_std = _tissue_stats(d_grey, donor_mask)
    r_mean, r_std = _tissue_stats(r_grey)
    tumour = r_mean + (warp(d_grey) - d_mean) * (r_std / d_std)
    alpha = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), settings.feather), 0.0, 1.0)
    delta = alpha * (np.clip(tumour, 0.0, 255.0) - r_grey)  # the same change in every channel
    return np.clip(np.round(recipient.astype(np.float32) + delta[..., None]), 0, 255).astype(np.uint8)


def paste_tumours(images: np.ndarray, labels: np.ndarray, planes: np.ndarray, masks: np.ndarray, known: np.ndarray,
                  recipient_planes: np.ndarray, *, copies: int, seed: int,
                  settings: PasteSettings = PasteSettings()) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [M, S, S, 3] pasted slices, int32 [M] their tumour labels), at most `copies` per no-tumour slice.

    `images` [N, S, S, 3], `labels` [N] (tumour class, -1 unknown), `planes` [N] (-1 unknown), `masks` bool
    [N, S, S] with `known` [N] (`data.masks.split_masks`); `recipient_planes` [N]: the plane each no-tumour slice
    is taken to be in. Donors: tumour slices with a known plane and a mask of at least `min_area` pixels."""
    area = masks.reshape(len(masks), -1).sum(axis=1)
    donors = {(c, p): np.flatnonzero(known & (labels == c) & (planes == p) & (area >= settings.min_area))
              for c in TUMOUR_LABELS for p in range(3)}
    out_images: list[np.ndarray] = []
    out_labels: list[int] = []
    for r in np.flatnonzero(labels == NO_TUMOR):
        plane = int(recipient_planes[r])
        classes = [c for c in TUMOUR_LABELS if len(donors[c, plane])]
        for copy in range(copies):
            rng = np.random.default_rng([seed, int(r), copy])
            for _ in range(settings.tries if classes else 0):
                c = classes[rng.integers(len(classes))]
                pool = donors[c, plane]
                d = int(pool[rng.integers(len(pool))])
                pasted = paste_one(images[r], images[d], masks[d], mirror=bool(rng.integers(2)), settings=settings)
                if pasted is not None:
                    out_images.append(pasted)
                    out_labels.append(c)
                    break
    size = images.shape[1:]
    return (np.stack(out_images) if out_images else np.zeros((0, *size), np.uint8),
            np.asarray(out_labels, np.int32))
