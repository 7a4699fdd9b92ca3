"""Tumour segmentation: mask geometry on real BRISC files, and a decoder trained, saved, loaded and served."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from braintumor_flax.data.imageio import to_model_input
from braintumor_flax.data.masks import (
    grid_to_image,
    mask_path_for,
    mask_to_grid,
    read_mask,
    rle_decode,
    rle_encode,
    split_masks,
)
from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.evaluation.segmentation import cam_against_mask, disagreement, evaluate_segmentation
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.labels import TUMOR_CLASSES
from braintumor_flax.models.forward import Forward
from braintumor_flax.serve.overlay import OUTLINE_RGB, draw_outline
from braintumor_flax.training.segmentation import SegTrainConfig, grid_dice, train_segmenter

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BRISC_TRAIN = DATA / "brisc2025" / "classification_task" / "train"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.skipif(not BRISC_TRAIN.is_dir(), reason="shared BRISC data not present")
def test_real_masks_map_to_the_model_grid_and_back():
    images = sorted((BRISC_TRAIN / "meningioma").glob("*.jpg"))[:4] + sorted((BRISC_TRAIN / "glioma").glob("*.jpg"))[:4]
    assert not mask_path_for(sorted((BRISC_TRAIN / "no_tumor").glob("*.jpg"))[0]).is_file()  # none for no tumour
    for image_path in images:
        mask = read_mask(mask_path_for(image_path))
        assert mask.any() and mask.shape == Image.open(image_path).size[::-1]
        # Square, and cut to a non-square shape (the padding must be undone where it was put).
        for native in (mask, mask[:, 30:-10]):
            grid = mask_to_grid(native, 128)
            back = grid_to_image(grid.astype(np.float32), *native.shape) >= 0.5
            assert back.shape == native.shape and _dice(back, native) > 0.9
    # Pixels and mask take the same geometry: bright pixels drawn where the mask is land where the mask lands.
    native = mask[:, 30:-10]
    drawn = to_model_input(np.where(native, 255, 0).astype(np.uint8), 128)[..., 0] >= 128
    np.testing.assert_array_equal(drawn, mask_to_grid(native, 128))


@pytest.mark.skipif(not BRISC_TRAIN.is_dir(), reason="shared BRISC data not present")
def test_augmented_masks_move_with_their_real_slices():
    import jax

    from braintumor_flax.training.augment import PixelAugment, augment_pixels, augment_pixels_and_masks

    paths = sorted((BRISC_TRAIN / "glioma").glob("*.jpg"))[:3] + sorted((BRISC_TRAIN / "pituitary").glob("*.jpg"))[:3]
    masks = np.stack([mask_to_grid(read_mask(mask_path_for(p)), 128) for p in paths])
    images = np.stack([to_model_input(np.asarray(Image.open(p).convert("RGB")), 128) for p in paths])
    key = jax.random.key(3)
    aug = PixelAugment()
    moved, moved_masks = augment_pixels_and_masks(key, images, masks, aug)
    # The slice is augmented exactly as the classifier's augmentation would (same key, same slice) ...
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(augment_pixels(key, images, aug)))
    moved_masks = np.asarray(moved_masks)
    assert moved_masks.dtype == bool and all(_dice(a, b) < 0.95 for a, b in zip(moved_masks, masks, strict=True))
    # ... and the mask lands where the slice's pixels go: the mask drawn as a slice, with the photometric changes
    # off, is moved onto the moved mask.
    geometric = PixelAugment(brightness=0.0, contrast=0.0, gamma=0.0, curve=0.0, blur_p=0.0, noise_std=0.0)
    drawn = np.repeat(masks[..., None] * np.uint8(255), 3, axis=-1)
    drawn_moved, geometric_masks = augment_pixels_and_masks(key, drawn, masks, geometric)
    for a, b in zip(np.asarray(drawn_moved)[..., 0] >= 127.5, np.asarray(geometric_masks), strict=True):
        assert b.any() and _dice(a, b) > 0.97


SIZE = 32


def _write_brisc_like(root: Path, split: str, n: int, seed: int) -> Split:
    """Generated slices and masks in BRISC's layout: a bright square is the tumour; a quarter have none."""
    rng = np.random.default_rng(seed)
    images, tumor, paths = [], [], []
    for i in range(n):
        image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        label = "no_tumor" if i % 4 == 0 else "glioma"
        if label != "no_tumor":
            side, top, left = rng.integers(5, 12), rng.integers(0, SIZE - 12), rng.integers(0, SIZE - 12)
            image[top:top + side, left:left + side] = 220
            mask[top:top + side, left:left + side] = 255
        stem = f"brisc2025_{split}_{i:05d}_{label[:2]}_ax_t1"
        image_path = root / "brisc2025" / "classification_task" / split / label / f"{stem}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_path)
        if label != "no_tumor":
            mask_file = mask_path_for(image_path)
            mask_file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_file)
        images.append(image)
        tumor.append(TUMOR_CLASSES.index(label))
        paths.append(str(image_path.relative_to(root)))
    hashes = [hashlib.sha1(p.encode()).hexdigest() for p in paths]
    return Split(split, np.stack(images), np.array(tumor, np.int32), np.zeros(n, np.int32),
                 np.array(["brisc2025"] * n), paths, hashes)


