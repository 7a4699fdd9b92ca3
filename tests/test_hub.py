"""Checkpoint round trips through save_pretrained / from_pretrained, and the exact Hub upload call."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import HfApi

from braintumor_flax.checkpoint_info import Calibration, CheckpointInfo
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models import ModelConfig, build_model
from braintumor_flax.models.params import flat_params


@pytest.fixture(scope="module")
def pipeline():
    view = build_model(ModelConfig("view", image_size=32), seed=1)
    tumor = build_model(ModelConfig("tumor", image_size=32), seed=2)
    # Freeze-sharing: blocks 1-4 identical in both models, as after training with them frozen.
    for name in ("block1_conv1", "block2_conv2", "block4_conv3"):
        getattr(tumor.vgg, name).kernel.set_value(getattr(view.vgg, name).kernel.get_value())
    return BrainTumorPipeline(view, tumor, info=CheckpointInfo(calibration=Calibration(tumor_temperature=1.5)),
                              metrics={"tumor": {"brisc2025_test": {"accuracy": 0.5, "n": 10}}})


def _predict(p: BrainTumorPipeline, images):
    logits, feature = p.view_model(images)
    return np.asarray(logits), np.asarray(p.tumor_model(images, feature))


def test_round_trip_predicts_identically(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "ckpt")
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert {"config.json", "shared.safetensors", "view/model.safetensors", "tumor/model.safetensors",
            "view/config.json", "tumor/metrics.json", "README.md", "metrics.json"} <= files
    loaded = BrainTumorPipeline.from_pretrained(tmp_path / "ckpt")
    images = jax.random.randint(jax.random.key(0), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    for a, b in zip(_predict(pipeline, images), _predict(loaded, images), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.info.calibration.tumor_temperature == 1.5
    assert "0.500" in (tmp_path / "ckpt" / "README.md").read_text()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["models"]["tumor"]["class_names"] == ["glioma", "meningioma", "no_tumor", "pituitary"]


def test_float16_storage_halves_the_files_and_stays_float16_when_saved_again(pipeline, tmp_path):
    from safetensors.numpy import load_file

    pipeline.save_pretrained(tmp_path / "fp32")
    pipeline.storage_dtype = "float16"
    try:
        pipeline.save_pretrained(tmp_path / "fp16")
    finally:
        pipeline.storage_dtype = "float32"
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).rglob("*.safetensors") if f.name != "ood.safetensors")
            for d in ("fp32", "fp16")}
    assert 0.49 < size["fp16"] / size["fp32"] < 0.51
    loaded = BrainTumorPipeline.from_pretrained(tmp_path / "fp16")
    assert loaded.storage_dtype == "float16"
    assert all(v.dtype == np.float32 for v in flat_params(loaded.view_model).values())  # computed in float32
    images = jax.random.randint(jax.random.key(0), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    for a, b in zip(_predict(pipeline, images), _predict(loaded, images), strict=True):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)
    loaded.save_pretrained(tmp_path / "again")
    for name in ("shared.safetensors", "tumor/model.safetensors"):
        assert {v.dtype for v in load_file(str(tmp_path / "again" / name)).values()} == {np.dtype(np.float16)}
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "fp16" / name).read_bytes()


def test_shared_blocks_stored_once(pipeline, tmp_path):
    from safetensors.numpy import load_file

    pipeline.save_pretrained(tmp_path / "ckpt")
    shared = load_file(str(tmp_path / "ckpt" / "shared.safetensors"))
    view_only = load_file(str(tmp_path / "ckpt" / "view" / "model.safetensors"))
    assert "vgg.block1_conv1.kernel" in shared and "vgg.block1_conv1.kernel" not in view_only
    assert "vgg.block1_conv2.kernel" in view_only  # differs between the two models here
    assert set(shared) | set(view_only) == set(flat_params(pipeline.view_model))


def test_saving_the_same_weights_gives_the_same_bytes(pipeline, tmp_path):
    """Reproducible files: re-saving unchanged weights must not create new blobs for git or the Hub."""
    for name in ("a", "b", "c"):
        pipeline.save_pretrained(tmp_path / name)
    for rel in ("shared.safetensors", "view/model.safetensors", "tumor/model.safetensors", "config.json"):
        blobs = {(tmp_path / name / rel).read_bytes() for name in ("a", "b", "c")}
        assert len(blobs) == 1, rel


def test_corrupt_checkpoint_is_a_clear_error(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tumor" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ"):
        BrainTumorPipeline.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        BrainTumorPipeline.load_folder(tmp_path / "nowhere")


def test_push_to_hub_makes_the_exact_upload_call(pipeline, monkeypatch):
    """The Hub is unreachable here: capture the calls at the HfApi boundary and check what would be sent."""
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded = sorted(p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file())
        calls["upload_folder"] = (repo_id, uploaded, kwargs)
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    assert pipeline.push_to_hub("someone/braintumor-flax", commit_message="test push") == "commit-url"
    repo_id, uploaded, kwargs = calls["upload_folder"]
    assert repo_id == "someone/braintumor-flax" and kwargs["repo_type"] == "model"
    assert kwargs["commit_message"] == "test push"
    assert "shared.safetensors" in uploaded and "tumor/model.safetensors" in uploaded and "README.md" in uploaded


def test_push_space_uploads_the_app_and_nothing_else(monkeypatch):
    """The exact calls `python -m braintumor_flax.serve.space` makes, captured at the HfApi boundary, here."""
    from huggingface_hub.utils import filter_repo_objects

    from braintumor_flax.paths import PROJECT_ROOT
    from braintumor_flax.serve import space

    calls: dict = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def fake_add_space_variable(self, repo_id, key, value, **kwargs):
        calls["variable"] = (repo_id, key, value)

    def fake_upload_folder(self, *, repo_id, folder_path, allow_patterns, ignore_patterns, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["upload"] = (repo_id, set(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                            ignore_patterns=ignore_patterns)), kwargs)
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "add_space_variable", fake_add_space_variable)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)

    assert space.push_space("someone/braintumor-demo") == "commit-url"
    assert calls["create_repo"] == ("someone/braintumor-demo",
                                    {"repo_type": "space", "space_sdk": "gradio", "private": False, "exist_ok": True})
    repo_id, uploaded, kwargs = calls["upload"]
    assert kwargs["repo_type"] == "space" and "variable" not in calls
    served = "checkpoints-shared-trunk"
    assert {"app.py", "requirements.txt", "README.md", "braintumor_flax/serve/app_ui.py", f"{served}/config.json",
            f"{served}/shared.safetensors", f"{served}/tumor/model.safetensors"} <= uploaded
    assert any(f.startswith("examples/") for f in uploaded)
    assert not any(f.startswith(("tests/", "results/", "runs/", ".venv/", ".git/", "checkpoints/",
                                 "checkpoints-no-view/"))
                   or "__pycache__" in f for f in uploaded)

    calls.clear()
    space.push_space("someone/braintumor-demo", model="someone/braintumor-flax-vgg16", root=PROJECT_ROOT)
    assert calls["variable"] == ("someone/braintumor-demo", "BRAINTUMOR_FLAX_MODEL", "someone/braintumor-flax-vgg16")
    assert not any(f.startswith("checkpoints") for f in calls["upload"][1]) and "app.py" in calls["upload"][1]


def test_from_pretrained_with_a_repo_id_downloads_the_checkpoint_files(pipeline, tmp_path, monkeypatch):
    """A Hub repo id goes through snapshot_download with the checkpoint's file patterns (served from disk here)."""
    import huggingface_hub

    from braintumor_flax import hub

    pipeline.save_pretrained(tmp_path / "snapshot")
    seen = {}

    def fake_snapshot_download(**kwargs):
        seen["snapshot"] = kwargs
        return str(tmp_path / "snapshot")

    def fake_hf_hub_download(repo_id, filename, **kwargs):  # ModelHubMixin fetches config.json on its own
        seen.setdefault("files", []).append((repo_id, filename))
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", fake_hf_hub_download)
    loaded = BrainTumorPipeline.from_pretrained("someone/braintumor-flax", revision="v1")
    assert seen["snapshot"]["repo_id"] == "someone/braintumor-flax" and seen["snapshot"]["revision"] == "v1"
    from huggingface_hub.utils import filter_repo_objects

    saved = [f.relative_to(tmp_path / "snapshot").as_posix() for f in (tmp_path / "snapshot").rglob("*") if f.is_file()]
    assert sorted(filter_repo_objects(saved, allow_patterns=seen["snapshot"]["allow_patterns"])) == sorted(saved)
    images = jax.random.randint(jax.random.key(1), (1, 32, 32, 3), 0, 256).astype(jnp.uint8)
    for a, b in zip(_predict(pipeline, images), _predict(loaded, images), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ood_matrices_live_in_their_own_safetensors_file(pipeline, tmp_path):
    """config.json keeps the OOD limits; the 512x512 precision matrix goes to ood.safetensors and comes back exact."""
    from braintumor_flax.hub import OOD_FILE, read_config

    rng = np.random.default_rng(0)
    means, precision = rng.standard_normal((1, 512)), rng.standard_normal((512, 512))
    pipeline.info.ood = {"means": means.tolist(), "precision": precision.tolist(), "distance_limit": 3.5,
                            "feature": "lower_gap"}
    try:
        pipeline.save_pretrained(tmp_path / "ckpt")
        config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        assert config["ood"] == {"distance_limit": 3.5, "feature": "lower_gap", "arrays_file": OOD_FILE}
        assert (tmp_path / "ckpt" / "config.json").stat().st_size < 50_000
        loaded = BrainTumorPipeline.from_pretrained(tmp_path / "ckpt")
        np.testing.assert_array_equal(loaded.info.ood["precision"], precision)
        np.testing.assert_array_equal(loaded.info.ood["means"], means)
        assert loaded.info.ood["distance_limit"] == 3.5 and "arrays_file" not in loaded.info.ood
        # Saving what was loaded (arrays now numpy) works, and dropping the statistics removes the file.
        loaded.save_pretrained(tmp_path / "again")
        np.testing.assert_array_equal(read_config(tmp_path / "again")["ood"]["precision"], precision)
        loaded.info.ood = None
        loaded.save_pretrained(tmp_path / "again")
        assert not (tmp_path / "again" / OOD_FILE).exists() and "ood" not in read_config(tmp_path / "again")
    finally:
        pipeline.info.ood = None


def test_model_cards_describe_the_architecture_each_checkpoint_holds():
    """The committed checkpoints' configs: the served one is one shared trunk with a decoder, the faithful one the
    original's two networks; each card says so (not the other's description)."""
    import json

    from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, FAITHFUL_CHECKPOINT_DIR
    from braintumor_flax.reports.model_card import architecture

    served = architecture(json.loads((DEFAULT_CHECKPOINT_DIR / "config.json").read_text()))
    faithful = architecture(json.loads((FAITHFUL_CHECKPOINT_DIR / "config.json").read_text()))
    assert served.startswith("One Flax NNX model") and "decoder" in served and "128×128" in served
    assert faithful.startswith("Two Flax NNX models") and "decoder" not in faithful
    assert served.splitlines()[0] in (DEFAULT_CHECKPOINT_DIR / "README.md").read_text()
