"""The GPU path end to end on CPU with a tiny configuration: pack → run every recipe → shards → checkpoint.

The commands are the ones a lent GPU machine runs (training/gpu.py); only the recipe sizes are overridden.
"""

from __future__ import annotations

import json

import numpy as np

from braintumor_flax.serve.predictor import Predictor
from braintumor_flax.training import gpu
from braintumor_flax.training.config import RECIPES, TrainConfig

SIZE = 32
TINY = {"image_size": SIZE, "width_divisor": 16, "pretrained": False, "epochs": 1, "batch_size": 8,
        "eval_batch_size": 8}


def test_pack_run_unpack(tmp_path, tmp_cache):
    from test_training_steps import _split

    from braintumor_flax.data.splits import PreparedData

    # As if `prepare(..., val_grouping="phash:4")` had split it (its report says so): the pack and then the run must
    # record that, so the split can be re-created.
    data = PreparedData({"train": _split("train", 48, 0), "val": _split("val", 16, 1)},
                        report={"params": {"val_grouping": "phash:4"}}, dataset_hash="generated-1", image_size=SIZE)
    manifest = gpu.write_pack(data, tmp_path / "pack", size=SIZE)
    assert manifest["splits"]["train"]["n"] == 48 and manifest["total_bytes"] < 200_000
    assert gpu.pack_val_grouping(tmp_path / "pack") == "phash:4"
    back = gpu.read_pack(tmp_path / "pack", image_size=SIZE)
    assert back.splits["val"].images.shape == (16, SIZE, SIZE, 3)
    # Grey WebP at quality 80: the first channel comes back close (these noisy test images are a hard case).
    error = np.abs(back.splits["val"].images[..., 0].astype(int) - data.splits["val"].images[..., 0].astype(int))
    assert error.mean() < 8
    np.testing.assert_array_equal(back.splits["train"].tumor, data.splits["train"].tumor)

    recipes = ["shared-finetune-128", "shared-frozen4"]
    assert all(r in RECIPES for r in recipes)
    out = tmp_path / "OUT"
    report = gpu.run(tmp_path / "pack", recipes, out, budget_s=600, overrides=TINY, log=lambda _: None)
    assert set(report["recipes"]) == set(recipes) and report["best"] in recipes
    returned = [p for p in out.iterdir() if p.is_file()]
    assert len(returned) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in returned)
    log = json.loads((out / "gpu_log.json").read_text())
    assert all("validation" in log["recipes"][r] for r in recipes)

    pipeline = gpu.import_weights(out)
    assert pipeline.info.calibration.fitted_on_validation and pipeline.info.ood is not None
    assert TrainConfig.from_record(pipeline.info.training).val_grouping == "phash:4"
    pipeline.save_pretrained(tmp_path / "ckpt")
    predictor = Predictor.from_pretrained(tmp_path / "ckpt", batch_size=8)
    probs = predictor.predict_arrays(back.splits["val"].images).tumor_probs
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_shards_respect_the_size_limit(tmp_path, tiny_pipeline_factory):
    pipeline = tiny_pipeline_factory(image_size=SIZE, seed=5)
    paths = gpu.export_weights(pipeline, tmp_path, shard_bytes=6 * 2**20)  # VGG16 in float16: ~29 MB
    assert len(paths) > 1 and all(p.stat().st_size <= 6 * 2**20 + 4096 for p in paths)
    again = gpu.import_weights(tmp_path)
    x = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    # float16 storage: the logits move by the rounding of the weights only
    a = Predictor(pipeline, batch_size=4).predict_arrays(x).tumor_logits
    b = Predictor(again, batch_size=4).predict_arrays(x).tumor_logits
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2)


def test_pack_carries_masks_and_run_trains_the_decoder(tmp_path, tmp_cache):
    """With masks in the pack, the run trains the mask decoder on the chosen trunk and the shards bring it back:
    the unpacked checkpoint segments as one loaded from disk does (same masks, same threshold)."""
    from test_segmentation import _write_brisc_like

    from braintumor_flax.data.masks import split_masks
    from braintumor_flax.data.splits import PreparedData
    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.models.forward import Forward
    from braintumor_flax.training.segmentation import SegTrainConfig

    data_dir = tmp_path / "data"
    data = PreparedData({"train": _write_brisc_like(data_dir, "train", 48, 0),
                         "val": _write_brisc_like(data_dir, "val", 16, 1)}, report={}, dataset_hash="gen",
                        image_size=SIZE)
    manifest = gpu.write_pack(data, tmp_path / "pack", size=SIZE, masks_from=data_dir)
    assert manifest["splits"]["train"]["masks"] == 36  # three in four slices have a tumour
    for size in (SIZE, 2 * SIZE):  # the pack's own grid, and resized for a larger recipe
        masks_of = gpu.read_pack_masks(tmp_path / "pack", image_size=size)
        masks, known = masks_of(data.splits["val"])
        truth, truth_known = split_masks(data.splits["val"], data_dir)
        np.testing.assert_array_equal(known, truth_known)
        if size == SIZE:
            np.testing.assert_array_equal(masks, truth)
        else:
            np.testing.assert_array_equal(masks.sum(axis=(1, 2)) > 0, truth.sum(axis=(1, 2)) > 0)
            np.testing.assert_allclose(masks.sum(axis=(1, 2)), 4 * truth.sum(axis=(1, 2)), rtol=0.35)
    assert gpu.read_pack_masks(tmp_path / "no-pack", image_size=SIZE) is None

    out = tmp_path / "OUT"
    segment = SegTrainConfig(epochs=2, batch_size=8, learning_rate=3e-3, warmup_epochs=0.2, full_res=True)
    report = gpu.run(tmp_path / "pack", ["shared-finetune-128"], out, budget_s=600, overrides=TINY, segment=segment,
                     log=lambda _: None)
    assert report["segmentation"]["config"]["deep"]  # a shared trunk: the decoder reads its blocks 4-5
    assert len(report["segmentation"]["history"]) == 2
    returned = [p for p in out.iterdir() if p.is_file()]
    assert len(returned) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in returned)

    pipeline = gpu.import_weights(out)
    assert pipeline.segmenter is not None and pipeline.segmenter.config.deep
    assert pipeline.segmentation_record["kept_epoch"] == report["segmentation"]["kept_epoch"]
    pipeline.save_pretrained(tmp_path / "ckpt")
    loaded = BrainTumorPipeline.from_pretrained(tmp_path / "ckpt")
    images = data.splits["val"].images
    a = Forward.from_pipeline(pipeline, batch_size=8)(images, segment=True).mask_prob
    b = Forward.from_pipeline(loaded, batch_size=8)(images, segment=True).mask_prob
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert loaded.segmenter.config.threshold == report["segmentation"]["threshold"]