# The light decoder over blocks 1-3 (any trunk), the one that also reads a shared trunk's blocks 4-5 and
# refines at full resolution from the slice itself, and that one with its own trainable pixel encoder.
@pytest.mark.parametrize("variant", ["light", "deep", "deep_pixel"])
def test_segmenter_learns_saves_loads_and_serves(tmp_path, tiny_pipeline_factory, variant):
    deep = variant != "light"
    pixel_widths = (4, 8, 8) if variant == "deep_pixel" else ()
    data = PreparedData({"train": _write_brisc_like(tmp_path, "train", 96, 0),
                         "val": _write_brisc_like(tmp_path, "val", 24, 1)}, report={}, dataset_hash="gen",
                        image_size=SIZE)
    masks, known = split_masks(data.splits["val"], tmp_path)
    assert known.all() and masks[0].sum() == 0 and masks[1].sum() > 0
    pipeline = tiny_pipeline_factory(image_size=SIZE, width_divisor=16)
    if deep:  # both models hold the same whole VGG here: a shared trunk
        pipeline.info = dataclasses.replace(pipeline.info, shared_trunk=True)
    config = SegTrainConfig(epochs=12, batch_size=8, learning_rate=3e-3, warmup_epochs=0.2, deep=deep, full_res=deep,
                            pixel_widths=pixel_widths)
    segmenter, record = train_segmenter(pipeline.view_model.vgg, data, tmp_path, config, log=lambda _: None)
    history = record["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_dice_tumour"] for h in history) > 0.6  # random-VGG features still locate a bright square

    assert segmenter.config.deep == deep and segmenter.config.threshold == record["threshold"]
    assert set(segmenter.config.inputs) >= {"block4_conv3", "block5_conv3", "image"} if deep else True
    assert segmenter.config.pixel_widths == pixel_widths and hasattr(segmenter, "pixel4") == bool(pixel_widths)

    pipeline.attach_segmenter(segmenter, record)
    pipeline.save_pretrained(tmp_path / "ckpt")
    loaded = BrainTumorPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.segmenter is not None and loaded.segmentation_record["kept_epoch"] == record["kept_epoch"]
    assert loaded.segmenter.config == segmenter.config  # the chosen threshold, the deep and full-res levels
    # Stored in float16, the trunk is the same blocks 1-3 for the decoder (its digest is taken at that precision).
    loaded.storage_dtype = "float16"
    loaded.save_pretrained(tmp_path / "ckpt16")
    loaded.storage_dtype = "float32"
    assert BrainTumorPipeline.from_pretrained(tmp_path / "ckpt16").segmenter is not None
    forward = Forward.from_pipeline(loaded, batch_size=8)
    val = data.splits["val"]
    served = forward(val.images, segment=True)
    plain = forward(val.images)
    np.testing.assert_array_equal(served.tumor_logits, plain.tumor_logits)  # the mask costs the answer nothing
    np.testing.assert_allclose(grid_dice(served.mask_prob, masks, 0.5)[masks.any(axis=(1, 2))].mean(),
                               history[record["kept_epoch"] - 1]["val_dice_tumour"], atol=0.05)
    dice = grid_dice(served.mask_prob, masks, segmenter.config.threshold)
    assert abs(dice[masks.any(axis=(1, 2))].mean() - record["val_dice_at_threshold"]) < 0.05

    # The evaluation measures on each image's own pixels; here they are the model grid, so it must agree exactly.
    test_data = PreparedData({"test_brisc2025": val}, report={}, dataset_hash="gen", image_size=SIZE)
    results, per_slice = evaluate_segmentation(loaded, test_data, tmp_path, n_resamples=50)
    summary = results["test_sets"]["test_brisc2025"]
    tumour = masks.any(axis=(1, 2))
    assert summary["dice"]["n"] == tumour.sum() and summary["no_tumour"]["n"] == (~tumour).sum()
    assert summary["dice"]["mean"] == pytest.approx(dice[tumour].mean(), abs=1e-9)
    assert summary["dice"]["ci95"][0] <= summary["dice"]["mean"] <= summary["dice"]["ci95"][1]
    assert 0 <= summary["gradcam"]["pointing_game"]["mean"] <= 1 and 0 < summary["gradcam"]["random_baseline"] < 1
    assert len(per_slice["test_brisc2025"]) == len(val)
    # The app's disagreement warning, counted from the same outputs the app would show.
    answered_none = served.tumor_logits.argmax(axis=1) == TUMOR_CLASSES.index("no_tumor")
    outlined = np.array([r["predicted_area_px"] > 0 for r in per_slice["test_brisc2025"]])
    assert summary["disagreement"]["answered_no_tumour"] == answered_none.sum()
    assert summary["disagreement"]["flagged"] == (answered_none & outlined).sum()

    other = tiny_pipeline_factory(image_size=SIZE, width_divisor=16, seed=5)  # other VGG blocks 1-3
    with pytest.raises(ValueError, match="other VGG blocks"):
        other.attach_segmenter(segmenter, record)
    if deep:  # the same blocks 1-3 but other blocks 4-5: refused too
        retrained = tiny_pipeline_factory(image_size=SIZE, width_divisor=16)
        kernel = retrained.view_model.vgg.block4_conv1.kernel
        kernel.set_value(kernel.get_value() * 1.5)
        with pytest.raises(ValueError, match="other VGG blocks 1-5"):
            retrained.attach_segmenter(segmenter, record)
        two_trunks = tiny_pipeline_factory(image_size=SIZE, width_divisor=16)  # not declared a shared trunk
        two_trunks.attach_segmenter(segmenter, record)
        with pytest.raises(ValueError, match="one shared trunk"):
            Forward.from_pipeline(two_trunks)


