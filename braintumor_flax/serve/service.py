"""What the app and its API do with an image, independent of Gradio: decode → both models (+ Grad-CAM) →
OOD check → a result with plain-language summary and a JSON form.

One `BrainTumorService` per process holds the compiled models; a lock serialises model calls (XLA already
uses every core for one call, so two at once only contend), while decoding and encoding of other
requests run alongside.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from braintumor_flax import __version__
from braintumor_flax.data import medical
from braintumor_flax.data.imageio import ImageDecodeError, ImageSource, decode_image, to_model_input
from braintumor_flax.data.limits import MAX_IMAGE_BYTES, MAX_PIXELS, MAX_SIDE, RequestBudget, shape_reasons
from braintumor_flax.data.masks import mask_on_image, outline_contradicts, rle_encode
from braintumor_flax.labels import PLANES, TUMOR_CLASSES
from braintumor_flax.models.params import weights_digest
from braintumor_flax.ood import OODDetector, OODResult
from braintumor_flax.serve.overlay import draw_outline, gradcam_overlay
from braintumor_flax.serve.predictor import Prediction, Predictor, resolve_model_source

__all__ = ["MAX_IMAGE_BYTES", "MAX_PIXELS", "BrainTumorService", "Prepared", "SliceResult"]

TUMOR_DISAGREEMENT = ("the two models disagree: the classifier sees no tumour, but the segmentation model outlines "
                      "a tumour region, so treat \"no tumour\" as uncertain here")
PLANE_NAMES = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
TUMOR_NAMES = {"glioma": "Glioma", "meningioma": "Meningioma", "no_tumor": "No tumour", "pituitary": "Pituitary tumour"}


@dataclasses.dataclass
class SliceResult:
    """The answer for one input. `error` set ⇒ nothing else is."""

    name: str
    plane_probs: dict[str, float] | None = None
    tumor_probs: dict[str, float] | None = None
    ood: OODResult | None = None
    overlay: np.ndarray | None = None  # Grad-CAM over the slice, uint8 RGB (single-image path only)
    error: str | None = None
    compute_ms: float | None = None
    header_plane: str | None = None  # the plane a DICOM / NIfTI header states (None: a picture, or unstated)
    # The segmenter's answer on the input's own pixels (None: no segmenter, an error, or OOD), kept run-length
    # encoded: a batch of large images never holds one full-size mask per row.
    tumor_area_px: int | None = None
    mask_rle: dict[str, list[int]] | None = dataclasses.field(default=None, repr=False)
    pixel_area_mm2: float | None = None  # known for DICOM / NIfTI (pixel spacing in the header)

    @property
    def tumor_area_mm2(self) -> float | None:
        area = self.tumor_area_px
        return None if area is None or self.pixel_area_mm2 is None else area * self.pixel_area_mm2

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def plane(self) -> str | None:
        return None if self.plane_probs is None else max(self.plane_probs, key=self.plane_probs.__getitem__)

    @property
    def tumor(self) -> str | None:
        return None if self.tumor_probs is None else max(self.tumor_probs, key=self.tumor_probs.__getitem__)

    @property
    def is_ood(self) -> bool:
        return bool(self.ood and self.ood.flag)

    def summary(self) -> str:
        """One plain-language line."""
        if self.error:
            return f"Could not analyse this file: {self.error}"
        if self.is_ood:
            assert self.ood is not None
            return ("This does not look like a brain MRI slice, so no tumour class is given: "
                    + "; ".join(self.ood.reasons) + ".")
        assert self.plane_probs and self.tumor_probs and self.plane and self.tumor
        plane = f"{PLANE_NAMES[self.plane].lower()} slice ({self.plane_probs[self.plane]:.0%})"
        tumor_p = self.tumor_probs[self.tumor]
        if self.tumor == "no_tumor":
            finding = f"the model sees no tumour ({tumor_p:.0%})"
        else:
            finding = f"the model's most likely class is {TUMOR_NAMES[self.tumor].lower()} ({tumor_p:.0%})"
        hedge = " — low confidence, treat with extra caution" if tumor_p < 0.6 else ""
        return f"An {plane}; {finding}{hedge}." if plane[0] in "aeiou" else f"A {plane}; {finding}{hedge}."

    @property
    def models_disagree(self) -> bool:
        """The classifier answers "no tumour" while the segmenter outlines a region: two models trained apart
        disagree, so neither answer should be taken alone (how often such a slice is a tumour is measured by
        `evaluation.segmentation` and stated in the README)."""
        return self.ok and not self.is_ood and outline_contradicts(self.tumor, self.tumor_area_px)

    def segmentation_note(self) -> str:
        """The segmenter's finding in words, to append to the summary (empty without a segmenter)."""
        area = self.tumor_area_px
        if area is None:
            return ""
        if area == 0:
            return " The segmentation model outlines no tumour."
        mm2 = self.tumor_area_mm2
        size = f"{area:,} px" + (f", {mm2:,.0f} mm²" if mm2 is not None else "")
        note = f" Green outline: the segmentation model's tumour region ({size})."
        return note + (f" ⚠️ {TUMOR_DISAGREEMENT}." if self.models_disagree else "")

    def to_json(self, model_version: str) -> dict[str, Any]:
        """The API's answer: labels are null when the input failed or looks out of distribution."""
        out: dict[str, Any] = {"file": self.name, "ok": self.ok, "model_version": model_version}
        if not self.ok:
            out["error"] = self.error
            return out
        assert self.plane_probs is not None and self.tumor_probs is not None and self.ood is not None
        trusted = not self.is_ood

        def block(probs: dict[str, float], label: str | None) -> dict[str, Any]:
            return {"label": label if trusted else None, "confidence": round(probs[label], 6) if label else None,
                    "probabilities": {k: round(v, 6) for k, v in probs.items()}}

        out["plane"] = block(self.plane_probs, self.plane)
        out["tumor"] = block(self.tumor_probs, self.tumor)
        out["ood"] = self.is_ood
        out["ood_details"] = self.ood.to_dict()
        out["summary"] = self.summary()
        if self.header_plane is not None:
            # Issue 14: the file's own plane beside the model's; a disagreement is worth a second look.
            out["header_plane"] = self.header_plane
            out["plane_warning"] = (None if self.plane == self.header_plane else
                                    f"the file's header says {self.header_plane}, the model sees {self.plane}")
        if self.mask_rle is not None:
            mm2 = self.tumor_area_mm2
            out["segmentation"] = {"area_px": self.tumor_area_px, "area_mm2": None if mm2 is None else round(mm2, 3),
                                   "mask_rle": self.mask_rle}
            out["tumor_warning"] = TUMOR_DISAGREEMENT if self.models_disagree else None
        if self.compute_ms is not None:
            out["compute_ms"] = round(self.compute_ms, 1)
        return out


