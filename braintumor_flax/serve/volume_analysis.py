"""A volume through the app's one batched forward path: every slice of a cut → `analyze_many` → per-slice
answers, and a volume summary that says how it was aggregated.

Aggregation (stated in every summary): only slices that look like brain MRI (not OOD) count. A tumour
class is reported when at least `MIN_TUMOUR_SLICES` of them (or the only slice, for a one-slice file) have a
tumour class as their most likely class; the reported class is the tumour class with the highest mean
probability over those slices. Otherwise the volume is "no_tumor".
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from braintumor_flax.data.medical import limits
from braintumor_flax.data.medical.volume import Volume
from braintumor_flax.labels import PLANES, TUMOR_CLASSES
from braintumor_flax.serve.service import BrainTumorService, SliceResult

MIN_TUMOUR_SLICES = 2
IN_FLIGHT_CHUNKS = 2  # analyze_volume: one chunk in the model, one in host pre/post-processing
TUMOURS = tuple(c for c in TUMOR_CLASSES if c != "no_tumor")
AGGREGATION = (f"slices that look like brain MRI only; a tumour class is reported when at least {MIN_TUMOUR_SLICES} "
               "of them (or the only slice) have a tumour as their most likely class, and it is the tumour class "
               "with the highest mean probability over those slices; otherwise no tumour")


def ranges(indices: list[int]) -> str:
    """[2, 3, 4, 8] → "3–5, 9" (1-based slice numbers, for people)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a + 1) if a == b else f"{a + 1}–{b + 1}" for a, b in runs)


@dataclasses.dataclass
class VolumeAnalysis:
    name: str
    plane: str  # the cut: also the header plane of every slice when the file states its orientation
    info: dict[str, Any]
    slices: list[SliceResult]
    images: list[np.ndarray]  # each slice as shown (uint8 RGB), for the slider (empty without gradcam)

    @property
    def header_plane(self) -> str | None:
        return self.plane if self.info.get("orientation_known", True) else None

    def summary(self) -> dict[str, Any]:
        assessed = [i for i, r in enumerate(self.slices) if r.ok and not r.is_ood]
        counts = Counter(self.slices[i].tumor for i in assessed)
        tumour = [i for i in assessed if self.slices[i].tumor != "no_tumor"]
        out: dict[str, Any] = {
            "n_slices": len(self.slices), "n_assessed": len(assessed),
            "not_assessed": ranges([i for i in range(len(self.slices)) if i not in set(assessed)]),
            "class_counts": {c: counts.get(c, 0) for c in TUMOR_CLASSES},
            "tumour_slices": ranges(tumour), "aggregation": AGGREGATION,
        }
        enough = len(tumour) >= MIN_TUMOUR_SLICES or (len(self.slices) == 1 and tumour)
        if not assessed:
            out.update(label=None, confidence=None, mean_probabilities=None)
        elif enough:
            means = {c: float(np.mean([self.slices[i].tumor_probs[c] for i in tumour])) for c in TUMOURS}  # type: ignore[index]
            label = max(means, key=means.__getitem__)
            out.update(label=label, confidence=round(means[label], 6),
                       mean_probabilities={c: round(v, 6) for c, v in means.items()})
        else:
            mean_no = float(np.mean([self.slices[i].tumor_probs["no_tumor"] for i in assessed]))  # type: ignore[index]
            out.update(label="no_tumor", confidence=round(mean_no, 6), mean_probabilities=None)
        if assessed:
            peak = max(((i, c) for i in assessed for c in TUMOURS),
                       key=lambda ic: self.slices[ic[0]].tumor_probs[ic[1]])  # type: ignore[index]
            out["peak"] = {"slice": peak[0] + 1, "class": peak[1],
                           "probability": round(self.slices[peak[0]].tumor_probs[peak[1]], 6)}  # type: ignore[index]
        planes = Counter(self.slices[i].plane for i in assessed)
        model_plane = planes.most_common(1)[0][0] if planes else None
        out["header_plane"] = self.header_plane
        out["model_plane"] = model_plane
        out["model_plane_counts"] = {p: planes.get(p, 0) for p in PLANES}
        warnings = []
        if self.header_plane and assessed:
            agree = planes.get(self.header_plane, 0)
            out["plane_agreement"] = round(agree / len(assessed), 4)
            if model_plane != self.header_plane:
                warnings.append(f"the file's header says these are {self.header_plane} slices, but the model sees "
                                f"{model_plane} on most of them ({planes[model_plane]} of {len(assessed)})")
        disagree = [i for i in assessed if self.slices[i].models_disagree]
        if disagree:
            out["disagreeing_slices"] = ranges(disagree)
            warnings.append(f"on slices {ranges(disagree)} the classifier sees no tumour but the segmentation model "
                            "outlines a tumour region")
        if self.info.get("oblique"):
            warnings.append("the scan is oblique: the plane given is only the nearest of the three")
        if self.info.get("n_volumes", 1) > 1:
            warnings.append(f"a 4-D file: volume {self.info['volume_index']} of 0..{self.info['n_volumes'] - 1} "
                            "was analysed")
        out["warnings"] = warnings
        out.update(self._tumour_volume(assessed))
        return out

    def _tumour_volume(self, assessed: list[int]) -> dict[str, Any]:
        """The segmenter's tumour volume: segmented area of every assessed slice × the spacing between slices."""
        areas = [self.slices[i].tumor_area_mm2 for i in assessed]
        if not assessed or self.slices[assessed[0]].tumor_area_px is None:
            return {}
        out: dict[str, Any] = {"segmented_slices": ranges([i for i in assessed if self.slices[i].tumor_area_px])}
        thickness = self.info.get("slice_thickness_mm")
        if thickness and all(a is not None for a in areas):
            out["tumour_volume_ml"] = round(sum(areas) * thickness / 1000.0, 3)  # type: ignore[arg-type]
            out["tumour_volume_method"] = ("sum over the assessed slices of the segmented area (mm²) × the spacing "
                                           f"between slices ({thickness} mm)")
        return out

    def slice_json(self, i: int, model_version: str) -> dict[str, Any]:
        r = self.slices[i]
        row = r.to_json(model_version)
        for key in ("file", "model_version", "compute_ms"):
            row.pop(key, None)
        return {"slice": i + 1, **row}

    def to_json(self, model_version: str) -> dict[str, Any]:
        # Model time of all slices together (the rest of a request is reading, cutting and transfer).
        compute = sum(r.compute_ms or 0.0 for r in self.slices)
        return {"file": self.name, "model_version": model_version, "plane": self.plane,
                "volume": self.info, "summary": self.summary(), "compute_ms": round(compute, 1),
                "slices": [self.slice_json(i, model_version) for i in range(len(self.slices))]}


