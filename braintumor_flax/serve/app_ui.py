"""The Gradio 6 app: single-slice view, batch view, and the named API endpoints.

Endpoints (all through the queue, callable with `gradio_client`):
  /predict        one image file → JSON (plane + probabilities, tumour + probabilities, OOD flag, model version)
  /predict_batch  image files and/or .zip archives → JSON (one result per image, per-class counts)
  /analyze        the single-slice view's own event: plane label, tumour label, Grad-CAM overlay, summary
  /predict_volume DICOM file / series .zip / NIfTI → per-slice JSON + volume summary (serve/volume_ui.py)
Bad input raises `gr.Error` with a message for the user; the server carries on.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from braintumor_flax.data.imageio import ImageDecodeError
from braintumor_flax.data.limits import RequestBudget
from braintumor_flax.paths import PROJECT_ROOT
from braintumor_flax.serve import request_limits
from braintumor_flax.serve import uploads as batch
from braintumor_flax.serve.service import PLANE_NAMES, TUMOR_NAMES, BrainTumorService, SliceResult
from braintumor_flax.serve.volume_ui import VolumeFunctions, build_volume_tab, register_volume_api

EXAMPLES_DIR = PROJECT_ROOT / "examples"
MAX_UPLOAD = "64mb"  # Gradio refuses larger uploads before our code runs (zip archives included)
QUEUE_MAX_SIZE = 64  # waiting requests beyond this are refused at once instead of timing out
# Model calls are serialised by the service's lock (one XLA call already uses both vCPUs of a basic Space);
# 2 workers let one request decode/encode while another computes.
CONCURRENCY = 2
CONCURRENCY_ID = "model"

NOTICE = (
    "⚠️ **Research demo — not a medical device and not a diagnosis.** The models were trained on two public "
    "datasets of 2-D T1 brain MRI slices and can be wrong, including confidently wrong. Never use the output "
    "for a clinical decision; talk to a qualified clinician."
)
CREDIT = (
    "Example slices from **BRISC 2025** (Fateh et al., *BRISC: Annotated Dataset for Brain Tumor Segmentation "
    "and Classification*, arXiv:2506.14318), licensed [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/)."
)
NOT_ASSESSED = "Not assessed: this does not look like a brain MRI slice"
CSS = "#notice {border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb;}"


log = logging.getLogger(__name__)


def _user_error(message: str, title: str = "Cannot analyse this input") -> gr.Error:
    # print_exception=False: a bad upload is the user's mistake, not a server fault worth a traceback.
    return gr.Error(message, title=title, print_exception=False)


def _payload_path(payload: Any) -> str | None:
    """The server-side path of an uploaded file: a str (preprocessed File) or a FileData/ImageData dict."""
    if payload is None:
        return None
    if isinstance(payload, str | Path):
        return str(payload)
    if isinstance(payload, dict) and payload.get("path"):
        return str(payload["path"])
    raise _user_error("unrecognised upload; send one image file")


def _upload_name(path: str) -> str:
    # Gradio stores an upload as <cache>/<hash>/<client's file name, sanitised>: show that name only.
    return batch.display_name(os.path.basename(path))


def example_files(folder: Path = EXAMPLES_DIR) -> list[str]:
    return sorted(str(p) for p in folder.glob("*") if p.suffix.lower() in batch.IMAGE_SUFFIXES)


class AppFunctions:
    """The endpoint functions, bound to one service (kept apart from the layout so tests can call them)."""

    def __init__(self, service: BrainTumorService, *, csv_keep: int = 32):
        self.service = service
        self._csv_dirs: deque[Path] = deque()
        self._csv_keep = csv_keep
        self._csv_lock = threading.Lock()

    # -- single image ------------------------------------------------------------------------------

    def _analyze_path(self, path: str, *, gradcam: bool) -> SliceResult:
        try:
            # The service recognises a DICOM slice by content (it need not end in .dcm) and gives its plane.
            rgb, header_plane, pixel_area_mm2 = self.service.decode_slice(path)
        except ImageDecodeError as exc:
            raise _user_error(exc.reason, "Cannot read this image") from None
        except MemoryError:
            raise _user_error("image too large to decode in memory", "Cannot read this image") from None
        except Exception:  # never Gradio's generic error page for an upload; the log keeps the details
            log.exception("unexpected error decoding an upload")
            raise _user_error("this file could not be decoded (unexpected internal error; reported in the server "
                              "log)", "Cannot read this image") from None
        result = self.service.analyze(rgb, name=_upload_name(path), gradcam=gradcam, pixel_area_mm2=pixel_area_mm2)
        result.header_plane = header_plane
        return result

    def analyze(self, image: Any) -> tuple[Any, Any, np.ndarray | None, str]:
        """Single-slice view: (plane label, tumour label, Grad-CAM overlay, one-line summary)."""
        path = _payload_path(image)
        if path is None:  # the input was cleared
            return None, None, None, ""
        result = self._analyze_path(path, gradcam=True)
        if result.is_ood:
            return NOT_ASSESSED, NOT_ASSESSED, None, f"⚠️ {result.summary()}"
        assert result.plane_probs is not None and result.tumor_probs is not None
        plane = {PLANE_NAMES[k]: v for k, v in result.plane_probs.items()}
        tumour = {TUMOR_NAMES[k]: v for k, v in result.tumor_probs.items()}
        summary = result.summary()
        if result.header_plane and result.header_plane != result.plane:  # a DICOM whose header disagrees
            summary += f" ⚠️ The file's header says {result.header_plane}."
        summary += result.segmentation_note()
        return plane, tumour, result.overlay, summary

    def predict(self, file: Any) -> dict[str, Any]:
        """API /predict: one image file → JSON."""
        path = _payload_path(file)
        if path is None:
            raise _user_error("no file received; send one image file")
        return self._analyze_path(path, gradcam=False).to_json(self.service.model_version)

    # -- batch ------------------------------------------------------------------------------------

    def _run_batch(self, files: Any) -> list[SliceResult]:
        paths = [p for p in (_payload_path(f) for f in (files or [])) if p]
        if not paths:
            raise _user_error("no files received; upload images or a .zip of images")
        try:
            items = batch.collect([(_upload_name(p), p) for p in paths])
        except batch.BatchError as exc:
            raise _user_error(str(exc), "Batch too large") from None
        if not items:
            raise _user_error("the upload holds no images (empty archive?)")
        budget = RequestBudget()  # one pixel budget for the whole request; each item shrunk once decoded
        deadline = time.monotonic() + request_limits.REQUEST_TIME_LIMIT_S
        return self.service.analyze_many(batch.decode_items(
            items, lambda source: self.service.prepare(source, budget=budget), deadline=deadline))

    def predict_batch(self, files: Any) -> dict[str, Any]:
        """API /predict_batch: files and/or .zip archives → JSON with one result per image and counts."""
        results = self._run_batch(files)
        version = self.service.model_version
        return {"model_version": version, "counts": batch.counts(results),
                "results": [r.to_json(version) for r in results]}

    def batch_view(self, files: Any) -> tuple[list[list[Any]], list[list[Any]], Any, str]:
        """Batch view: (results table, counts table, CSV download button, summary line)."""
        results = self._run_batch(files)
        c = batch.counts(results)
        count_rows = ([[TUMOR_NAMES[k], v] for k, v in c["tumor"].items()]
                      + [[PLANE_NAMES[k], v] for k, v in c["plane"].items()]
                      + [["Not brain MRI (not assessed)", c["other"]["not_mri"]],
                         ["Unreadable files", c["other"]["errors"]]])
        csv_path = self._new_csv(results)
        line = (f"{c['other']['total']} file(s): {c['other']['analysed']} analysed, "
                f"{c['other']['not_mri']} not like a brain MRI slice, {c['other']['errors']} unreadable.")
        return (batch.table_rows(results), count_rows,
                gr.DownloadButton("Download results (CSV)", value=str(csv_path), visible=True), line)

    def _new_csv(self, results: list[SliceResult]) -> Path:
        path = batch.write_csv(results)
        with self._csv_lock:  # keep only the latest few: a long-running Space must not fill its disk
            self._csv_dirs.append(path.parent)
            while len(self._csv_dirs) > self._csv_keep:
                shutil.rmtree(self._csv_dirs.popleft(), ignore_errors=True)
        return path


def build_demo(service: BrainTumorService, *, examples: list[str] | None = None) -> gr.Blocks:
    """The whole app as a gr.Blocks (not launched; call `configure_queue` and `launch`)."""
    fns = AppFunctions(service)
    examples = example_files() if examples is None else examples
    shared = {"concurrency_limit": CONCURRENCY, "concurrency_id": CONCURRENCY_ID}

    # delete_cache: every 10 min drop uploads/outputs older than 1 h, so a long-lived Space stays small.
    with gr.Blocks(title="Brain MRI: view plane and tumour class", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# Brain MRI slice: view plane and tumour class")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Tab("One slice"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Brain MRI slice (JPG, PNG, TIFF, BMP, WebP)", type="filepath",
                                     image_mode=None, sources=["upload", "clipboard"], elem_id="slice-input")
                    analyse = gr.Button("Analyse", variant="primary", elem_id="analyse-button")
                    if examples:
                        gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Examples (click one)",
                                    cache_examples=False, examples_per_page=len(examples))
                        gr.Markdown(CREDIT)
                with gr.Column(scale=1):
                    summary = gr.Markdown(elem_id="summary")
                    plane = gr.Label(label="View plane", num_top_classes=3, elem_id="plane-label")
                    tumour = gr.Label(label="Tumour class", num_top_classes=4, elem_id="tumour-label")
                    cam = gr.Image(label="Grad-CAM: where the tumour model looked (predicted class)",
                                   type="numpy", format="jpeg", interactive=False, elem_id="gradcam")
            # preprocess=False: our decoder (with its limits and clear messages) reads the upload, not
            # Gradio's; Gradio still checks the path is one of its own uploads.
            gr.on([image.change, analyse.click], fns.analyze, inputs=[image], outputs=[plane, tumour, cam, summary],
                  api_name="analyze", preprocess=False, trigger_mode="always_last", **shared)
        with gr.Tab("Batch"):
            gr.Markdown(f"Upload many slices and/or `.zip` archives of slices (up to {batch.MAX_BATCH_IMAGES} "
                        "images). Each file gets a row; an unreadable file is reported on its own row.")
            files = gr.File(label="Slices or .zip archives", file_count="multiple",
                            file_types=["image", ".zip", ".dcm"], elem_id="batch-input")
            run_batch = gr.Button("Analyse all", variant="primary", elem_id="batch-button")
            batch_line = gr.Markdown(elem_id="batch-summary")
            with gr.Row():
                table = gr.Dataframe(headers=batch.TABLE_HEADERS, label="Results", interactive=False,
                                     wrap=True, scale=3, elem_id="batch-table")
                count_table = gr.Dataframe(headers=["class", "count"], label="Counts", interactive=False, scale=1)
            download = gr.DownloadButton("Download results (CSV)", visible=False, elem_id="batch-csv")
            run_batch.click(fns.batch_view, inputs=[files], outputs=[table, count_table, download, batch_line],
                            api_name="batch_view", api_visibility="undocumented", **shared)
        volume_fns = VolumeFunctions(service)
        build_volume_tab(volume_fns, shared)
        with gr.Tab("API and model"):
            gr.Markdown(api_help(service))
        # API-only endpoints on hidden components: plain JSON answers for programs.
        with gr.Row(visible=False):
            api_file = gr.File(file_count="single", type="filepath")
            api_files = gr.File(file_count="multiple", type="filepath")
            api_out = gr.JSON()
            api_batch_out = gr.JSON()
            trigger = gr.Button(visible=False)
            register_volume_api(volume_fns, trigger, shared)
        trigger.click(fns.predict, inputs=[api_file], outputs=[api_out], api_name="predict",
                      api_description="One image file → plane and tumour probabilities, OOD flag, model version.",
                      **shared)
        trigger.click(fns.predict_batch, inputs=[api_files], outputs=[api_batch_out], api_name="predict_batch",
                      api_description="Image files and/or .zip archives → one JSON result per image + counts.",
                      **shared)
    request_limits.refuse_url_inputs([image, files, api_file, api_files])
    return demo


def api_help(service: BrainTumorService) -> str:
    ood = "image statistics + feature distance" if service.ood.has_features else "image statistics only"
    return f"""
