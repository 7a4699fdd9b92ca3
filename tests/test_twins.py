"""The twin finder on real pairs of ../shared/data (the copies the pHash check missed, and neighbouring slices
of one scan that must stay apart) and on copies generated from a real slice."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from braintumor_flax.data import twins
from braintumor_flax.data.imageio import decode_image, to_model_input

BRISC = "brisc2025/classification_task"
KAGGLE = "kaggle-brain-tumor-mri"
# (first, second, kind): the same picture, as found in the datasets.
SAME = [
    (f"{BRISC}/test/pituitary/brisc2025_test_00846_pi_co_t1.jpg",
     f"{BRISC}/train/pituitary/brisc2025_train_04169_pi_co_t1.jpg", "mirror"),
    (f"{KAGGLE}/Testing/pituitary/Te-pi_0045.jpg", f"{KAGGLE}/Training/pituitary/Tr-pi_1129.jpg", "mirror"),
    (f"{KAGGLE}/Testing/notumor/Te-no_0228.jpg", f"{KAGGLE}/Training/notumor/Tr-no_1436.jpg", "mirror"),
    (f"{KAGGLE}/Testing/notumor/Te-no_0183.jpg", f"{KAGGLE}/Training/notumor/Tr-no_0713.jpg", "identity"),
    (f"{BRISC}/test/meningioma/brisc2025_test_00389_me_ax_t1.jpg", f"{KAGGLE}/Training/meningioma/Tr-me_0070.jpg",
     "mirror"),  # BRISC's smoother processing, and mirrored
]
# Consecutive BRISC files: neighbouring slices of one scan, alike but not the same picture.
NEIGHBOURS = [
    (f"{BRISC}/train/meningioma/brisc2025_train_01329_me_ax_t1.jpg",
     f"{BRISC}/train/meningioma/brisc2025_train_01330_me_ax_t1.jpg"),
    (f"{BRISC}/test/glioma/brisc2025_test_00147_gl_co_t1.jpg",
     f"{BRISC}/test/glioma/brisc2025_test_00148_gl_co_t1.jpg"),
    (f"{BRISC}/train/meningioma/brisc2025_train_01539_me_ax_t1.jpg",
     f"{BRISC}/train/meningioma/brisc2025_train_01540_me_ax_t1.jpg"),
]


def _load(root: Path, rel: str, size: int = 128) -> np.ndarray:
    path = root / rel
    if not path.exists():
        pytest.skip(f"{rel} not in the data")
    return to_model_input(decode_image(path), size)


@pytest.mark.parametrize(("a", "b", "variant"), SAME, ids=[Path(a).stem for a, _, _ in SAME])
def test_real_copies_are_twins(real_data_dir, a, b, variant):
    score, found = twins.pair_score(_load(real_data_dir, a), _load(real_data_dir, b))
    assert score >= twins.TWIN_THRESHOLD and twins.VARIANT_NAMES[found] == variant, (score, found)


@pytest.mark.parametrize(("a", "b"), NEIGHBOURS, ids=[Path(a).stem for a, _ in NEIGHBOURS])
def test_neighbouring_slices_are_not_twins(real_data_dir, a, b):
    score, _ = twins.pair_score(_load(real_data_dir, a), _load(real_data_dir, b))
    assert 0.8 < score < twins.TWIN_THRESHOLD, score  # alike, yet below the threshold


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _pad(im: Image.Image, px: int) -> Image.Image:
    out = Image.new("RGB", (im.width + 2 * px, im.height + px), 0)
    out.paste(im, (px, 0))
    return out


COPIES = {
    "mirror": (lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "mirror"),
    "up-down": (lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM), "mirror+rot180"),
    "rot90": (lambda im: im.transpose(Image.Transpose.ROTATE_90), "rot90"),
    "jpeg q40": (lambda im: _jpeg(im, 40), "identity"),
    "half size": (lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR), "identity"),
    "blur": (lambda im: im.filter(ImageFilter.GaussianBlur(1.2)), "identity"),
    "sharpen": (lambda im: im.filter(ImageFilter.UnsharpMask(2, 150)), "identity"),
    "crop 4%": (lambda im: im.crop((im.width // 25, 0, im.width, im.height - im.height // 25)), "identity"),
    "padding": (lambda im: _pad(im, im.width // 10), "identity"),
    "darker, more contrast": (lambda im: ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(0.7))
                              .enhance(1.5), "identity"),
    "gamma 0.6": (lambda im: im.point(lambda v: int(255 * (v / 255) ** 0.6)), "identity"),
}


@pytest.mark.parametrize("name", list(COPIES))
def test_generated_copies_are_twins(real_data_dir, name):
    path = real_data_dir / f"{BRISC}/test/glioma/brisc2025_test_00002_gl_ax_t1.jpg"
    if not path.exists():
        pytest.skip("data missing")
    original = Image.open(path).convert("RGB")
    transform, variant = COPIES[name]
    copy = transform(original)
    score, found = twins.pair_score(to_model_input(np.asarray(original), 128), to_model_input(np.asarray(copy), 128))
    assert score >= twins.TWIN_THRESHOLD and twins.VARIANT_NAMES[found] == variant, (score, found)


def test_find_twins_over_a_collection(real_data_dir):
    """Planted copies among real slices of several scans: each found once, with the variant that maps it, and
    nothing else linked."""
    files = sorted((real_data_dir / f"{BRISC}/test/pituitary").glob("*.jpg"))[::15][:16]
    if len(files) < 16:
        pytest.skip("data missing")
    images = [to_model_input(decode_image(p), 128) for p in files]
    planted = {0: (images[0][:, ::-1], 4), 5: (np.rot90(images[5], 1), 1), 9: (_blurred(images[9]), 0)}
    images += [np.ascontiguousarray(copy) for copy, _ in planted.values()]
    views = np.stack([twins.normalised_view(im) for im in images])
    found = twins.find_twins(views).twins()
    got = {(int(a), int(b)): int(v) for a, b, v in zip(found.first, found.second, found.variant, strict=True)}
    assert got == {(row, 16 + k): variant for k, (row, (_, variant)) in enumerate(planted.items())}


def _blurred(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)))


def test_collection_twins_is_cached(tmp_path, real_data_dir):
    files = sorted((real_data_dir / f"{KAGGLE}/Testing/notumor").glob("*.jpg"))[:6]
    if len(files) < 6:
        pytest.skip("data missing")
    images = np.stack([to_model_input(decode_image(p), 128) for p in files] + [
        np.ascontiguousarray(to_model_input(decode_image(files[2]), 128)[:, ::-1])])
    calls = []

    def load() -> np.ndarray:
        calls.append(1)
        return images

    hashes = [f"h{k}" for k in range(len(images))]
    first = twins.collection_twins(load, hashes, cache=tmp_path)
    second = twins.collection_twins(load, hashes, cache=tmp_path)
    assert len(calls) == 1 and list(tmp_path.glob("*.npz"))
    assert (2, 6) in set(zip(first.pairs.first.tolist(), first.pairs.second.tolist(), strict=True))
    np.testing.assert_array_equal(first.pairs.score, second.pairs.score)
    assert first.kind(0, exact=False) == "mirrored"
