"""The app's volume tab and its API: a DICOM file / series .zip / NIfTI → every slice through the model,
with a progress bar, a slider over the slices (each with its answers and Grad-CAM), a plot of the tumour
probabilities along the volume, and the volume summary.

Endpoints (named, through the queue):
  /predict_volume   file, plane ("as acquired" | axial | coronal | sagittal), volume index (4-D NIfTI) → JSON
  /volume_view      the tab's own event (undocumented)
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from braintumor_flax.data.medical.reader import read_volume
from braintumor_flax.data.medical.volume import MedicalFormatError
from braintumor_flax.labels import PLANES, TUMOR_CLASSES
from braintumor_flax.serve import uploads as batch
from braintumor_flax.serve.service import PLANE_NAMES, TUMOR_NAMES, BrainTumorService
from braintumor_flax.serve.volume_analysis import VolumeAnalysis, analyze_volume

AS_ACQUIRED = "as acquired"
PLANE_CHOICES = [AS_ACQUIRED, *PLANES]
STATE_TTL_S = 3600  # a session's slice images are dropped after an hour without use
log = logging.getLogger(__name__)


def _error(message: str) -> gr.Error:
    return gr.Error(message, title="Cannot analyse this scan", print_exception=False)


def _path(payload: Any) -> str:
    if isinstance(payload, str) and payload:
        return payload
    if isinstance(payload, dict) and payload.get("path"):
        return str(payload["path"])
    raise _error("no file received; send one DICOM file, a .zip of one DICOM series, or a NIfTI file")


def _plane(choice: Any) -> str | None:
    text = str(choice or AS_ACQUIRED).strip().lower()
    if text in (AS_ACQUIRED, "acquired", "auto", ""):
        return None
    if text not in PLANES:
        raise _error(f"unknown plane {choice!r}; choose one of {', '.join(PLANE_CHOICES)}")
    return text


def _volume_index(value: Any) -> int:
    try:
        index = int(value if value is not None else 0)
    except (TypeError, ValueError):
        raise _error("the volume index must be a whole number (0 for the first volume of a 4-D file)") from None
    if index != (value or 0) or index < 0:
        raise _error("the volume index must be a whole number ≥ 0")
    return index


class VolumeFunctions:
    def __init__(self, service: BrainTumorService):
        self.service = service

    def run(self, file: Any, plane: Any, volume_index: Any, progress: Callable[[int, int], None] | None = None,
            *, gradcam: bool = True) -> VolumeAnalysis:
        path = _path(file)
        name = batch.display_name(os.path.basename(path))  # the client's own file name, never the server path
        cut, index = _plane(plane), _volume_index(volume_index)  # the request's own fields first, then the file
        try:
            volume = read_volume(path, volume_index=index)
            return analyze_volume(self.service, volume, cut, name=name, progress=progress, gradcam=gradcam)
        except MedicalFormatError as exc:
            raise _error(str(exc)) from None
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader bug must not crash the request or leak details
            log.error("volume analysis failed: %s", type(exc).__name__)  # the type only: messages may quote data
            raise _error("this file could not be read (unexpected error while decoding it)") from None

    def predict_volume(self, file: Any, plane: Any = AS_ACQUIRED, volume_index: Any = 0) -> dict[str, Any]:
        """API /predict_volume: per-slice JSON and the volume summary."""
        # No overlays: the JSON carries none (the maps are computed in the same call either way).
        return self.run(file, plane, volume_index, gradcam=False).to_json(self.service.model_version)

    def volume_view(self, file: Any, plane: Any, volume_index: Any,
                    progress: Any = gr.Progress()) -> tuple:  # noqa: B008 - Gradio injects its tracker via this default
        """The tab: (summary, probability plot, slider, slice image, slice label, slice line, state)."""
        if file is None:
            return "", None, gr.Slider(visible=False), None, None, "", None

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Analysing slices", unit="slices")

        analysis = self.run(file, plane, volume_index, progress=report)
        state = _view_state(analysis)
        summary = analysis.summary()
        start = (summary.get("peak") or {}).get("slice", 1)
        image, label, line = show_slice(start, state)
        slider = gr.Slider(minimum=1, maximum=len(analysis.slices), value=start, step=1, visible=True,
                           label=f"{PLANE_NAMES[analysis.plane]} slice")
        return summary_markdown(analysis, summary), probability_frame(analysis), slider, image, label, line, state


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _view_state(analysis: VolumeAnalysis) -> list[dict[str, Any]]:
    """Per slice: the image to show (Grad-CAM overlay unless not assessed) as JPEG bytes — a session keeps
    ~15 kB a slice, not a raw array — its label dict and one line."""
    rows = []
    n = len(analysis.slices)
    for i, r in enumerate(analysis.slices):
        shown = _jpeg(r.overlay if r.overlay is not None else analysis.images[i])
        if r.ok and not r.is_ood:
            assert r.tumor_probs is not None and r.plane_probs is not None and r.plane is not None
            label = {TUMOR_NAMES[k]: v for k, v in r.tumor_probs.items()}
            line = (f"Slice {i + 1}/{n}: {r.summary()}"
                    + (f" ⚠️ The header says {r.header_plane}." if r.header_plane and r.plane != r.header_plane
                       else "") + r.segmentation_note())
        else:
            label = None
            line = f"Slice {i + 1}/{n}: not assessed — {r.summary()}"
        rows.append({"image": shown, "label": label, "line": line})
    return rows


def show_slice(index: Any, state: list[dict[str, Any]] | None) -> tuple[Any, Any, str]:
    if not state:
        return None, None, ""
    i = min(max(int(index or 1), 1), len(state)) - 1
    row = state[i]
    return Image.open(io.BytesIO(row["image"])), row["label"], row["line"]


def probability_frame(analysis: VolumeAnalysis) -> pd.DataFrame:
    """Long format for gr.LinePlot: one row per (slice, tumour class); slices not assessed are left out."""
    rows = [{"slice": i + 1, "class": TUMOR_NAMES[c], "probability": r.tumor_probs[c]}
            for i, r in enumerate(analysis.slices) if r.ok and not r.is_ood and r.tumor_probs
            for c in TUMOR_CLASSES]
    return pd.DataFrame(rows, columns=["slice", "class", "probability"])


def summary_markdown(analysis: VolumeAnalysis, summary: dict[str, Any]) -> str:
    info = analysis.info
    shape = " × ".join(map(str, info["shape_ras"]))
    spacing = " × ".join(f"{s:g}" for s in info["spacing_mm"])
    header = summary["header_plane"]
    lines = [f"**Scan:** {info['format']}, {shape} voxels (R-L × A-P × S-I), {spacing} mm. "
             f"Window: {info['window_source']}.",
             f"**Cut:** {analysis.plane} — {summary['n_slices']} slices, {summary['n_assessed']} look like brain MRI "
             f"and were assessed. **Header plane:** {header or 'not stated in the file'}; "
             f"**model's plane:** {summary['model_plane'] or '—'}."]
    label = summary["label"]
    if label is None:
        lines.append("**Volume answer:** none — no slice looks like a brain MRI slice.")
    elif label == "no_tumor":
        lines.append(f"**Volume answer:** no tumour (fewer than two slices show a tumour as most likely; "
                     f"mean no-tumour probability {summary['confidence']:.0%}).")
    else:
        lines.append(f"**Volume answer:** {TUMOR_NAMES[label].lower()} (mean {summary['confidence']:.0%} over the "
                     f"slices {summary['tumour_slices']}).")
    if summary.get("peak"):
        p = summary["peak"]
        lines.append(f"Highest tumour probability: slice {p['slice']}, {TUMOR_NAMES[p['class']].lower()} "
                     f"{p['probability']:.0%}.")
    if "tumour_volume_ml" in summary:
        lines.append(f"**Segmented tumour volume:** {summary['tumour_volume_ml']:.1f} mL "
                     f"(slices {summary['segmented_slices'] or 'none'}; {summary['tumour_volume_method']}).")
    lines.append(f"*How it was aggregated:* {summary['aggregation']}.")
    lines += [f"⚠️ {w}." for w in summary["warnings"]]
    return "\n\n".join(lines)


def build_volume_tab(fns: VolumeFunctions, shared: dict[str, Any]) -> None:
    """The "Volume" tab; call inside a gr.Blocks."""
    with gr.Tab("Volume (DICOM / NIfTI)"):
        gr.Markdown("Upload a **DICOM** file (one slice or multi-frame), a **.zip of one DICOM series**, or a "
                    "**NIfTI** volume (`.nii`, `.nii.gz`). Every slice goes through the models. Only pixel data "
                    "and geometry are read from the file; no patient data is shown or kept.")
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="DICOM / series .zip / NIfTI", file_count="single", type="filepath",
                               elem_id="volume-input")
                plane = gr.Radio(PLANE_CHOICES, value=AS_ACQUIRED, label="Cut the volume along",
                                 elem_id="volume-plane")
                index = gr.Number(value=0, precision=0, minimum=0, label="Volume (4-D NIfTI only)",
                                  elem_id="volume-index")
                run = gr.Button("Analyse volume", variant="primary", elem_id="volume-button")
                summary = gr.Markdown(elem_id="volume-summary")
            with gr.Column(scale=1):
                slider = gr.Slider(1, 2, value=1, step=1, label="Slice", visible=False, elem_id="volume-slider")
                image = gr.Image(label="Slice with Grad-CAM (predicted class)", type="numpy", format="jpeg",
                                 interactive=False, elem_id="volume-slice")
                line = gr.Markdown(elem_id="volume-slice-line")
                label = gr.Label(label="Tumour class (this slice)", num_top_classes=4, elem_id="volume-label")
        plot = gr.LinePlot(x="slice", y="probability", color="class", y_lim=[0, 1],
                           title="Tumour-class probability along the volume", elem_id="volume-plot")
        state = gr.State(None, time_to_live=STATE_TTL_S)
        run.click(fns.volume_view, inputs=[file, plane, index],
                  outputs=[summary, plot, slider, image, label, line, state], api_name="volume_view",
                  api_visibility="undocumented", **shared)
        slider.change(show_slice, inputs=[slider, state], outputs=[image, label, line], api_visibility="private",
                      show_progress="hidden", queue=False)


def register_volume_api(fns: VolumeFunctions, trigger: gr.Button, shared: dict[str, Any]) -> None:
    """The /predict_volume endpoint on hidden components; call inside the hidden row of gr.Blocks."""
    api_file = gr.File(file_count="single", type="filepath")
    api_plane = gr.Textbox(value=AS_ACQUIRED)
    api_index = gr.Number(value=0, precision=0)
    api_out = gr.JSON()
    trigger.click(fns.predict_volume, inputs=[api_file, api_plane, api_index], outputs=[api_out],
                  api_name="predict_volume",
                  api_description="A DICOM file / .zip of one DICOM series / NIfTI → per-slice answers + volume "
                                  "summary.", **shared)


__all__ = ["VolumeFunctions", "build_volume_tab", "register_volume_api"]