@dataclasses.dataclass
class Prepared:
    """A decoded image already shrunk to the model input (the full-size pixels are gone) + its original shape."""

    x: np.ndarray  # uint8 size x size x 3
    shape: tuple[int, int]  # original (height, width)


class BrainTumorService:
    def __init__(self, predictor: Predictor, *, source: str | Path | None = None, max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES):
        self.predictor = predictor
        self.source = str(source) if source is not None else None
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.ood = OODDetector(predictor.pipeline.info.ood)
        self._lock = threading.Lock()
        pipeline = predictor.pipeline
        self.mask_threshold = pipeline.segmenter.config.threshold if pipeline.segmenter is not None else 0.5
        recipe = pipeline.info.recipe
        weights = weights_digest(pipeline.view_model, pipeline.tumor_model)[:12]
        self.model_version = f"braintumor-flax {__version__} / weights {weights}" + (f" / {recipe}" if recipe else "")

    @classmethod
    def from_pretrained(cls, source: str | Path | None = None, *, warm_up: bool = True, batch_size: int = 8,
                        **kwargs: Any):
        """Checkpoint folder or Hub repo id; default $BRAINTUMOR_FLAX_MODEL, else ./checkpoints.

        batch_size 8: batches are padded to it, so a small batch request does not pay for 16 images.
        """
        resolved = resolve_model_source(source)
        service = cls(Predictor.from_pretrained(resolved, batch_size=batch_size), source=resolved, **kwargs)
        if warm_up:
            service.warm_up()
        return service

    def warm_up(self) -> None:
        """Compile the single-image path (Grad-CAM included) that the first request will use."""
        self.predictor.warm_up_explain()

    def warm_up_batch(self) -> None:
        """Compile the padded batch path (the app runs this in the background once it is serving)."""
        size = self.predictor.image_size
        self.predictor.explain_arrays(np.zeros((2, size, size, 3), np.uint8))

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, source: ImageSource, *, budget: RequestBudget | None = None) -> np.ndarray:
        """Path or bytes → uint8 RGB, or ImageDecodeError with a message fit for the user.

        Size, shape and the request's pixel budget are checked from the header, before decoding.
        """
        return self.decode_slice(source, budget=budget)[0]

    def decode_slice(self, source: ImageSource, *, budget: RequestBudget | None = None
                     ) -> tuple[np.ndarray, str | None, float | None]:
        """`decode`, plus what a DICOM header states: the plane and the area of a pixel in mm² (each None for a
        picture, or a header without it)."""
        if isinstance(source, str | Path):
            path = Path(source)
            if path.is_file() and path.stat().st_size > self.max_bytes:
                raise ImageDecodeError(f"file is {path.stat().st_size / 2**20:.1f} MB; the limit is "
                                       f"{self.max_bytes / 2**20:.0f} MB per image")
        elif isinstance(source, bytes | bytearray) and len(source) > self.max_bytes:
            raise ImageDecodeError(f"file is {len(source) / 2**20:.1f} MB; the limit is "
                                   f"{self.max_bytes / 2**20:.0f} MB per image")
        if not isinstance(source, Image.Image) and medical.is_dicom(source):
            # A single-slice DICOM (by content, any name) decodes like a picture, windowed (own limits).
            rgb, header_plane, info = medical.read_dicom_slice(source)
            return rgb, header_plane, info.get("pixel_area_mm2")
        budget = budget if budget is not None else RequestBudget()
        return decode_image(source, max_pixels=self.max_pixels, max_side=MAX_SIDE, admit=budget.admit), None, None

    def prepare(self, source: ImageSource, *, budget: RequestBudget | None = None) -> Prepared:
        """Decode and shrink at once: a batch holds model inputs (49 KB each), never full-size images."""
        rgb = self.decode(source, budget=budget)
        return Prepared(to_model_input(rgb, self.predictor.image_size), (int(rgb.shape[0]), int(rgb.shape[1])))

    # -- analysis ---------------------------------------------------------------------------------

    def _results(self, names: list[str], images: np.ndarray, prediction: Prediction, elapsed_ms: float,
                 shapes: list[tuple[int, int]]) -> list[SliceResult]:
        outputs = prediction.outputs
        features = outputs.lower_pooled if self.ood.feature == "lower_gap" else outputs.view_feature
        oods = [_with_shape(o, shape) for o, shape in zip(self.ood(features, images), shapes, strict=True)]
        results = [
            SliceResult(name, dict(zip(PLANES, map(float, prediction.view_probs[i]), strict=True)),
                        dict(zip(TUMOR_CLASSES, map(float, prediction.tumor_probs[i]), strict=True)),
                        oods[i], compute_ms=elapsed_ms / len(names))
            for i, name in enumerate(names)
        ]
        if outputs.mask_prob is not None:
            for result, prob, shape in zip(results, outputs.mask_prob, shapes, strict=True):
                if not result.is_ood:  # no mask for what does not look like a brain slice
                    mask = mask_on_image(prob, *shape, self.mask_threshold)
                    result.tumor_area_px, result.mask_rle = int(mask.sum()), rle_encode(mask)
        return results

    def analyze(self, rgb: np.ndarray, *, name: str = "image", gradcam: bool = True,
                pixel_area_mm2: float | None = None) -> SliceResult:
        """One decoded slice → probabilities, OOD check and (unless OOD) the Grad-CAM overlay with the tumour
        outline (when the checkpoint has a segmenter)."""
        x = to_model_input(rgb, self.predictor.image_size)[None]
        with self._lock:
            start = time.perf_counter()
            # One compiled single-image program serves both: the Grad-CAM's extra backward pass through
            # the small head costs little, a second compiled batch-1 forward would cost compile time and RAM.
            prediction = self.predictor.explain_arrays(x)
            elapsed = (time.perf_counter() - start) * 1000
        result = self._results([name], x, prediction, elapsed, [(int(rgb.shape[0]), int(rgb.shape[1]))])[0]
        result.pixel_area_mm2 = pixel_area_mm2
        if gradcam and not result.is_ood:
            result.overlay = _overlay(rgb, prediction, 0, result, self.mask_threshold)
        return result

    def analyze_many(self, items: list[tuple[str, Prepared | np.ndarray | str]], *, gradcam: bool = False,
                     pixel_area_mm2: float | None = None) -> list[SliceResult]:
        """(name, prepared input, decoded RGB or an error message) per input → one result per input, in order.

        Good images run through the models in batches; a bad one only fills its own row. `gradcam`: also
        the overlay of each in-distribution image (the volume view shows one per slice).
        """
        results: list[SliceResult | None] = [None] * len(items)
        good = [i for i, (_, value) in enumerate(items) if not isinstance(value, str)]
        for i, (name, value) in enumerate(items):
            if isinstance(value, str):
                results[i] = SliceResult(name, error=value)
        chunk = self.predictor.batch_size
        size = self.predictor.image_size
        for start in range(0, len(good), chunk):
            idx = good[start:start + chunk]
            x = np.stack([_model_input(items[i][1], size) for i in idx])  # type: ignore[arg-type]
            shapes = [_shape(items[i][1]) for i in idx]  # type: ignore[arg-type]
            with self._lock:  # per chunk, so single-image requests interleave with a long batch
                t0 = time.perf_counter()
                # The explaining program also yields the OOD feature; a lone image reuses the single-image one.
                prediction = self.predictor.explain_arrays(x)
                elapsed = (time.perf_counter() - t0) * 1000
            names = [items[i][0] for i in idx]
            for j, (i, result) in enumerate(zip(idx, self._results(names, x, prediction, elapsed, shapes),
                                                strict=True)):
                value = items[i][1]
                result.pixel_area_mm2 = pixel_area_mm2
                if gradcam and not result.is_ood and isinstance(value, np.ndarray):  # the volume view's slices
                    result.overlay = _overlay(value, prediction, j, result, self.mask_threshold)
                results[i] = result
        return [r for r in results if r is not None]


def _overlay(rgb: np.ndarray, prediction: Prediction, row: int, result: SliceResult, threshold: float) -> np.ndarray:
    """Grad-CAM over the slice, with the segmenter's outline on top when there is one."""
    shown = gradcam_overlay(rgb, prediction.outputs.cam[row])
    if result.tumor_area_px is not None and prediction.outputs.mask_prob is not None:
        shown = draw_outline(shown, mask_on_image(prediction.outputs.mask_prob[row], *shown.shape[:2], threshold))
    return shown


def _model_input(value: Prepared | np.ndarray, size: int) -> np.ndarray:
    return value.x if isinstance(value, Prepared) else to_model_input(value, size)


def _shape(value: Prepared | np.ndarray) -> tuple[int, int]:
    return value.shape if isinstance(value, Prepared) else (int(value.shape[0]), int(value.shape[1]))


def _with_shape(result: OODResult, shape: tuple[int, int]) -> OODResult:
    """Flag shapes no slice has (very elongated, tiny), with a plain reason, whatever the features say."""
    reasons = shape_reasons(*shape)
    if not reasons:
        return result
    return dataclasses.replace(result, flag=True, reasons=[*result.reasons, *reasons])