**Model version:** `{service.model_version}`  ·  **OOD check:** {ood}

Call the app from Python with `gradio_client` (the same code works for the local app and the Space):

```python
import ssl, certifi
from gradio_client import Client, handle_file
# One TLS context for all requests: gradio_client otherwise builds a new one per HTTP request (~55 ms each).
client = Client("http://127.0.0.1:7860/", ssl_verify=ssl.create_default_context(cafile=certifi.where()))
r = client.predict(handle_file("slice.jpg"), api_name="/predict")  # a single-slice DICOM works too
print(r["plane"]["label"], r["tumor"]["label"], r["tumor"]["probabilities"], r["ood"])
rb = client.predict([handle_file("a.jpg"), handle_file("slices.zip")], api_name="/predict_batch")
print(rb["counts"]["tumor"], [x["tumor"]["label"] if x["ok"] else x["error"] for x in rb["results"]])
rv = client.predict(handle_file("scan.nii.gz"), "as acquired", 0, api_name="/predict_volume")
print(rv["summary"]["label"], rv["summary"]["tumour_slices"], [s["tumor"]["label"] for s in rv["slices"]])
```
Labels are `null` when the image does not look like a brain MRI slice (`"ood": true`, reasons in
`ood_details`) or could not be read (`"ok": false`, reason in `error`, batch only; `/predict` raises).
"""


def configure_queue(demo: gr.Blocks) -> gr.Blocks:
    """Queue for a 2-vCPU Space: bounded waiting line, a small worker pool (see CONCURRENCY)."""
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    request_limits.limit_per_client(demo._queue)  # at most MAX_EVENTS_PER_CLIENT of the places per client
    request_limits.relax_queue_polling(demo._queue)  # its 1 ms wake-ups compete with the model on 2 cores
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Gradio 6 takes app-level settings (css, theme) in launch(). show_error stays off: our own messages
    are gr.Error (always shown); anything unexpected is reported generically, without server details.
    run_history off: Gradio would otherwise keep every uploaded scan in the browser's run history."""
    from starlette.middleware import Middleware

    return {"max_file_size": MAX_UPLOAD, "css": CSS, "run_history": False,
            "app_kwargs": {"middleware": [Middleware(request_limits.UploadSizeLimit)]}}