def analyze_volume(service: BrainTumorService, volume: Volume, plane: str | None = None, *, name: str = "volume",
                   gradcam: bool = True, progress: Callable[[int, int], None] | None = None) -> VolumeAnalysis:
    """Every slice of the cut along `plane` (default: the plane the file was acquired in) through the
    service's batched path, one batch at a time (so progress can be shown, and other requests interleave)."""
    plane = plane or volume.acquired_plane or "axial"
    n = volume.n_slices(plane)
    limits.check_slices(n)
    header_plane = plane if volume.orientation_known else None
    chunk = service.predictor.batch_size
    area = volume.pixel_area_mm2(plane)

    def run_chunk(start: int) -> tuple[list[np.ndarray], list[SliceResult]]:
        rgbs = [volume.slice_rgb(plane, i) for i in range(start, min(n, start + chunk))]
        return rgbs, service.analyze_many([(f"{name} [{plane} slice {start + j + 1}/{n}]", rgb)
                                           for j, rgb in enumerate(rgbs)], gradcam=gradcam, pixel_area_mm2=area)

    slices: list[SliceResult] = []
    images: list[np.ndarray] = []

    def collect(done: Future) -> None:
        rgbs, results = done.result()
        for r in results:
            r.header_plane = header_plane
        slices.extend(results)
        if gradcam:  # only the view shows them; the API's request need not hold every slice in memory
            images.extend(rgbs)
        if progress is not None:
            progress(len(slices), n)

    # Two chunks in flight, taken in order: while one is in the model, the other is being cut and resized or
    # its answers post-processed (the service's lock serialises the model calls themselves), so host work
    # fills the cores XLA leaves idle between calls instead of adding to the total.
    with ThreadPoolExecutor(max_workers=IN_FLIGHT_CHUNKS, thread_name_prefix="volume") as pool:
        pending: deque[Future] = deque()
        for start in range(0, n, chunk):
            pending.append(pool.submit(run_chunk, start))
            if len(pending) == IN_FLIGHT_CHUNKS:
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
    info = {**volume.info(plane), "orientation_known": volume.orientation_known}
    return VolumeAnalysis(name, plane, info, slices, images)
