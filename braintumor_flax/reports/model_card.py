"""The model card (the Hub repo's README.md), generated from the checkpoint's config and metrics."""

from __future__ import annotations

from typing import Any

from braintumor_flax.reports.tables import ablation_table, main_table, per_plane_table, with_ci

CARD_TEMPLATE = """---
library_name: braintumor-flax
license: cc-by-4.0
pipeline_tag: image-classification
tags: [flax, jax, medical-imaging, brain-mri, vgg16, grad-cam]
datasets: [brisc2025, masoudnickparvar/brain-tumor-mri-dataset]
---

# braintumor-flax: view plane and tumour class of a 2-D brain MRI slice

{architecture}

**Research demo, not a medical device.** Do not use it for diagnosis or treatment decisions.

## Training
- Recipe: `{recipe}`; data: {training_data}
- Dataset manifest hash: `{dataset_hash}`

## Results (deduplicated test sets: no test image, nor any near-duplicate of one, was trained on)
{metrics_table}

## Intended use and limitations
- Intended: teaching, exploring how CNNs read MRI slices, and as a baseline for research.
- Trained on BRISC 2025 and the Kaggle Brain Tumor MRI Dataset (T1-weighted, mostly contrast-enhanced slices,
  downscaled to at most 256 px). Other sequences, scanners, paediatric scans, post-operative images and
  slices without brain tissue are outside what it has seen; an out-of-distribution check flags images that
  do not look like brain MRI, but cannot catch everything.
- Class balance of the training data does not match clinical prevalence; probabilities are calibrated on a
  validation split of the same sources, not on a clinical population.

## Data licences and credit
BRISC 2025 (Fateh et al., arXiv 2506.14318), CC BY 4.0. Kaggle "Brain Tumor MRI Dataset" (M. Nickparvar),
built from figshare (Cheng et al.), SARTAJ and Br35H.
"""


TWO_NETWORKS = """Two Flax NNX models built on an ImageNet VGG16 (Keras weights, caffe preprocessing) at {size}×{size}:
**model 1** tells the view plane (axial, coronal, sagittal) and emits a 128-d feature; **model 2** tells the
tumour class (glioma, meningioma, no tumour, pituitary) from the image and that feature."""

SHARED_TRUNK = """One Flax NNX model: a single VGG16 trunk, started from the ImageNet weights (Keras, caffe
preprocessing) and trained on these data, at {size}×{size}, answers both questions in one pass. The **view
head** tells the view plane (axial, coronal, sagittal) through a 128-d view feature; the **tumour head** tells
the tumour class (glioma, meningioma, no tumour, pituitary) from the trunk's features and that view feature."""

SEGMENTER = """
A **decoder** on the same trunk outlines the tumour (trained on BRISC 2025's expert masks)."""


def architecture(config: dict[str, Any]) -> str:
    """What the checkpoint holds, in words: the original's two networks, or one shared trunk (and a decoder)."""
    size = config.get("models", {}).get("view", {}).get("image_size", "?")
    if not config.get("shared_trunk"):
        return TWO_NETWORKS.format(size=size)
    return SHARED_TRUNK.format(size=size) + (SEGMENTER if config.get("segmentation") else "")


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown tables from a metrics JSON (written by `braintumor_flax.evaluation.evaluate`): per model and test set
    accuracy / macro-F1 / macro AUC with 95 % bootstrap CIs and ECE before → after temperature scaling, then
    tumour accuracy per plane and the view-feature ablation when they were measured."""
    parts = [main_table(metrics)]
    calib = metrics.get("calibration", {})
    if calib.get("tumor_temperature") is not None:
        parts.append(f"Calibrated by temperature scaling on the {calib.get('fitted_on', 'validation split')} "
                     f"(view T = {calib.get('view_temperature', 1.0):.2f}, tumour T = "
                     f"{calib.get('tumor_temperature', 1.0):.2f}).")
    for title, table in (("Tumour accuracy per view plane (BRISC test)", per_plane_table(metrics)),
                         ("Ablation: tumour model with vs without the view feature", ablation_table(metrics))):
        if table:
            parts.append(f"**{title}**\n\n{table}")
    return "\n\n".join(parts)


def clean_figures(run: dict[str, Any]) -> str:
    """The honest paragraph: tumour accuracy on the test images with no twin in this model's training."""
    t = run["tumor"]
    b, k, u = (t[x]["clean"] if "clean" in t[x] else t[x] for x in ("brisc2025_test", "kaggle_test", "union_clean"))
    return ("**Honest figures.** The table below counts test images whose mirrored or re-encoded copy was in this "
            "model's training data. On the test images with no such twin, tumour accuracy is "
            f"**{with_ci(b['accuracy'], b['accuracy_ci95'])} on BRISC 2025 test (n = {b['n']})** and "
            f"**{with_ci(k['accuracy'], k['accuracy_ci95'])} on Kaggle Testing (n = {k['n']})**, "
            f"{with_ci(u['accuracy'], u['accuracy_ci95'])} over their {u['n']} distinct pictures; meningioma recall "
            f"{b['meningioma_recall']:.2f} / {k['meningioma_recall']:.2f}. See the project's docs/duplicates.md.")


def render_model_card(config: dict[str, Any], metrics: dict[str, Any], clean: dict[str, Any] | None = None) -> str:
    training = config.get("training", {})
    return CARD_TEMPLATE.format(
        architecture=architecture(config),
        recipe=training.get("recipe", "unknown"),
        training_data=training.get("data_summary", "see config.json"),
        dataset_hash=training.get("dataset_hash", "unknown"),
        metrics_table=(clean_figures(clean) + "\n\n" if clean else "") + metrics_table(metrics),
    )
