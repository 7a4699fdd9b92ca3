"""The long CPU run (training/long_run.py, long_loop.py, background.py) on a narrowed random VGG and generated
slices: end to end to a servable checkpoint, killed by a real SIGKILL and resumed to the same weights, its
progress file, and the background launcher refusing a second copy."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from braintumor_flax.data.masks import mask_path_for
from braintumor_flax.paths import PROJECT_ROOT

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")
RECIPE = "tiny-long"  # 32 px, width ÷16, batch 4, 2 epochs: 8 steps an epoch on the data below


def _write_dataset(root: Path, per_class: int = 8, size: int = 48, seed: int = 0) -> Path:
    """BRISC-named slices (three planes, masks for most tumour slices, none for a quarter) and Kaggle-like ones
    (no planes, no masks): the tumour is a bright square whose size gives the class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for c, label in enumerate(CLASSES):
            for i in range(n):
                image = rng.integers(0, 50, (size, size), dtype=np.uint8)
                mask = np.zeros((size, size), np.uint8)
                if label != "no_tumor":
                    side = 6 + 3 * c
                    top, left = rng.integers(0, size - side, 2)
                    image[top:top + side, left:left + side] = 200 + 15 * c
                    mask[top:top + side, left:left + side] = 255
                stem = f"brisc2025_{split}_{c * 100 + i:05d}_{label[:2]}_{('ax', 'co', 'sa')[i % 3]}_t1"
                path = root / "brisc2025" / "classification_task" / split / label / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                if label != "no_tumor" and i % 4 != 3:
                    mask_path_for(path).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(mask_path_for(path))
        for c, label in enumerate(CLASSES):
            for i in range(n // 2):
                image = rng.integers(0, 60, (size, size), dtype=np.uint8)
                if label != "no_tumor":  # a lesion where each slice has its own: not copies of one picture
                    top, left = rng.integers(2, size - 18, 2)
                    image[top:top + 5 + 3 * c, left:left + 10] = 210
                path = root / "kaggle" / ("Training" if split == "train" else "Testing") / label / f"k{c}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
    return root


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--recipe", RECIPE, "--run-dir", str(run_dir), *extra]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "BRAINTUMOR_FLAX_CACHE": str(cache), "PYTHONPATH": str(PROJECT_ROOT), **extra}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data folder, cache, run folder) of the tiny run trained in one go through train.py's entry point."""
    from braintumor_flax.training.cli import train_main

    root = tmp_path_factory.mktemp("long")
    data, cache = _write_dataset(root / "data"), root / "cache"
    previous = os.environ.get("BRAINTUMOR_FLAX_CACHE")
    os.environ["BRAINTUMOR_FLAX_CACHE"] = str(cache)
    try:
        assert train_main(_args(data, root / "run")) == 0
    finally:
        if previous is None:
            os.environ.pop("BRAINTUMOR_FLAX_CACHE")
        else:
            os.environ["BRAINTUMOR_FLAX_CACHE"] = previous
    return data, cache, root / "run"


def test_tiny_long_run_ends_in_a_servable_checkpoint_of_its_ema_weights(uninterrupted):
    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.models.forward import Forward
    from braintumor_flax.training.config import get_recipe
    from braintumor_flax.training.long_run import _new_state, load_run_state

    data, _, run_dir = uninterrupted
    pipeline = BrainTumorPipeline.from_pretrained(run_dir / "checkpoint")
    assert pipeline.shares_trunk and pipeline.segmenter is not None and pipeline.segmenter.config.deep
    assert pipeline.info.calibration.fitted_on_validation and "precision" in pipeline.info.ood
    record = pipeline.info.training
    assert record.recipe == RECIPE and record.config["long_run"] and record.config["augment_profile"] == "source"
    history = record.history["shared"]
    assert [h["epoch"] for h in history[:-1]] == [1, 2] and "kept_epoch" in history[-1]
    assert pipeline.segmentation_record["threshold"] == pipeline.segmenter.config.threshold
    # What is saved is the kept epoch's EMA weights, not the raw ones.
    config = get_recipe(RECIPE)
    with np.load(run_dir / "state.npz") as saved:  # the data order's length: the training split after dedup
        n_train = next(len(saved[k]) for k in saved.files
                       if k.startswith("leaf_") and saved[k].dtype == np.int64 and saved[k].ndim == 1)
    state, best, _, meta = load_run_state(run_dir, _new_state(config, 8, None), n_train)
    served = np.asarray(pipeline.tumor_model.classifier.kernel.get_value())
    kept = best if meta["best_epoch"] else state.ema
    np.testing.assert_array_equal(served, np.asarray(kept["tumor"]["classifier"]["kernel"].get_value()))
    assert not np.array_equal(served, np.asarray(state.params["tumor"]["classifier"]["kernel"].get_value()))
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = Forward.from_pipeline(pipeline, batch_size=4)(images, segment=True)
    assert out.tumor_logits.shape == (3, 4) and out.mask_prob.shape == (3, 32, 32)


def test_progress_file_tells_epoch_step_figures_and_time(uninterrupted):
    _, _, run_dir = uninterrupted
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["status"] == "done" and progress["checkpoint"] == str(run_dir / "checkpoint")
    assert (progress["epoch"], progress["epochs"], progress["step"], progress["total_steps"]) == (2, 2, 16, 16)
    assert progress["eta_s"] == 0 and progress["elapsed_s"] > 0 and progress["seconds_per_step"] > 0
    for entry in progress["history"]:
        for key in ("train_loss", "val_tumor_accuracy", "val_view_accuracy", "val_dice_tumour"):
            assert np.isfinite(entry[key]), key
    assert not list(run_dir.glob(".*.tmp-*"))  # no half-written file left


def test_killed_mid_epoch_and_resumed_it_ends_with_the_uninterrupted_weights(uninterrupted, tmp_path):
    """A real SIGKILL after global step 11 (epoch 2, step 3), the state saved after every step but that one, so
    the resumed run replays a lost step across an epoch's validation. Bit for bit: the same compiled programs on
    the same inputs, the state restored exactly (float32 arrays, the data order, the step that seeds every key)."""
    from safetensors.numpy import load_file

    from braintumor_flax.training.cli import train_main
    from braintumor_flax.training.run_files import load_meta

    data, cache, done = uninterrupted
    run_dir = tmp_path / "run"
    args = _args(data, run_dir, "--save-every-min", "0")  # a state after every step
    code = f"from braintumor_flax.training.cli import train_main; train_main({args!r})"
    killed = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            env=_env(cache, BRAINTUMOR_FLAX_KILL_AFTER_STEP="11"), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    meta = load_meta(run_dir / "state.npz")
    assert (meta["epoch"], meta["step_in_epoch"], len(meta["history"])) == (1, 2, 1)  # step 11 itself was lost
    assert json.loads((run_dir / "progress.json").read_text())["status"] == "training"
    # The killed process held the run's lock; the kernel released it, so the resumed run can take it.
    os.environ["BRAINTUMOR_FLAX_CACHE"] = str(cache)
    try:
        assert train_main(_args(data, run_dir)) == 0
    finally:
        os.environ.pop("BRAINTUMOR_FLAX_CACHE")
    for part in ("shared.safetensors", "view/model.safetensors", "tumor/model.safetensors",
                 "segmentation/model.safetensors"):
        a, b = load_file(str(done / "checkpoint" / part)), load_file(str(run_dir / "checkpoint" / part))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{part}: {name}")
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["sessions"] == 2
    def figures(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "val_seconds"} for h in history]

    assert figures(progress["history"]) == figures(json.loads((done / "progress.json").read_text())["history"])