def test_a_pixel_encoder_needs_three_widths_and_the_full_resolution_level():
    from braintumor_flax.models.segmentation import SegmentationConfig

    with pytest.raises(ValueError, match="needs full_res"):
        SegmentationConfig(image_size=SIZE, full_res=False, pixel_widths=(4, 8, 8))
    with pytest.raises(ValueError, match="3 widths"):
        SegmentationConfig(image_size=SIZE, full_res=True, pixel_widths=(4, 8))
    config = SegmentationConfig(image_size=SIZE, full_res=True, pixel_widths=(4, 8, 8))
    assert SegmentationConfig.from_dict(config.to_dict()) == config  # as config.json stores it (lists)


def test_a_map_is_scored_against_the_mask_after_upsampling():
    mask = np.zeros((32, 32), bool)
    mask[16:, 16:] = True  # the lower-right quarter
    cam = np.zeros((4, 4), np.float32)
    cam[3, 3] = 1.0
    assert cam_against_mask(cam, mask)[0] and cam_against_mask(cam, mask)[1] > 0.9
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0  # the opposite corner: its peak outside, almost none of its energy inside
    peak, energy = cam_against_mask(cam, mask)
    assert not peak and energy < 0.05
    assert cam_against_mask(np.ones((4, 4), np.float32), mask)[1] == pytest.approx(0.25)  # a uniform map
    assert cam_against_mask(np.zeros((4, 4), np.float32), mask) == (False, 0.0)  # a map that points nowhere


