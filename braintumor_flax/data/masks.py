"""Tumour masks (BRISC 2025 `segmentation_task`): finding them, and mapping them between an image's own pixel
grid and the model's square input grid.

The model sees an image padded to a centred black square and resized (`imageio.to_model_input`); a mask goes
onto that grid through the very same function, and a predicted mask comes back by the inverse map (resize the
square to max(h, w), crop the padding), so areas and Dice are measured on the image's own pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from braintumor_flax.data.imageio import to_model_input
from braintumor_flax.data.splits import Split
from braintumor_flax.labels import TUMOR_CLASSES

NO_TUMOR = TUMOR_CLASSES.index("no_tumor")
MASK_THRESHOLD = 128  # the masks are resized nearest-neighbour: threshold at 128 (data README)


def mask_path_for(image_path: str | Path) -> Path:
    """.../classification_task/<split>/<class>/<stem>.jpg → .../segmentation_task/<split>/masks/<stem>.png"""
    image_path = Path(image_path)
    split_dir = image_path.parent.parent
    return split_dir.parent.parent / "segmentation_task" / split_dir.name / "masks" / f"{image_path.stem}.png"


def read_mask(path: str | Path) -> np.ndarray:
    """bool [H, W]: the tumour pixels of a mask file."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) >= MASK_THRESHOLD


def mask_to_grid(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [H, W] on the image's pixels → bool [size, size] on the model's input grid (same geometry as pixels)."""
    grey = np.where(mask, 255, 0).astype(np.uint8)
    return to_model_input(grey, size)[..., 0] >= MASK_THRESHOLD


def grid_to_image(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """float [S, S] on the model grid → float [height, width] on the image's own pixels (inverse of the
    pad-to-square resize: bilinear up to the square's side, then the padding cropped off)."""
    side = max(height, width)
    square = np.asarray(Image.fromarray(np.asarray(prob, np.float32), mode="F").resize((side, side),
                                                                                      Image.Resampling.BILINEAR))
    top, left = (side - height) // 2, (side - width) // 2
    return square[top:top + height, left:left + width]


def mask_on_image(prob: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """bool [height, width]: the segmenter's mask on an image's own pixels (what the app outlines and measures,
    and what the evaluation scores)."""
    return grid_to_image(prob, height, width) >= threshold


def outline_contradicts(tumour_class: str | None, area_px: int | None) -> bool:
    """The classifier answers "no tumour" while the segmenter outlines a region on the image: the app warns
    (`serve.service.SliceResult.models_disagree`), and `evaluation.segmentation` measures how often such a slice is
    a tumour. One rule for both."""
    return tumour_class == "no_tumor" and bool(area_px)


def split_masks(split: Split, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(bool [N, S, S] masks on the model grid, bool [N] known) for a split's rows.

    Known: a BRISC tumour image with its mask file, or any no-tumour image (its mask is empty). Kaggle tumour
    images have no masks and stay unknown.
    """
    size = split.images.shape[1]
    masks = np.zeros((len(split), size, size), bool)
    known = np.zeros(len(split), bool)
    for i, rel in enumerate(split.paths):
        if split.tumor[i] == NO_TUMOR:
            known[i] = True
            continue
        if split.dataset[i] != "brisc2025":
            continue
        path = mask_path_for(Path(data_dir) / rel)
        if path.is_file():
            masks[i] = mask_to_grid(read_mask(path), size)
            known[i] = True
    return masks, known


def rle_encode(mask: np.ndarray) -> dict[str, list[int]]:
    """bool [H, W] → uncompressed COCO run-length encoding: {"size": [H, W], "counts": [...]}, runs in column-major
    order starting with a (possibly empty) run of background (pycocotools' `frPyObjects` reads it)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, list[int]]) -> np.ndarray:
    """The inverse of `rle_encode`."""
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    if flat.size != h * w:
        raise ValueError(f"run lengths cover {flat.size} pixels, not {h} x {w}")
    return flat.reshape((h, w), order="F")
