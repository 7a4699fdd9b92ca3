"""Checkpoints of the two-model pipeline: `save_pretrained` / `from_pretrained` / `push_to_hub`.

Layout of a checkpoint folder (= one Hugging Face model repo):

    config.json                 pipeline: both model configs, calibration, OOD limits, provenance
    ood.safetensors             the OOD check's mean and precision matrix (512 x 512: binary, not JSON)
    shared.safetensors          parameters identical in both models (the frozen VGG blocks), stored once
    view/model.safetensors      the rest of model 1       view/config.json   view/metrics.json
    tumor/model.safetensors     the rest of model 2       tumor/config.json  tumor/metrics.json
    segmentation/model.safetensors   the tumour-mask decoder (optional; its config and training record are
                                     config.json's "segmentation")
    metrics.json                test metrics of both models (written by evaluation)
    README.md                   model card, generated from the metrics

Only safetensors and JSON are read: loading never unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors.numpy import load_file, save_file

from braintumor_flax import __version__
from braintumor_flax.checkpoint_info import CheckpointInfo
from braintumor_flax.models import ModelConfig, TumorClassifier, ViewClassifier, build_model
from braintumor_flax.models.params import flat_params, load_flat_params
from braintumor_flax.models.segmentation import SegmentationConfig, TumorSegmenter, build_segmenter, trunk_digest
from braintumor_flax.reports.model_card import render_model_card

FORMAT_VERSION = 1
TASKS = ("view", "tumor")
SHARED_FILE = "shared.safetensors"
OOD_FILE = "ood.safetensors"
SEGMENTATION_FILE = "segmentation/model.safetensors"
OOD_ARRAYS = ("means", "precision")  # the large parts of CheckpointInfo.ood; its scalars and limits stay in config.json
HUB_FILES = ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors", "README.md", "*.png"]


def split_shared(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(shared, only_a, only_b): a tensor both models hold bit for bit is stored once."""
    shared = {k: v for k, v in a.items() if k in b and v.shape == b[k].shape and np.array_equal(v, b[k])}
    return (shared, {k: v for k, v in a.items() if k not in shared}, {k: v for k, v in b.items() if k not in shared})


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    """Write a checkpoint's config.json, with the OOD matrices in ood.safetensors next to it.

    Every writer of a checkpoint's config.json goes through here (save_pretrained, evaluation writing its
    temperatures, `python -m braintumor_flax.ood fit --write`), so the two files never disagree.
    """
    folder = Path(folder)
    ood = config.get("ood")
    path = folder / OOD_FILE
    if isinstance(ood, dict) and any(k in ood for k in OOD_ARRAYS):
        arrays = {k: np.ascontiguousarray(np.asarray(ood[k], np.float64)) for k in OOD_ARRAYS if k in ood}
        folder.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(path), metadata={"format": f"braintumor-flax/{FORMAT_VERSION}"})
        config = {**config, "ood": {**{k: v for k, v in ood.items() if k not in OOD_ARRAYS}, "arrays_file": OOD_FILE}}
    elif path.is_file():
        path.unlink()  # statistics removed: a stale matrix file must not be picked up later
    _write_json(folder / "config.json", config)


def read_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json, with the OOD matrices from ood.safetensors put back into config["ood"]."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    ood = config.get("ood")
    if isinstance(ood, dict) and "arrays_file" in ood:
        # The file name is fixed, whatever config.json says, so a config cannot point the loader elsewhere.
        arrays = load_file(str(folder / OOD_FILE))
        config["ood"] = {**{k: v for k, v in ood.items() if k != "arrays_file"}, **arrays}
    return config


def checkpoint_folder(source: str | Path, **download_kwargs: Any) -> Path:
    """A local checkpoint folder as is, or a Hub repo id downloaded (checkpoint files only) into the HF cache."""
    folder = Path(source)
    if folder.is_dir():
        return folder
    return Path(snapshot_download(repo_id=str(source), allow_patterns=HUB_FILES, **download_kwargs))


def models_from_params(config: dict[str, Any], shared: dict[str, np.ndarray],
                       per_task: dict[str, dict[str, np.ndarray]]) -> dict[str, nnx.Module]:
    """Both models of a checkpoint config, filled with named parameters (float32 for the CPU).

    Built shape-only: random initialisers would cost seconds per model and be overwritten at once;
    load_flat_params fills every parameter or refuses the checkpoint.
    """
    models = {}
    for task in TASKS:
        model_config = ModelConfig.from_dict(config["models"][task])
        model = nnx.eval_shape(lambda cfg=model_config: build_model(cfg))
        params = {**shared, **per_task[task]}
        load_flat_params(model, {k: v.astype(np.float32) for k, v in params.items()})
        models[task] = model
    return models


def segmenter_from_params(config: dict[str, Any], params: dict[str, np.ndarray]) -> TumorSegmenter:
    segmenter = nnx.eval_shape(lambda: build_segmenter(SegmentationConfig.from_dict(config)))
    load_flat_params(segmenter, {k: v.astype(np.float32) for k, v in params.items()})
    return segmenter


