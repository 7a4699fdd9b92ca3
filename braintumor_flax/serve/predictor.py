"""The served predictor: both models from a checkpoint, one `Forward`, calibrated probabilities.

`Predictor.predict_arrays` / `explain_arrays` are what the app, the API and the benchmarks call.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from braintumor_flax.calibration import softmax
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models.forward import Forward, Outputs
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR

MODEL_ENV_VAR = "BRAINTUMOR_FLAX_MODEL"  # a local folder or a Hub repo id


@dataclasses.dataclass
class Prediction:
    """Per-image calibrated probabilities with the raw outputs they came from (numpy, float32)."""

    view_probs: np.ndarray  # [N, 3]
    tumor_probs: np.ndarray  # [N, 4]
    outputs: Outputs  # logits, view feature and whatever else the call asked for (Grad-CAM, pooled lower)

    @property
    def view_logits(self) -> np.ndarray:
        return self.outputs.view_logits

    @property
    def tumor_logits(self) -> np.ndarray:
        return self.outputs.tumor_logits

    @property
    def view_feature(self) -> np.ndarray:
        return self.outputs.view_feature


def resolve_model_source(source: str | Path | None = None) -> str | Path:
    """Explicit argument, else $BRAINTUMOR_FLAX_MODEL (folder or Hub repo id), else ./checkpoints."""
    return source or os.environ.get(MODEL_ENV_VAR) or DEFAULT_CHECKPOINT_DIR


class Predictor:
    """Both models behind one compiled forward (a lone image gets its own batch-1 program)."""

    def __init__(self, pipeline: BrainTumorPipeline, *, batch_size: int = 16):
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.forward = Forward.from_pipeline(pipeline, batch_size=batch_size, lone_chunk_own_shape=True)
        self.image_size = self.forward.image_size
        self.calibration = pipeline.info.calibration

    @classmethod
    def from_pretrained(cls, source: str | Path | None = None, **kwargs) -> Predictor:
        return cls(BrainTumorPipeline.from_pretrained(resolve_model_source(source)), **kwargs)

    def _calibrated(self, outputs: Outputs) -> Prediction:
        return Prediction(softmax(outputs.view_logits, self.calibration.view_temperature),
                          softmax(outputs.tumor_logits, self.calibration.tumor_temperature), outputs)

    def predict_arrays(self, images: np.ndarray) -> Prediction:
        """uint8 RGB [N, S, S, 3] at the model's image size → calibrated probabilities."""
        return self._calibrated(self.forward(images))

    def explain_arrays(self, images: np.ndarray, target: np.ndarray | None = None) -> Prediction:
        """`predict_arrays` plus, per image, a coarse Grad-CAM map (`outputs.cam`, [N, h, w]) for the predicted
        tumour class (or `target`) and the pooled lower-block output (`outputs.lower_pooled`, [N, 512], the OOD
        check's feature), and the tumour mask (`outputs.mask_prob`) when the checkpoint has a segmenter, all from
        the same compiled call."""
        return self._calibrated(self.forward(images, explain=True, target=target, pooled=True,
                                             segment=self.forward.has_segmenter))

    def warm_up_explain(self) -> None:
        """Compile the Grad-CAM path for single images now (the app's interactive case)."""
        self.explain_arrays(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
