"""Inference core: load both models once, compile once, run the shared trunk once per image, batch.

`Predictor.predict_arrays` is what the app, the API, evaluation and the benchmarks call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR

MODEL_ENV_VAR = "BRAINTUMOR_FLAX_MODEL"  # a local folder or a Hub repo id


@dataclasses.dataclass
class Prediction:
    """Per-image outputs for a batch (numpy, float32)."""

    view_probs: np.ndarray  # [N, 3]
    tumor_probs: np.ndarray  # [N, 4]
    view_feature: np.ndarray  # [N, 128]
    view_logits: np.ndarray
    tumor_logits: np.ndarray


def softmax_with_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def resolve_model_source(source: str | Path | None = None) -> str | Path:
    """Explicit argument, else $BRAINTUMOR_FLAX_MODEL (folder or Hub repo id), else ./checkpoints."""
    return source or os.environ.get(MODEL_ENV_VAR) or DEFAULT_CHECKPOINT_DIR


class Predictor:
    """Both models, compiled for fixed batch shapes (padding the last batch) so each shape compiles once."""

    def __init__(self, pipeline: BrainTumorPipeline, *, batch_size: int = 16):
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.image_size = pipeline.view_model.config.image_size
        calibration = pipeline.info.get("calibration", {})
        self.view_temperature = float(calibration.get("view_temperature", 1.0))
        self.tumor_temperature = float(calibration.get("tumor_temperature", 1.0))
        view_graph, view_state = nnx.split(pipeline.view_model)
        tumor_graph, tumor_state = nnx.split(pipeline.tumor_model)
        share = pipeline.shares_lower_blocks

        @jax.jit
        def forward(view_state, tumor_state, images):
            view = nnx.merge(view_graph, view_state)
            tumor = nnx.merge(tumor_graph, tumor_state)
            view_lower = view.lower(images)
            # Frozen lower blocks are identical in both models: compute them once and reuse.
            tumor_lower = view_lower if share else tumor.lower(images)
            view_logits, feature = view.from_lower(view_lower)
            tumor_logits = tumor.from_lower(tumor_lower, feature if tumor.config.use_view_feature else None)
            return view_logits, tumor_logits, feature

        self._states = (view_state, tumor_state)
        self._forward = forward

    @classmethod
    def from_pretrained(cls, source: str | Path | None = None, **kwargs) -> Predictor:
        return cls(BrainTumorPipeline.from_pretrained(resolve_model_source(source)), **kwargs)

    def warm_up(self) -> None:
        """Compile for the batch shape now, so the first request is not slow."""
        self.predict_arrays(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))

    def _padded_batches(self, images: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, real rows, uint8 batch) per chunk. A lone image (the interactive case) gets its own compiled
        batch-1 shape; every other chunk is zero-padded to batch_size, so each shape compiles once."""
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((1 if len(chunk) == 1 else self.batch_size, *chunk.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            yield start, len(chunk), padded

    def predict_arrays(self, images: np.ndarray) -> Prediction:
        """uint8 RGB [N, S, S, 3] at the model's image size → calibrated probabilities."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3] images, got {images.shape}")
        outs: list[tuple[np.ndarray, ...]] = []
        for _, n, padded in self._padded_batches(images):
            result = self._forward(*self._states, jnp.asarray(padded))
            outs.append(tuple(np.asarray(r)[:n] for r in result))
        if not outs:
            empty = np.zeros((0,), np.float32)
            return Prediction(empty.reshape(0, 3), empty.reshape(0, 4), empty.reshape(0, 128),
                              empty.reshape(0, 3), empty.reshape(0, 4))
        view_logits, tumor_logits, feature = (np.concatenate(parts) for parts in zip(*outs, strict=True))
        return Prediction(
            view_probs=softmax_with_temperature(view_logits, self.view_temperature),
            tumor_probs=softmax_with_temperature(tumor_logits, self.tumor_temperature),
            view_feature=feature.astype(np.float32),
            view_logits=view_logits,
            tumor_logits=tumor_logits,
        )

    # --- added for the app (issue 4): Grad-CAM in the same compiled call as the forward pass ---------

    def explain_arrays(
        self, images: np.ndarray, target: np.ndarray | None = None
    ) -> tuple[Prediction, np.ndarray, np.ndarray]:
        """`predict_arrays` plus, per image, a coarse Grad-CAM map [N, h, w] for the predicted tumour class (or
        `target`; see `braintumor_flax.gradcam`) and the spatial mean of the shared lower blocks' output
        [N, 512] (the OOD check's feature). Compiled once per batch shape, like `predict_arrays`."""
        from braintumor_flax.gradcam import GradCAM

        gradcam = getattr(self, "_gradcam", None)
        if gradcam is None:
            gradcam = self._gradcam = GradCAM(self.pipeline)
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3] images, got {images.shape}")
        targets = np.full((len(images),), -1, np.int32) if target is None else np.asarray(target, np.int32)
        parts = []
        for start, n, padded in self._padded_batches(images):
            chunk_targets = np.full((len(padded),), -1, np.int32)
            chunk_targets[:n] = targets[start : start + n]
            out = gradcam(padded, chunk_targets)
            parts.append([a[:n] for a in (out.view_logits, out.tumor_logits, out.view_feature, out.cam,
                                          out.lower_pooled)])
        if not parts:
            side = self.image_size // 16
            return self.predict_arrays(images), np.zeros((0, side, side), np.float32), np.zeros((0, 512), np.float32)
        view_logits, tumor_logits, feature, cams, pooled = (np.concatenate(p) for p in zip(*parts, strict=True))
        prediction = Prediction(
            view_probs=softmax_with_temperature(view_logits, self.view_temperature),
            tumor_probs=softmax_with_temperature(tumor_logits, self.tumor_temperature),
            view_feature=feature,
            view_logits=view_logits,
            tumor_logits=tumor_logits,
        )
        return prediction, cams, pooled

    def warm_up_explain(self) -> None:
        """Compile the Grad-CAM path for single images now (the app's interactive case)."""
        self.explain_arrays(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
