"""Markdown tables rendered from a metrics JSON (written by evaluation): used by the model card and the README."""

from __future__ import annotations

import math
from typing import Any

TEST_SET_NAMES = {"brisc2025_test": "BRISC 2025 test", "kaggle_test": "Kaggle Testing"}
TASK_NAMES = {"view": "view plane (model 1)", "tumor": "tumour class (model 2)"}


def num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def with_ci(value: Any, ci: Any, fmt: str = ".3f") -> str:
    text = num(value, fmt)
    if ci and len(ci) == 2 and all(c is not None and not math.isnan(c) for c in ci):
        text += f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"
    return text


def main_table(metrics: dict[str, Any]) -> str:
    """Per model × test set: n, accuracy, macro-F1, macro AUC (95 % CIs), ECE before → after scaling."""
    rows = []
    for task in ("view", "tumor"):
        for test_set, m in metrics.get(task, {}).items():
            if not isinstance(m, dict) or "accuracy" not in m:
                continue
            ece = f"{num(m.get('ece_raw'))} → {num(m.get('ece_calibrated'))}" if "ece_raw" in m else "–"
            rows.append(f"| {TASK_NAMES.get(task, task)} | {TEST_SET_NAMES.get(test_set, test_set)} | {m.get('n', '')} "
                        f"| {with_ci(m['accuracy'], m.get('accuracy_ci95'))} "
                        f"| {with_ci(m.get('macro_f1'), m.get('macro_f1_ci95'))} "
                        f"| {with_ci(m.get('macro_auc'), m.get('macro_auc_ci95'))} | {ece} |")
    if not rows:
        return "_Not evaluated yet._"
    header = ("| model | test set | n | accuracy [95% CI] | macro F1 [95% CI] | macro ROC-AUC [95% CI] "
              "| ECE raw → calibrated |\n|---|---|---|---|---|---|---|")
    return header + "\n" + "\n".join(rows)


def per_class_table(metrics: dict[str, Any]) -> str:
    """Recall / precision / F1 of each tumour class on each test set."""
    tumor = {k: v for k, v in metrics.get("tumor", {}).items() if isinstance(v, dict) and "per_class" in v}
    if not tumor:
        return ""
    lines = ["| test set | class | n | precision | recall | F1 | ROC-AUC |", "|---|---|---|---|---|---|---|"]
    for test_set, m in tumor.items():
        for name, c in m["per_class"].items():
            lines.append(f"| {TEST_SET_NAMES.get(test_set, test_set)} | {name} | {c.get('support', '')} "
                         f"| {num(c.get('precision'))} | {num(c.get('recall'))} | {num(c.get('f1'))} "
                         f"| {num(c.get('auc'))} |")
    return "\n".join(lines)


def per_plane_table(metrics: dict[str, Any]) -> str:
    """Tumour accuracy per true plane on BRISC test, with and (if evaluated) without the view feature."""
    main = metrics.get("tumor", {}).get("brisc2025_test", {}).get("per_plane")
    if not main:
        return ""
    abl = (metrics.get("ablation") or {}).get("tumor", {}).get("brisc2025_test", {}).get("per_plane", {})
    header = "| plane | n | with view feature |" + (" without view feature |" if abl else "")
    lines = [header, "|---|---|---|" + ("---|" if abl else "")]
    for plane, m in main.items():
        row = f"| {plane} | {m['n']} | {with_ci(m['accuracy'], m.get('accuracy_ci95'))} |"
        if abl:
            a = abl.get(plane, {})
            row += f" {with_ci(a.get('accuracy'), a.get('accuracy_ci95'))} |"
        lines.append(row)
    return "\n".join(lines)


def ablation_table(metrics: dict[str, Any]) -> str:
    """Paired comparison of the tumour model with vs without the view feature on the same images."""
    comparison = (metrics.get("ablation") or {}).get("comparison", {})
    if not comparison:
        return ""
    lines = ["| test set | n | with view feature | without | difference [paired 95% CI] | McNemar p |",
             "|---|---|---|---|---|---|"]
    for test_set, c in comparison.items():
        lines.append(f"| {TEST_SET_NAMES.get(test_set, test_set)} | {c['n']} | {num(c['accuracy_a'])} "
                     f"| {num(c['accuracy_b'])} | {with_ci(c['difference'], c.get('difference_ci95'), '+.3f')} "
                     f"| {num(c.get('mcnemar_p'), '.3g')} |")
    lines.append("\nOne training run per arm (same data, split, seed and recipe). The paired interval and the McNemar "
                 "test cover the sampling of test images, not the run-to-run variation of training, which was not "
                 "measured; a difference this size could be partly training noise.")
    return "\n".join(lines)


def peer_table(peer: dict[str, Any] | None) -> str:
    """Ours vs the `detect-tumor` package on the same deduplicated test sets (from benchmarks/bench_peer.py)."""
    if not peer or not peer.get("test_sets"):
        return ""
    lines = ["| test set | model | n | accuracy [95% CI] | macro F1 | median latency / image |",
             "|---|---|---|---|---|---|"]
    for test_set, by_model in peer["test_sets"].items():
        for model, m in by_model.items():
            latency = m.get("latency_ms", {}).get("median")
            lines.append(f"| {TEST_SET_NAMES.get(test_set, test_set)} | {model} | {m.get('n', '')} "
                         f"| {with_ci(m.get('accuracy'), m.get('accuracy_ci95'))} | {num(m.get('macro_f1'))} "
                         f"| {num(latency, '.0f') + ' ms' if latency is not None else '–'} |")
    return "\n".join(lines)
