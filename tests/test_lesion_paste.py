"""Tumours pasted into no-tumour slices (training/lesion_paste.py): geometry, intensities, donors, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from braintumor_flax.data.imageio import to_model_input
from braintumor_flax.data.masks import mask_path_for, mask_to_grid, read_mask
from braintumor_flax.labels import TUMOR_CLASSES
from braintumor_flax.training.lesion_paste import head_box, paste_one, paste_tumours

S = 64
GLIOMA, MENINGIOMA, NO_TUMOR, PITUITARY = (TUMOR_CLASSES.index(c) for c in ("glioma", "meningioma", "no_tumor",
                                                                             "pituitary"))
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRISC_TRAIN = DATA / "brisc2025" / "classification_task" / "train"


def _head(top: int, bottom: int, left: int, right: int, level: int) -> np.ndarray:
    image = np.zeros((S, S, 3), np.uint8)
    image[top:bottom, left:right] = level
    return image


def test_the_tumour_lands_where_it_lies_in_its_own_head_with_the_recipients_grey_levels():
    # Donor: a head filling rows/cols 0-32 (tissue 100), a bright 4 x 4 tumour at its centre-right.
    donor = _head(0, 32, 0, 32, 100)
    donor_mask = np.zeros((S, S), bool)
    donor_mask[14:18, 20:24] = True
    donor[donor_mask] = 200
    # Recipient: a head twice as large, offset, with darker tissue of a different spread.
    rng = np.random.default_rng(0)
    recipient = _head(16, 80 - 16, 8, 72 - 8, 0)
    recipient[16:48, 8:56] = rng.integers(40, 80, (32, 48, 1))
    assert head_box(recipient.mean(axis=-1)) == (16, 48, 8, 56) and head_box(np.zeros((S, S))) is None
    out = paste_one(recipient, donor, donor_mask, mirror=False)
    changed = np.abs(out.astype(int) - recipient.astype(int)).max(axis=-1) > 0
    ys, xs = np.nonzero(changed)
    # Box-aligned: donor rows 14-18 of 32 → recipient rows 16 + 14..18 (same height); cols 20-24 of 32 → 8 + 30..36.
    assert 28 <= ys.mean() <= 34 and 37 <= xs.mean() <= 44
    assert not changed[:16].any() and not changed[:, :8].any()  # nothing outside the recipient's head box
    # Brighter than the recipient's tissue by about the donor's contrast in recipient units.
    assert out[31, 41, 0] > recipient[16:48, 8:56].max()
    assert (out[..., 0] == out[..., 1]).all()  # the same change in every channel
    mirrored = paste_one(recipient, donor, donor_mask, mirror=True)
    assert np.nonzero(np.abs(mirrored.astype(int) - recipient.astype(int)).max(axis=-1))[1].mean() < S / 2
    # A tumour that would fall mostly off the recipient's head is refused.
    ring = _head(0, S, 0, S, 0)
    ring[:, :6] = 100
    ring[:, -6:] = 100
    assert paste_one(ring, donor, donor_mask, mirror=False) is None


def test_donors_are_drawn_from_the_recipients_plane_and_give_their_class_reproducibly():
    n = 12
    images = np.stack([_head(4, 60, 4, 60, 90) for _ in range(n)])
    masks = np.zeros((n, S, S), bool)
    masks[:, 20:30, 20:30] = True
    labels = np.array([NO_TUMOR, NO_TUMOR, NO_TUMOR, GLIOMA, GLIOMA, MENINGIOMA, MENINGIOMA, PITUITARY, PITUITARY,
                       MENINGIOMA, NO_TUMOR, -1])
    planes = np.array([0, 1, -1, 0, 1, 0, 1, 2, 0, 1, 2, -1])
    masks[labels == NO_TUMOR] = False
    for i in np.flatnonzero(labels != NO_TUMOR):
        images[i][masks[i]] = 150 + 10 * i  # every donor's tumour its own grey level
    known = labels >= 0
    known[9] = False  # a meningioma without its mask is no donor
    recipient_planes = np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0])  # slice 2 taken as coronal (view model)
    out, out_labels = paste_tumours(images, labels, planes, masks, known, recipient_planes, copies=3, seed=7)
    assert out.shape == (12, S, S, 3) and set(out_labels) <= {GLIOMA, MENINGIOMA, PITUITARY}
    # The sagittal recipient (10, the last three) has one donor of its plane: the pituitary slice 7.
    assert list(out_labels[9:]) == [PITUITARY] * 3
    again, again_labels = paste_tumours(images, labels, planes, masks, known, recipient_planes, copies=3, seed=7)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(out_labels, again_labels)
    other, _ = paste_tumours(images, labels, planes, masks, known, recipient_planes, copies=3, seed=8)
    assert not np.array_equal(out, other)
    no_donor, no_labels = paste_tumours(images, labels, np.full(n, -1), masks, known, recipient_planes, copies=2,
                                        seed=0)
    assert no_donor.shape == (0, S, S, 3) and len(no_labels) == 0


@pytest.mark.skipif(not BRISC_TRAIN.is_dir(), reason="shared BRISC data not present")
def test_a_real_meningioma_pasted_into_a_real_no_tumour_slice_stays_inside_the_head():
    from PIL import Image

    def grid(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            return to_model_input(np.asarray(im.convert("RGB")), 128)

    donor_path = next(p for p in sorted((BRISC_TRAIN / "meningioma").glob("*_ax_*.jpg")))
    recipient_path = next(p for p in sorted((BRISC_TRAIN / "no_tumor").glob("*_ax_*.jpg")))
    donor, recipient = grid(donor_path), grid(recipient_path)
    mask = mask_to_grid(read_mask(mask_path_for(donor_path)), 128)
    out = paste_one(recipient, donor, mask, mirror=False)
    assert out is not None and out.dtype == np.uint8 and out.shape == recipient.shape
    changed = np.abs(out.astype(int) - recipient.astype(int)).max(axis=-1) > 2
    assert 0.3 * mask.sum() <= changed.sum() <= 3 * mask.sum()
    assert (recipient.mean(axis=-1)[changed] > 20).mean() > 0.8  # on the head, not on the background