def test_background_start_refuses_a_second_copy_and_stop_saves_the_state(uninterrupted, tmp_path):
    from braintumor_flax.training.background import start, status_text, stop
    from braintumor_flax.training.run_files import load_meta

    data, cache, _ = uninterrupted
    run_dir = tmp_path / "missing" / "run"  # the folder does not exist yet: the run starts
    os.environ["BRAINTUMOR_FLAX_CACHE"] = str(cache)
    pid, reaped = None, False
    try:
        pid = start(RECIPE, run_dir, data, ["--epochs", "400", "--save-every-min", "60"])
        with pytest.raises(SystemExit, match="already starting"):  # not yet holding its lock: the pid file tells
            start(RECIPE, run_dir, data, [])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            progress = run_dir / "progress.json"
            if progress.is_file() and json.loads(progress.read_text())["step"] > 0:
                break
            time.sleep(0.5)
        with pytest.raises(SystemExit, match="already running"):  # holding it
            start(RECIPE, run_dir, data, [])
        assert f"running, pid {pid}" in status_text(run_dir)
        assert stop(run_dir) == pid
        assert os.waitpid(pid, 0)[1] != 0  # it exits with "stopped on SIGTERM"
        reaped = True
    finally:
        os.environ.pop("BRAINTUMOR_FLAX_CACHE")
        if pid is not None and not reaped:  # a failed check: end the child this test started, and reap it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    log = (run_dir / "train.log").read_text()
    assert "nohup nice -n 19" in log and "stopped on SIGTERM" in log
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["status"] == "stopped" and progress["epochs"] == 400
    assert load_meta(run_dir / "state.npz")["saved_step"] == progress["step"] > 0  # SIGTERM saved the last step
    assert "not running" in status_text(run_dir)