def test_disagreement_counts_flagged_no_tumour_answers():
    def row(truth: str, answer: str, area: int) -> dict:
        return {"tumor": truth, "predicted_class": answer, "predicted_area_px": area}

    rows = [row("meningioma", "no_tumor", 300), row("no_tumor", "no_tumor", 12), row("glioma", "no_tumor", 0),
            row("no_tumor", "no_tumor", 0), row("glioma", "glioma", 500), row("no_tumor", "pituitary", 40)]
    d = disagreement(rows)
    assert (d["answered_no_tumour"], d["flagged"], d["flagged_that_are_tumours"], d["unflagged_that_are_tumours"]) == (
        4, 2, 1, 1)
    assert d["share_of_flagged_that_are_tumours"] == 0.5 and d["missed_tumours_flagged"] == 0.5
    assert disagreement([row("glioma", "glioma", 9)])["share_of_flagged_that_are_tumours"] is None


def test_a_no_tumour_answer_beside_an_outline_is_a_warning():
    from braintumor_flax.ood import OODResult
    from braintumor_flax.serve.service import TUMOR_DISAGREEMENT, SliceResult

    def result(tumour: str, area: int) -> SliceResult:
        probs = {c: (0.7 if c == tumour else 0.1) for c in TUMOR_CLASSES}
        return SliceResult("x.png", {"axial": 0.9, "coronal": 0.05, "sagittal": 0.05}, probs,
                           OODResult(False, 0.1, 0.1, {}, []), tumor_area_px=area, mask_rle={"size": [1, 1]})

    warned, agreed, empty = result("no_tumor", 250), result("meningioma", 250), result("no_tumor", 0)
    assert warned.models_disagree and not agreed.models_disagree and not empty.models_disagree
    assert warned.to_json("v")["tumor_warning"] == TUMOR_DISAGREEMENT and agreed.to_json("v")["tumor_warning"] is None
    assert TUMOR_DISAGREEMENT in warned.segmentation_note() and "⚠️" not in agreed.segmentation_note()


def test_mask_rle_is_coco_column_major_and_round_trips():
    assert rle_encode(np.array([[1, 0], [1, 1]], bool)) == {"size": [2, 2], "counts": [0, 2, 1, 1]}
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 12), rng.integers(1, 12))) > rng.random()
        np.testing.assert_array_equal(rle_decode(rle_encode(mask)), mask)
    with pytest.raises(ValueError, match="cover"):
        rle_decode({"size": [3, 3], "counts": [4, 4]})


def test_outline_is_drawn_on_the_mask_boundary_only():
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    drawn = draw_outline(image, mask, width=1)
    coloured = (drawn == OUTLINE_RGB).all(axis=-1)
    assert coloured.sum() == 36 and coloured[5, 5:15].all() and not coloured[6:14, 6:14].any()
    assert not image.any()  # a copy: the input is untouched


