"""What an evaluation writes: per-image CSVs, figures, the checkpoint's metrics and temperatures, a summary."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from braintumor_flax import calibration
from braintumor_flax.checkpoint_info import Calibration
from braintumor_flax.data.splits import Split
from braintumor_flax.evaluation import plots
from braintumor_flax.hub import BrainTumorPipeline, write_config
from braintumor_flax.reports.tables import TEST_SET_NAMES, num, with_ci


def _strip_reliability(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "reliability"}


def write_predictions_csv(path: Path, split: Split, logits: np.ndarray, labels: np.ndarray,
                          class_names: Sequence[str], temperature: float) -> None:
    """Per-image labels, calibrated probabilities and raw logits: every metric can be recomputed from these."""
    probs = calibration.softmax(logits, temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", *(f"prob_{c}" for c in class_names),
                    *(f"logit_{c}" for c in class_names)])
        for i, p in enumerate(split.paths):
            w.writerow([p, class_names[labels[i]], class_names[int(probs[i].argmax())],
                        *(f"{v:.6f}" for v in probs[i]), *(f"{v:.5f}" for v in logits[i])])


def make_plots(out: Path, results: dict[str, Any], data: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
               ablation: dict[str, Any] | None) -> list[str]:
    """Confusion matrix, ROC and reliability diagram per model × test set; per-plane and ablation bars."""
    written = []
    for (task, test_name), (labels, probs) in data.items():
        rep = results[task][test_name]
        names = rep["class_names"]
        what = f"{task} model, {test_name} (n={rep['n']})"
        written.append(plots.plot_confusion(rep["confusion_matrix"], names, f"Confusion: {what}\naccuracy "
                                            f"{rep['accuracy']:.3f}", out / f"confusion_{task}_{test_name}.png"))
        aucs = [rep["per_class"][c]["auc"] for c in names]
        written.append(plots.plot_roc(labels, probs, names, f"ROC (one-vs-rest): {what}",
                                      out / f"roc_{task}_{test_name}.png", aucs=aucs))
        diagrams = {"raw (T=1)": rep["reliability"]["raw"],
                    f"calibrated (T={rep['temperature']:.2f})": rep["reliability"]["calibrated"]}
        written.append(plots.plot_reliability(diagrams, f"Reliability: {what}",
                                              out / f"reliability_{task}_{test_name}.png"))
    brisc = results["tumor"].get("brisc2025_test", {})
    if "per_plane" in brisc:
        series = {"with view feature": brisc["per_plane"]}
        if ablation and "per_plane" in ablation["tumor"].get("brisc2025_test", {}):
            series["without view feature (ablation)"] = ablation["tumor"]["brisc2025_test"]["per_plane"]
        written.append(plots.plot_grouped_accuracy(series, "Tumour accuracy per true plane, BRISC test",
                                                   out / "tumor_accuracy_per_plane.png"))
    if ablation:
        series = {label: {TEST_SET_NAMES.get(k, k): v for k, v in by_set.items()}
                  for label, by_set in (("with view feature", results["tumor"]),
                                        ("without view feature (ablation)", ablation["tumor"]))}
        written.append(plots.plot_grouped_accuracy(series, "Ablation: tumour model with vs without the view feature",
                                                   out / "ablation_tumor_accuracy.png"))
    return [Path(p).name for p in written]


def checkpoint_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """What goes into the checkpoint's metrics.json: everything but the bulky reliability bins."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if key in ("view", "tumor"):
            out[key] = {name: _strip_reliability(rep) for name, rep in value.items()}
        elif key == "ablation" and isinstance(value, dict):
            out[key] = {**value, "tumor": {n: _strip_reliability(r) for n, r in value.get("tumor", {}).items()}}
        else:
            out[key] = value
    return out


def json_safe(value: Any) -> Any:
    """NaN (e.g. an AUC with no positives) → null, so the files are strict JSON that any parser reads."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    # Same format as braintumor_flax.hub writes, so a later save_pretrained produces identical files.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_to_checkpoint(folder: str | Path, pipeline: BrainTumorPipeline, calibration_info: dict[str, Any],
                        results: dict[str, Any]) -> None:
    """Store temperatures (read by `serve.predictor.Predictor`) and metrics (shown by the model card) in a checkpoint.

    Only the JSON files and the model card are rewritten: the weight files stay byte-identical, so the
    prediction cache stays valid and a half-precision checkpoint is not re-saved as float32.
    """
    folder = Path(folder)
    pipeline.info.calibration = Calibration.from_dict(calibration_info)
    pipeline.metrics = json_safe(checkpoint_metrics(results))
    write_config(folder, pipeline.config_dict())
    _write_json(folder / "metrics.json", pipeline.metrics)
    for task in ("view", "tumor"):
        _write_json(folder / task / "metrics.json", pipeline.metrics.get(task, {}))
    (folder / "README.md").write_text(pipeline.model_card())


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
        return out.stdout.strip() or None
    except OSError:
        return None


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The headline numbers for the terminal (JSON nulls print as '–')."""
    lines = []
    for task in ("view", "tumor"):
        for name, r in results.get(task, {}).items():
            lines.append(f"{task:>5} {name:<15} n={r['n']:<5} acc {with_ci(r['accuracy'], r.get('accuracy_ci95'))} "
                         f"macro-F1 {num(r['macro_f1'])} AUC {num(r['macro_auc'])} ECE {num(r['ece_raw'])} -> "
                         f"{num(r['ece_calibrated'])} (T={num(r['temperature'], '.2f')})")
    abl = results.get("ablation")
    if abl:
        for name, c in abl["comparison"].items():
            lines.append(f"ablation {name:<15} with {num(c['accuracy_a'])} vs without {num(c['accuracy_b'])}: "
                         f"diff {with_ci(c['difference'], c.get('difference_ci95'), '+.3f')}, "
                         f"McNemar p={num(c['mcnemar_p'], '.3g')}")
    return lines