class BrainTumorPipeline(
    ModelHubMixin,
    library_name="braintumor-flax",
    license="cc-by-4.0",
    pipeline_tag="image-classification",
    tags=["flax", "jax", "medical-imaging", "brain-mri", "vgg16", "grad-cam"],
    repo_url="https://huggingface.co/spaces/braintumor-flax/braintumor-flax",
):
    """Model 1 (view plane) and model 2 (tumour class) with what serving them needs."""

    def __init__(
        self,
        view_model: ViewClassifier,
        tumor_model: TumorClassifier,
        info: CheckpointInfo | None = None,
        metrics: dict[str, Any] | None = None,
        segmenter: TumorSegmenter | None = None,
        segmentation_record: dict[str, Any] | None = None,
    ):
        self.view_model = view_model
        self.tumor_model = tumor_model
        # Calibration temperatures, OOD statistics, training recipe and data provenance.
        self.info = info if info is not None else CheckpointInfo()
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.segmenter: TumorSegmenter | None = None
        self.segmentation_record: dict[str, Any] = {}
        # "float16" halves a checkpoint (benchmarks/compare_precision.py measures what it changes).
        self.storage_dtype = "float32"
        if segmenter is not None:
            self.attach_segmenter(segmenter, segmentation_record or {})

    def attach_segmenter(self, segmenter: TumorSegmenter, record: dict[str, Any]) -> None:
        """Add the tumour-mask decoder; it must have been trained on the VGG blocks of this trunk it reads."""
        blocks = segmenter.config.encoder_blocks
        for model in self.models.values():
            if trunk_digest(model.vgg, blocks) != segmenter.config.trunk_digest:
                raise ValueError(f"the segmenter was trained on other VGG blocks 1-{blocks} than this checkpoint's "
                                 "trunk")
        if segmenter.config.image_size != self.view_model.config.image_size:
            raise ValueError(f"the segmenter is for {segmenter.config.image_size} px, "
                             f"the classifiers for {self.view_model.config.image_size}")
        self.segmenter, self.segmentation_record = segmenter, dict(record)

    @property
    def models(self) -> dict[str, nnx.Module]:
        return {"view": self.view_model, "tumor": self.tumor_model}

    @property
    def shares_lower_blocks(self) -> bool:
        """True when both models hold identical frozen lower blocks, so the trunk can run once per image."""
        return self.info.shared_lower_blocks

    @property
    def shares_trunk(self) -> bool:
        """True when both models hold one whole trunk (the shared-trunk model): it runs once per image."""
        return self.info.shared_trunk

    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "library": "braintumor-flax",
            "library_version": __version__,
            "models": {task: model.config.to_dict() for task, model in self.models.items()},
            **self.info.to_dict(),
            **({"segmentation": {"config": self.segmenter.config.to_dict(), "training": self.segmentation_record}}
               if self.segmenter is not None else {}),
        }

    def _save_pretrained(self, save_directory: Path, *, dtype: str | None = None) -> None:
        """Write the folder; weights in `dtype`, default the pipeline's `storage_dtype` (loading computes in
        float32 whatever is stored)."""
        save_directory = Path(save_directory)
        dtype = dtype or self.storage_dtype
        view, tumor = flat_params(self.view_model), flat_params(self.tumor_model)
        shared, view_only, tumor_only = split_shared(view, tumor)
        split = self.view_model.config.lower_blocks
        lower_names = [k for k in view if any(f"block{b}_" in k for b in range(1, split + 1))]
        self.info.shared_lower_blocks = bool(lower_names) and all(k in shared for k in lower_names)
        trunk_names = [k for k in view if k.startswith("vgg.")]
        self.info.shared_trunk = bool(trunk_names) and all(k in shared for k in trunk_names)
        cast = (lambda d: {k: v.astype(dtype) for k, v in d.items()}) if dtype != "float32" else (lambda d: d)
        # One metadata key: safetensors writes its metadata map in hash order, so with two keys the same tensors
        # could give different bytes (and a new blob for git and the Hub) on every save.
        meta = {"format": f"braintumor-flax/{FORMAT_VERSION}"}
        save_file(cast(shared), str(save_directory / SHARED_FILE), metadata=meta)
        for task, only in (("view", view_only), ("tumor", tumor_only)):
            (save_directory / task).mkdir(parents=True, exist_ok=True)
            save_file(cast(only), str(save_directory / task / "model.safetensors"), metadata=meta)
            _write_json(save_directory / task / "config.json", self.models[task].config.to_dict())
            _write_json(save_directory / task / "metrics.json", self.metrics.get(task, {}))
        if self.segmenter is not None:
            (save_directory / SEGMENTATION_FILE).parent.mkdir(parents=True, exist_ok=True)
            save_file(cast(flat_params(self.segmenter)), str(save_directory / SEGMENTATION_FILE), metadata=meta)
        write_config(save_directory, self.config_dict())
        _write_json(save_directory / "metrics.json", self.metrics)
        (save_directory / "README.md").write_text(self.model_card())

    def model_card(self) -> str:
        return render_model_card(self.config_dict(), self.metrics)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **_: Any,
    ) -> BrainTumorPipeline:
        return cls.load_folder(checkpoint_folder(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token))

    @classmethod
    def load_folder(cls, folder: str | Path) -> BrainTumorPipeline:
        folder = Path(folder)
        config = read_config(folder)
        if not config:
            raise FileNotFoundError(f"no checkpoint at {folder} (config.json missing)")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder} was written by a newer braintumor-flax; upgrade to load it")
        shared = load_file(str(folder / SHARED_FILE)) if (folder / SHARED_FILE).is_file() else {}
        models = models_from_params(config, shared, {task: load_file(str(folder / task / "model.safetensors"))
                                                     for task in TASKS})
        segmenter, record = None, None
        if "segmentation" in config:
            params = load_file(str(folder / SEGMENTATION_FILE))
            segmenter = segmenter_from_params(config["segmentation"]["config"], params)
            record = config["segmentation"].get("training", {})
        pipeline = cls(models["view"], models["tumor"], info=CheckpointInfo.from_dict(config),
                       metrics=_read_json(folder / "metrics.json"), segmenter=segmenter, segmentation_record=record)
        # Saved again (evaluation writing its metrics), a float16 checkpoint stays float16: no new weight blobs.
        if any(v.dtype == np.float16 for v in shared.values()):
            pipeline.storage_dtype = "float16"
        return pipeline