@pytest.mark.parametrize("frozen_blocks", [3, 2], ids=["blocks4-5", "blocks3-5"])
def test_joint_fine_tuning_trains_trunk_heads_and_decoder_and_serves_what_it_validated(tmp_path, tiny_pipeline_factory,
                                                                                       frozen_blocks):
    """The joint stage on a shared trunk with a deep decoder: the frozen blocks (1-3, or 1-2 with block 3 trained)
    stay bit-identical, the rest trains, the kept epoch is the best on validation (epoch 0, the start, included),
    and the saved checkpoint, split after block 3 as before, serves the masks it validated."""
    from flax import nnx

    from braintumor_flax.training.joint_segmentation import JointConfig, train_joint

    brisc = _write_brisc_like(tmp_path, "train", 64, 0)
    kaggle_like = _write_brisc_like(tmp_path, "train_other", 40, 2)
    kaggle_like = dataclasses.replace(kaggle_like, dataset=np.array(["kaggle"] * len(kaggle_like)),
                                      plane=np.full(len(kaggle_like), -1, np.int32))
    train = Split("train", *(np.concatenate([getattr(brisc, f), getattr(kaggle_like, f)])
                             for f in ("images", "tumor", "plane", "dataset")),
                  brisc.paths + kaggle_like.paths, brisc.content_hash + kaggle_like.content_hash)
    data = PreparedData({"train": train, "val": _write_brisc_like(tmp_path, "val", 24, 1)}, report={},
                        dataset_hash="gen", image_size=SIZE)
    pipeline = tiny_pipeline_factory(image_size=SIZE, width_divisor=16, lower_blocks=3)
    pipeline.info = dataclasses.replace(pipeline.info, shared_trunk=True)
    pipeline.tumor_model.vgg = pipeline.view_model.vgg
    seg_config = SegTrainConfig(epochs=4, batch_size=8, learning_rate=3e-3, warmup_epochs=0.2, deep=True,
                                full_res=True)
    segmenter, record = train_segmenter(pipeline.view_model.vgg, data, tmp_path, seg_config, log=lambda _: None)
    pipeline.attach_segmenter(segmenter, record)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(pipeline.view_model.vgg, nnx.Param))}

    config = JointConfig(epochs=3, batch_size=8, seg_rows=4, learning_rate=3e-3, decoder_learning_rate=3e-3,
                         warmup_epochs=0.2, frozen_blocks=frozen_blocks)
    joint = train_joint(pipeline, data, tmp_path, config, log=lambda _: None)["joint"]
    history = joint["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    scores = [h["val_tumor_accuracy"] + h["val_dice_tumour"] for h in history]
    assert joint["kept_epoch"] == int(np.argmax(scores))
    assert history[-1]["train_seg_loss"] < history[1]["train_seg_loss"]
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(pipeline.view_model.vgg, nnx.Param))}
    for name, value in before.items():
        frozen = any(f"block{b}_" in str(name) for b in range(1, frozen_blocks + 1))
        assert np.array_equal(value, after[name]) == (frozen or joint["kept_epoch"] == 0), name
    assert pipeline.tumor_model.vgg is pipeline.view_model.vgg
    assert pipeline.view_model.config.lower_blocks == pipeline.tumor_model.config.lower_blocks == 3
    assert pipeline.info.training.recipe == "stand-in-joint"
    assert pipeline.info.training.history["joint"][-1] == {
        "kept_epoch": joint["kept_epoch"], "val_accuracy": history[joint["kept_epoch"]]["val_tumor_accuracy"],
        "val_dice_tumour": history[joint["kept_epoch"]]["val_dice_tumour"]}

    pipeline.save_pretrained(tmp_path / "joint")
    loaded = BrainTumorPipeline.from_pretrained(tmp_path / "joint")  # the decoder fits the fine-tuned trunk
    assert loaded.segmenter.config.threshold == joint["threshold"]
    masks, known = split_masks(data.splits["val"], tmp_path)
    served = Forward.from_pipeline(loaded, batch_size=8)(data.splits["val"].images, segment=True)
    dice = grid_dice(served.mask_prob, masks, joint["threshold"])
    assert dice[masks.any(axis=(1, 2))].mean() == pytest.approx(joint["val_dice_at_threshold"], abs=1e-3)