def test_processing_augmentations_change_the_slice_and_leave_the_mask_to_geometry():
    from braintumor_flax.training import augment as A

    rng = np.random.default_rng(0)
    images = np.repeat(rng.integers(0, 255, (4, 32, 32, 1)), 3, axis=-1).astype(np.float32)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 8:20, 10:24] = True
    key = jax.random.key(2)
    off = dataclasses.replace(A.SOURCE_AUGMENT, curve_free_p=0, denoise_p=0, gauss_blur_p=0, sharpen_p=0,
                              resample_p=0, jpeg_p=0)
    assert not off.processing and A.SOURCE_AUGMENT.processing
    # Off, the augmentation is the original one, draw for draw.
    np.testing.assert_array_equal(A.augment_pixels(key, images, off), A.augment_pixels(key, images, A.PixelAugment()))
    base, base_masks = A.augment_pixels_and_masks(key, images, masks, off)
    for name in ("curve_free_p", "denoise_p", "gauss_blur_p", "sharpen_p", "resample_p", "jpeg_p"):
        moved, moved_masks = A.augment_pixels_and_masks(key, images, masks, dataclasses.replace(off, **{name: 1.0}))
        assert float(jnp.abs(moved - base).mean()) > 0.2, name
        np.testing.assert_array_equal(moved_masks, base_masks, err_msg=name)
    x = jnp.asarray(images[0] / 255.0)
    assert float(jnp.abs(A._jpeg(x, jnp.float32(100)) - x).max()) <= 1.5 / 255  # quality 100: rounding only
    assert float(jnp.abs(A._jpeg(x, jnp.float32(10)) - x).mean()) > 5 / 255
    np.testing.assert_allclose(A._resample_matrix(32, jnp.float32(1.0)), np.eye(32), atol=1e-6)


def test_mask_loss_counts_known_rows_only_and_empty_known_masks_as_empty():
    from braintumor_flax.training.segmentation import mask_loss

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8)), jnp.float32)
    target = jnp.zeros((3, 8, 8)).at[0, 2:5, 2:5].set(1.0)  # row 1: a no-tumour slice (known, empty)
    known = jnp.asarray([True, True, False])
    loss = mask_loss(logits, target, known=known)
    assert loss == pytest.approx(float(mask_loss(logits[:2], target[:2])), rel=1e-6)
    assert float(mask_loss(logits.at[2].set(30.0), target, known=known)) == pytest.approx(float(loss), rel=1e-6)
    assert float(mask_loss(logits.at[1].set(30.0), target, known=known)) > float(loss) + 1  # outlining nothing counts
    assert float(mask_loss(logits, target, known=jnp.zeros(3, bool))) == 0.0


def test_a_state_write_killed_half_way_leaves_the_last_good_state(tmp_path, monkeypatch):
    from braintumor_flax.training import run_files

    tree = {"w": np.arange(6, dtype=np.float32), "step": np.int32(3)}
    run_files.save_state(tmp_path / "state.npz", tree, {"step": 3})

    def half_then_die(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the writer dies mid-write

    monkeypatch.setattr(run_files.np, "savez", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_files.save_state(tmp_path / "state.npz", {"w": np.zeros(6, np.float32), "step": np.int32(4)}, {"step": 4})
    monkeypatch.undo()
    loaded, meta = run_files.load_state(tmp_path / "state.npz", tree)
    assert meta == {"step": 3} and np.array_equal(loaded["w"], tree["w"])
    (tmp_path / ".state.npz.tmp-99999").write_bytes(b"left by a SIGKILL")
    run_files.save_state(tmp_path / "state.npz", tree, {"step": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]
    with pytest.raises(ValueError, match="does not fit"):
        run_files.load_state(tmp_path / "state.npz", {"w": np.zeros(7, np.float32), "step": np.int32(0)})


def test_the_long_run_never_writes_into_a_committed_checkpoint():
    from braintumor_flax.training.long_loop import refuse_committed

    with pytest.raises(SystemExit, match="committed checkpoint"):
        refuse_committed(PROJECT_ROOT / "checkpoints-shared-trunk")
    refuse_committed(PROJECT_ROOT / "runs" / "shared-long-128" / "checkpoint")