def test_activations_mapped_from_disk_equal_those_held_in_memory(tmp_path, monkeypatch, tiny_pipeline_factory):
    """Activations too large for memory spill to unlinked files of the cache folder: same values, no file left."""
    from braintumor_flax.models.segmentation import SegmentationConfig
    from braintumor_flax.training.segmentation import encode_images

    monkeypatch.setenv("BRAINTUMOR_FLAX_CACHE", str(tmp_path))
    vgg = tiny_pipeline_factory(image_size=SIZE, width_divisor=16).view_model.vgg
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    config = SegmentationConfig(image_size=SIZE, width_divisor=16, deep=True, full_res=True)
    held = encode_images(vgg, images, config, batch_size=2, spill=False)
    mapped = encode_images(vgg, images, config, batch_size=2, spill=True)
    assert set(held) == set(mapped) == set(config.inputs)
    for name in config.inputs:
        assert isinstance(mapped[name], np.memmap) and not isinstance(held[name], np.memmap)
        np.testing.assert_array_equal(held[name], mapped[name])
        assert held[name].shape[0] == 5 and np.abs(held[name]).sum() > 0
    assert not any((tmp_path / "segmenter-activations").iterdir())


def test_augmented_copies_follow_the_originals_and_train(tmp_path, tiny_pipeline_factory):
    """`augment_copies`: each training slice gets augmented versions (its mask moved with it) after the originals,
    the decoder trains over all of them, and the record says how it was augmented."""
    from braintumor_flax.training.segmentation import SegData

    data = PreparedData({"train": _write_brisc_like(tmp_path, "train", 48, 0),
                         "val": _write_brisc_like(tmp_path, "val", 16, 1)}, report={}, dataset_hash="gen",
                        image_size=SIZE)
    config = SegTrainConfig(epochs=3, batch_size=8, learning_rate=3e-3, warmup_epochs=0.2, augment_copies=2)
    train = SegData.of(data.splits["train"], tmp_path, config)
    both = train.with_augmented_copies(2, seed=0)
    n = len(train)
    assert len(both) == 3 * n and both.images.dtype == np.uint8
    np.testing.assert_array_equal(both.images[:n], train.images)
    np.testing.assert_array_equal(both.rows, np.tile(train.rows, 3))
    for copy in (1, 2):
        part, part_masks = both.images[copy * n:(copy + 1) * n], both.masks[copy * n:(copy + 1) * n]
        assert (part != train.images).any(axis=(1, 2, 3)).all()
        # No tumour stays no tumour; a tumour mostly stays in view (shifts and zooms may push some out).
        assert not part_masks[~train.masks.any(axis=(1, 2))].any()
        assert part_masks[train.masks.any(axis=(1, 2))].any(axis=(1, 2)).mean() > 0.8
    assert not np.array_equal(both.images[n:2 * n], both.images[2 * n:])
    # A capped run (a pilot) still sees slices with and without a tumour (the split is ordered by class).
    by_class = data.splits["train"].subset(np.argsort(data.splits["train"].tumor, kind="stable"))
    capped = SegData.of(by_class, tmp_path, dataclasses.replace(config, max_images=8))
    assert len(capped) == 8 and 0 < capped.masks.any(axis=(1, 2)).sum() < 8

    pipeline = tiny_pipeline_factory(image_size=SIZE, width_divisor=16)
    _, record = train_segmenter(pipeline.view_model.vgg, data, tmp_path, config, log=lambda _: None)
    assert record["config"]["augment_copies"] == 2 and record["config"]["pixel_augment"]["rotate_deg"] > 0
    assert record["train_images"] == n and len(record["history"]) == 3
    assert np.isfinite([h["train_loss"] for h in record["history"]]).all()
