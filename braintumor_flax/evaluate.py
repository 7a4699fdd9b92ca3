"""Evaluate the checkpoints on the deduplicated test sets: metrics with bootstrap CIs, calibration, plots.

    python -m braintumor_flax.evaluate --checkpoint checkpoints --data-dir ../shared/data --out results \
        [--ablation-checkpoint PATH]

What it does, in order:
  1. `data.prepare` with the validation fraction and seed the checkpoint was trained with, so the
     validation split is the one training held out, and the test sets hold no duplicate of a training image.
  2. Raw logits of both models on `val`, BRISC test and Kaggle Testing (cached on disk, keyed by the
     checkpoint's weights and the exact pixels, so a rerun or the peer benchmark recomputes nothing).
     The frozen lower VGG blocks run once per image for every model that shares them (main + ablation).
  3. Temperatures fitted on `val` (view: BRISC rows, the only ones with planes; tumour: all rows).
  4. Per model × test set: accuracy, per-class precision / recall / F1 / AUC, macro averages, 95 %
     bootstrap CIs, confusion matrix, ECE / NLL / Brier before and after temperature scaling; tumour
     accuracy per plane on BRISC; the ablation side by side with a paired test.
  5. `results/metrics.json`, per-image CSVs and PNG figures; temperatures and metrics written into the
     checkpoint (`config.json`, `metrics.json`, model card; weights untouched); the README table.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from braintumor_flax import calibration, metrics, plots
from braintumor_flax.labels import PLANES, TUMOR_CLASSES

if TYPE_CHECKING:  # jax-dependent types: imported lazily so main() can set XLA flags first
    from braintumor_flax.data import PreparedData, Split
    from braintumor_flax.hub import BrainTumorPipeline

# Our name of each test set → the split name in `data.prepare`.
TEST_SETS: dict[str, str] = {"brisc2025_test": "test_brisc2025", "kaggle_test": "test_kaggle"}
VIEW_TEST_SETS = ("brisc2025_test",)  # the Kaggle set has no plane labels
VAL_SPLIT = "val"
PREDICTION_CACHE_VERSION = 1
WEIGHT_FILES = ("shared.safetensors", "view/model.safetensors", "tumor/model.safetensors",
                "view/config.json", "tumor/config.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# fingerprints and the prediction cache


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 of the weights and model configs only: writing temperatures/metrics back keeps the key."""
    folder = Path(folder)
    h = hashlib.sha256(f"predictions-v{PREDICTION_CACHE_VERSION}\n".encode())
    for name in WEIGHT_FILES:
        path = folder / name
        h.update(f"{name}:{path.stat().st_size if path.is_file() else -1}\n".encode())
        if path.is_file():
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):  # noqa: B023 - f is the loop's own file
                    h.update(chunk)
    return h.hexdigest()


def images_fingerprint(images: np.ndarray) -> str:
    """Hash of the exact model inputs, so a change in decoding or resizing never reuses stale logits."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}\n".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded pipeline with where it came from and the hash its cached predictions are keyed by."""

    pipeline: BrainTumorPipeline
    folder: Path
    fingerprint: str


@dataclass
class Logits:
    view: np.ndarray | None  # [N, 3] raw logits, None when not computed (ablation without view branch)
    tumor: np.ndarray  # [N, 4]


def _cache_path(cache: Path, model_key: str, images_key: str, with_view: bool) -> Path:
    return cache / f"{model_key[:20]}_{images_key[:20]}_{'vt' if with_view else 't'}.npz"


def _load_cached(path: Path) -> Logits | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return Logits(z["view"] if "view" in z.files else None, z["tumor"])
    except (OSError, ValueError, KeyError):  # a half-written or foreign file: recompute
        return None


def _load_lower(path: Path | None, n: int) -> np.ndarray | None:
    """Cached lower-block outputs (memory-mapped), or None when absent or of the wrong length."""
    if path is None or not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if len(arr) == n else None


def _save_cached(path: Path, logits: Logits) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"tumor": logits.tumor} if logits.view is None else {"view": logits.view, "tumor": logits.tumor}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


# ---------------------------------------------------------------------------------------------
# forward pass over several checkpoints, sharing identical frozen lower blocks


def _lower_fingerprint(model: Any) -> str:
    """Identity of a model's shared lower blocks (weights + what shapes their output)."""
    from braintumor_flax.hub import flat_params

    cfg = model.config
    h = hashlib.sha256(f"{cfg.shared_blocks}|{cfg.preprocessing}|{cfg.image_size}\n".encode())
    blocks = tuple(f"vgg.block{b}_" for b in range(1, cfg.shared_blocks + 1))
    for name, value in sorted(flat_params(model).items()):
        if name.startswith(blocks):
            h.update(name.encode())
            h.update(np.ascontiguousarray(value).data)
    return h.hexdigest()


class MultiForward:
    """Raw logits of several pipelines for the same images, in fixed-size batches (one compile per stage).

    Blocks 1-4 are ~90 % of the compute at 128 px; with the faithful recipe they hold the ImageNet
    weights in every model, so each distinct set of lower blocks runs once per image for all checkpoints,
    and its output can be passed in from a cache (`lowers`), leaving only the upper blocks to run.
    Mirrors `inference.Predictor`'s forward (a test checks the logits agree).
    """

    def __init__(self, pipelines: Sequence[BrainTumorPipeline], *, with_view: Sequence[bool], batch_size: int = 16):
        import jax
        from flax import nnx

        self.batch_size = batch_size
        self.with_view = list(with_view)
        sizes = {p.view_model.config.image_size for p in pipelines} | {p.tumor_model.config.image_size
                                                                      for p in pipelines}
        if len(sizes) != 1:
            raise ValueError(f"checkpoints disagree on image size: {sorted(sizes)}")
        self.image_size = sizes.pop()
        models: list[Any] = []
        plan: list[tuple[int, int, int, int, bool]] = []  # per pipeline: view model, its lower, tumour, its lower
        lower_ids: dict[str, int] = {}
        lower_models: list[int] = []
        for p, view_needed in zip(pipelines, self.with_view, strict=True):
            needs_feature = p.tumor_model.config.use_view_feature
            ids = []
            for model in (p.view_model, p.tumor_model):
                fp = _lower_fingerprint(model)
                if fp not in lower_ids:
                    lower_ids[fp] = len(lower_models)
                    lower_models.append(len(models))
                ids.append(lower_ids[fp])
                models.append(model)
            plan.append((len(models) - 2, ids[0], len(models) - 1, ids[1], view_needed or needs_feature))
        self.lower_fingerprints = list(lower_ids)  # in the order of the `lowers` argument of __call__
        self.n_lower = len(lower_models)
        graphs, states = zip(*(nnx.split(m) for m in models), strict=True)

        def live(states):
            return [nnx.merge(g, s) for g, s in zip(graphs, states, strict=True)]

        def lower(states, images, which: int):
            return live(states)[lower_models[which]].lower(images)

        @jax.jit
        def upper(states, lowers):
            models = live(states)
            outs = []
            for view_i, view_lower, tumor_i, tumor_lower, run_view in plan:
                view_logits, feature = models[view_i].from_lower(lowers[view_lower]) if run_view else (None, None)
                tumor = models[tumor_i]
                outs.append((view_logits, tumor.from_lower(lowers[tumor_lower],
                                                           feature if tumor.config.use_view_feature else None)))
            return outs

        self._lower = jax.jit(lower, static_argnums=2)  # one compiled function per distinct lower set
        self._upper = upper
        self._states = tuple(states)

    def __call__(
        self,
        images: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
        *,
        lowers: Sequence[np.ndarray | None] | None = None,
        keep_lowers: bool = False,
    ) -> list[Logits]:
        """Logits per pipeline. `lowers[k]`: precomputed output of lower set k (None = compute it).

        With `keep_lowers`, the computed lower outputs are left in `self.last_lowers` (for a cache).
        """
        import jax.numpy as jnp

        n = len(images)
        given = list(lowers) if lowers is not None else [None] * self.n_lower
        computed: list[list[np.ndarray]] = [[] for _ in range(self.n_lower)]
        parts: list[list[tuple[np.ndarray | None, np.ndarray]]] = []
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)  # pad: one compiled shape
            padded[:stop - start] = images[start:stop]
            batch_lowers = []
            for k in range(self.n_lower):
                if given[k] is not None:
                    cached = np.zeros((self.batch_size, *given[k].shape[1:]), np.float32)
                    cached[:stop - start] = given[k][start:stop]
                    batch_lowers.append(jnp.asarray(cached))
                else:
                    out = self._lower(self._states, jnp.asarray(padded), k)
                    batch_lowers.append(out)
                    if keep_lowers:
                        computed[k].append(np.asarray(out)[:stop - start])
            outs = self._upper(self._states, batch_lowers)
            parts.append([(None if v is None else np.asarray(v)[:stop - start], np.asarray(t)[:stop - start])
                          for v, t in outs])
            if progress:
                progress(stop, n)
        self.last_lowers = [np.concatenate(c) if c else None for c in computed] if keep_lowers else []
        results = []
        for i, want_view in enumerate(self.with_view):
            tumor = np.concatenate([p[i][1] for p in parts]) if parts else np.zeros((0, len(TUMOR_CLASSES)))
            view = None
            if want_view:
                view = np.concatenate([p[i][0] for p in parts]) if parts else np.zeros((0, len(PLANES)))
            results.append(Logits(None if view is None else view.astype(np.float32), tumor.astype(np.float32)))
        return results


def _progress(label: str) -> Callable[[int, int], None]:
    t0 = time.perf_counter()
    last = [t0]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 15:
            last[0] = now
            rate = (now - t0) / max(done, 1)
            log(f"  {label}: {done}/{total} images, {rate:.3f} s/image, ETA {rate * (total - done):.0f} s")

    return show


def predict_splits(
    entries: Sequence[tuple[str, Checkpoint, bool]],
    splits: dict[str, Split],
    *,
    jobs: Sequence[tuple[str, Sequence[tuple[str, Checkpoint, bool]]]] | None = None,
    batch_size: int = 16,
    cache: Path | None = None,
) -> dict[str, dict[str, Logits]]:
    """{entry name: {split name: Logits}} for entries (name, checkpoint, with view logits).

    `jobs` narrows which entries run on which split (default: all on all). Logits found in the cache are
    read, the rest computed; one compiled forward is reused for every split with the same checkpoints.
    """
    out: dict[str, dict[str, Logits]] = {name: {} for name, _, _ in entries}
    forwards: dict[tuple[str, ...], MultiForward] = {}
    for split_name, job_entries in (jobs if jobs is not None else [(name, entries) for name in splits]):
        split = splits[split_name]
        key = images_fingerprint(split.images)
        todo = []
        for name, ckpt, with_view in job_entries:
            path = _cache_path(cache, ckpt.fingerprint, key, with_view) if cache else None
            hit = _load_cached(path) if path else None
            if hit is not None and len(hit.tumor) == len(split):
                out[name][split_name] = hit
            else:
                todo.append((name, ckpt, with_view, path))
        if not todo:
            log(f"  {split_name}: {len(split)} images, logits from cache")
            continue
        group = tuple(t[0] for t in todo)
        if group not in forwards:
            forwards[group] = MultiForward([t[1].pipeline for t in todo], with_view=[t[2] for t in todo],
                                           batch_size=batch_size)
        forward = forwards[group]
        # Lower-block outputs depend only on the frozen weights and the pixels: a new checkpoint that shares
        # them (the ablation, retrained heads) then costs only its upper blocks.
        lower_paths = [cache / f"lower_{fp[:20]}_{key[:20]}.npy" if cache else None
                       for fp in forward.lower_fingerprints]
        lowers = [_load_lower(p, len(split)) for p in lower_paths]
        log(f"  {split_name}: {len(split)} images × {len(todo)} checkpoint(s), {forward.n_lower} distinct lower "
            f"trunk(s), {sum(x is not None for x in lowers)} from cache")
        results = forward(split.images, _progress(split_name), lowers=lowers, keep_lowers=cache is not None)
        for (name, _, _, path), logits in zip(todo, results, strict=True):
            out[name][split_name] = logits
            if path:
                _save_cached(path, logits)
        for path, computed in zip(lower_paths, forward.last_lowers, strict=False):
            if path is not None and computed is not None:
                tmp = path.with_name(path.name + ".tmp.npy")
                np.save(tmp, computed.astype(np.float32))
                tmp.replace(path)
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def _strip_reliability(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "reliability"}


def evaluate_task(
    logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], temperature: float, *,
    n_resamples: int, seed: int,
) -> dict[str, Any]:
    """Classification metrics on calibrated probabilities plus calibration before/after."""
    probs = calibration.softmax(logits, temperature)
    report = metrics.classification_report(labels, probs, class_names, n_resamples=n_resamples, seed=seed)
    report.update(calibration.calibration_report(logits, labels, temperature))
    # Temperature scaling keeps every arg-max but can reorder one class's scores across images, so AUC may move.
    raw_auc = metrics.one_vs_rest_auc(labels, calibration.softmax(logits, 1.0)) if len(labels) else np.array([])
    report["macro_auc_raw"] = float(np.nanmean(raw_auc)) if np.isfinite(raw_auc).any() else float("nan")
    return report


def per_group_accuracy(
    labels: np.ndarray, pred: np.ndarray, groups: np.ndarray, names: Sequence[str], *, n_resamples: int, seed: int,
) -> dict[str, dict[str, Any]]:
    """Accuracy with bootstrap CI for each group (e.g. tumour accuracy per true plane)."""
    out: dict[str, dict[str, Any]] = {}
    for g, name in enumerate(names):
        mask = groups == g
        if not mask.any():
            continue
        correct = (pred[mask] == labels[mask]).astype(np.float64)
        idx = metrics.bootstrap_indices(int(mask.sum()), n_resamples, seed) if n_resamples else None
        ci = metrics._percentile_ci(correct[idx].mean(axis=1)) if idx is not None else None
        out[name] = {"n": int(mask.sum()), "accuracy": float(correct.mean()), "accuracy_ci95": ci}
    return out


def stored_temperatures(pipeline: BrainTumorPipeline, mode: str, dataset_hash_ok: bool) -> dict[str, Any] | None:
    """Temperatures to use without fitting, or None when they must be fitted on the validation split now.

    auto: reuse the checkpoint's own when they were fitted on the validation split of this same data
    (training does that with `fit_temperature`), which saves running both models on ~1,800 images.
    """
    cal = pipeline.info.get("calibration") or {}
    if mode == "none":
        return {"view_temperature": 1.0, "tumor_temperature": 1.0, "fitted_on": "none",
                "method": "none (raw softmax)"}
    if mode == "checkpoint" or (mode == "auto" and dataset_hash_ok and "tumor_temperature" in cal
                                and "validation" in str(cal.get("fitted_on", ""))):
        return {"view_temperature": float(cal.get("view_temperature", 1.0)),
                "tumor_temperature": float(cal.get("tumor_temperature", 1.0)),
                "fitted_on": cal.get("fitted_on", "unknown"),
                "method": cal.get("method", "temperature scaling (min NLL)"), "source": "checkpoint"}
    return None


def fit_temperatures(logits: dict[str, Logits], val: Split | None, view: bool) -> dict[str, Any]:
    """Temperatures from the validation split (never a test set)."""
    out: dict[str, Any] = {"method": "temperature scaling (min NLL)", "fitted_on": "validation split",
                           "source": "fitted by evaluate"}
    if val is None or VAL_SPLIT not in logits:
        out.update(view_temperature=1.0, tumor_temperature=1.0, fitted_on="none (no validation split)")
        return out
    v = logits[VAL_SPLIT]
    has_tumor = val.tumor >= 0
    out["tumor_temperature"] = calibration.fit_temperature(v.tumor[has_tumor], val.tumor[has_tumor])
    out["n_val_tumor"] = int(has_tumor.sum())
    out["val_nll_tumor"] = [calibration.nll(v.tumor[has_tumor], val.tumor[has_tumor], t)
                            for t in (1.0, out["tumor_temperature"])]
    if view and v.view is not None:
        has_plane = val.plane >= 0
        out["view_temperature"] = calibration.fit_temperature(v.view[has_plane], val.plane[has_plane])
        out["n_val_view"] = int(has_plane.sum())
        out["val_nll_view"] = [calibration.nll(v.view[has_plane], val.plane[has_plane], t)
                               for t in (1.0, out["view_temperature"])]
    return out


def evaluate_pipeline(
    logits: dict[str, Logits], splits: dict[str, Split], temps: dict[str, Any], *, view: bool, n_resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """{"view": {test set: report}, "tumor": {test set: report}} for one checkpoint."""
    result: dict[str, dict[str, Any]] = {"view": {}, "tumor": {}}
    for test_name, split_name in TEST_SETS.items():
        if split_name not in logits:
            continue
        split, lg = splits[split_name], logits[split_name]
        has_tumor = split.tumor >= 0
        rep = evaluate_task(lg.tumor[has_tumor], split.tumor[has_tumor], TUMOR_CLASSES, temps["tumor_temperature"],
                            n_resamples=n_resamples, seed=seed)
        planes = split.plane[has_tumor]
        if (planes >= 0).any():
            pred = lg.tumor[has_tumor].argmax(axis=1)
            rep["per_plane"] = per_group_accuracy(split.tumor[has_tumor], pred, planes, PLANES,
                                                  n_resamples=n_resamples, seed=seed)
        result["tumor"][test_name] = rep
        has_plane = split.plane >= 0
        if view and lg.view is not None and test_name in VIEW_TEST_SETS and has_plane.any():
            result["view"][test_name] = evaluate_task(lg.view[has_plane], split.plane[has_plane], PLANES,
                                                      temps["view_temperature"], n_resamples=n_resamples, seed=seed)
    return result


# ---------------------------------------------------------------------------------------------
# outputs


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
        from braintumor_flax.readme_table import TEST_SET_NAMES

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
    """Store temperatures (read by `inference.Predictor`) and metrics (shown by the model card) in a checkpoint.

    Only the JSON files and the model card are rewritten: the weight files stay byte-identical, so the
    prediction cache stays valid and a half-precision checkpoint is not re-saved as float32.
    """
    from braintumor_flax.hub import write_config

    folder = Path(folder)
    pipeline.info["calibration"] = {k: calibration_info[k] for k in
                                    ("view_temperature", "tumor_temperature", "fitted_on", "method")
                                    if k in calibration_info}
    pipeline.metrics = json_safe(checkpoint_metrics(results))
    write_config(folder, pipeline.config_dict())
    _write_json(folder / "metrics.json", pipeline.metrics)
    for task in ("view", "tumor"):
        _write_json(folder / task / "metrics.json", pipeline.metrics.get(task, {}))
    (folder / "README.md").write_text(pipeline.model_card())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
        return out.stdout.strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# driver


def load_checkpoint(source: str | Path) -> Checkpoint:
    """A local checkpoint folder, or a Hub repo id (downloaded once by huggingface_hub)."""
    from braintumor_flax.hub import BrainTumorPipeline, checkpoint_folder

    folder = checkpoint_folder(source)
    return Checkpoint(BrainTumorPipeline.load_folder(folder), folder, checkpoint_fingerprint(folder))


def stratified_subset(split: Split, limit: int | None, seed: int) -> Split:
    """At most `limit` rows, the same share from each tumour class (seeded): for quick runs and tests."""
    if not limit or len(split) <= limit:
        return split
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    classes = np.unique(split.tumor)
    per_class = max(1, limit // len(classes))
    for c in classes:
        idx = np.flatnonzero(split.tumor == c)
        keep.extend(rng.permutation(idx)[:per_class].tolist())
    return split.subset(np.sort(np.asarray(keep[:limit] if len(keep) > limit else keep, np.int64)))


def _training_split_params(pipeline: BrainTumorPipeline) -> tuple[float, int, str | None]:
    """Validation fraction and seed the checkpoint was trained with (train.py's config), and its data hash."""
    training = pipeline.info.get("training", {})
    config = training.get("config", {})
    return float(config.get("val_fraction", 0.2)), int(config.get("seed", 0)), training.get("dataset_hash")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from braintumor_flax.data import prepare
    from braintumor_flax.paths import cache_dir

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"loading checkpoint {args.checkpoint}")
    main_ckpt = load_checkpoint(args.checkpoint)
    ablation_ckpt = load_checkpoint(args.ablation_checkpoint) if args.ablation_checkpoint else None
    image_size = main_ckpt.pipeline.view_model.config.image_size
    val_fraction, seed, train_hash = _training_split_params(main_ckpt.pipeline)
    timings["load_checkpoints_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log(f"preparing data from {args.data_dir} (image size {image_size}, val fraction {val_fraction}, seed {seed})")
    prepared: PreparedData = prepare(args.data_dir, image_size=image_size, val_fraction=val_fraction, seed=seed)
    warnings: list[str] = []
    if train_hash and train_hash != prepared.dataset_hash:
        warnings.append("dataset hash differs from the one the checkpoint was trained on: the validation split "
                        "may not be the one training held out (temperatures could be fitted on training images)")
    if ablation_ckpt is not None:
        abl_hash = _training_split_params(ablation_ckpt.pipeline)[2]
        if abl_hash and abl_hash != prepared.dataset_hash:
            warnings.append("the ablation checkpoint was trained on a different dataset hash than evaluated here")
    hash_ok = not train_hash or train_hash == prepared.dataset_hash
    stored = {"main": stored_temperatures(main_ckpt.pipeline, args.calibration, hash_ok)}
    if ablation_ckpt is not None:
        stored["ablation"] = stored_temperatures(ablation_ckpt.pipeline, args.calibration, hash_ok)
    need_val = [name for name, temps in stored.items() if temps is None]
    wanted = [VAL_SPLIT, *TEST_SETS.values()] if need_val else list(TEST_SETS.values())
    splits = {name: stratified_subset(prepared.splits[name], args.limit, args.seed)
              for name in wanted if name in prepared.splits and len(prepared.splits[name])}
    for name in TEST_SETS.values():
        if name not in splits:
            warnings.append(f"no {name} split under {args.data_dir}: skipped")
    timings["prepare_data_s"] = time.perf_counter() - t
    for w in warnings:
        log(f"WARNING: {w}")

    t = time.perf_counter()
    entries = [("main", main_ckpt, True)]
    if ablation_ckpt is not None:
        entries.append(("ablation", ablation_ckpt, False))
    log("computing logits")
    cache = None if args.no_cache else cache_dir("predictions")
    # Only the checkpoints whose temperatures are (re)fitted need validation logits.
    jobs = [(split_name, [e for e in entries if split_name != VAL_SPLIT or e[0] in need_val])
            for split_name in splits]
    logits = predict_splits(entries, splits, jobs=jobs, batch_size=args.batch_size, cache=cache)
    timings["inference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    temps = stored["main"] or fit_temperatures(logits["main"], splits.get(VAL_SPLIT), view=True)
    previous = main_ckpt.pipeline.info.get("calibration")
    results: dict[str, Any] = evaluate_pipeline(logits["main"], splits, temps, view=True,
                                                n_resamples=args.bootstrap, seed=args.seed)
    results["calibration"] = {**temps, "previous_in_checkpoint": previous}

    ablation_result = None
    if ablation_ckpt is not None:
        abl_temps = stored["ablation"] or fit_temperatures(logits["ablation"], splits.get(VAL_SPLIT), view=False)
        abl = evaluate_pipeline(logits["ablation"], splits, {**abl_temps, "view_temperature": 1.0}, view=False,
                                n_resamples=args.bootstrap, seed=args.seed)
        comparison = {}
        for test_name, split_name in TEST_SETS.items():
            if split_name not in splits:
                continue
            split = splits[split_name]
            has = split.tumor >= 0
            comparison[test_name] = metrics.paired_accuracy_difference(
                split.tumor[has], logits["main"][split_name].tumor[has].argmax(1),
                logits["ablation"][split_name].tumor[has].argmax(1), n_resamples=args.bootstrap, seed=args.seed)
            comparison[test_name]["a"], comparison[test_name]["b"] = "with view feature", "without view feature"
        ablation_result = {
            "description": "tumour model without the view feature (same data and recipe otherwise)",
            "checkpoint": str(args.ablation_checkpoint),
            "checkpoint_fingerprint": ablation_ckpt.fingerprint[:16],
            "recipe": ablation_ckpt.pipeline.info.get("training", {}).get("recipe"),
            "use_view_feature": bool(ablation_ckpt.pipeline.tumor_model.config.use_view_feature),
            "tumor_temperature": abl_temps["tumor_temperature"],
            "tumor": abl["tumor"],
            "comparison": comparison,
        }
        results["ablation"] = ablation_result
    timings["metrics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    plot_data: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for task, by_set in (("view", results["view"]), ("tumor", results["tumor"])):
        for test_name in by_set:
            split = splits[TEST_SETS[test_name]]
            labels_all = split.plane if task == "view" else split.tumor
            has = labels_all >= 0
            lg = getattr(logits["main"][TEST_SETS[test_name]], task)[has]
            temp = temps[f"{task}_temperature"]
            names = PLANES if task == "view" else TUMOR_CLASSES
            plot_data[(task, test_name)] = (labels_all[has], calibration.softmax(lg, temp))
            write_predictions_csv(out / f"predictions_{task}_{test_name}.csv", split.subset(has), lg,
                                  labels_all[has], names, temp)
            if ablation_result and task == "tumor":
                write_predictions_csv(out / f"predictions_tumor_ablation_{test_name}.csv", split.subset(has),
                                      logits["ablation"][TEST_SETS[test_name]].tumor[has], labels_all[has], names,
                                      ablation_result["tumor_temperature"])
    figures = [] if args.no_plots else make_plots(out, results, plot_data, ablation_result)
    timings["plots_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    import jax

    results["meta"] = {
        "command": "python -m braintumor_flax.evaluate " + " ".join(shlex.quote(a) for a in args.argv),
        "checkpoint": str(args.checkpoint),
        "checkpoint_fingerprint": main_ckpt.fingerprint[:16],
        "recipe": main_ckpt.pipeline.info.get("training", {}).get("recipe"),
        "dataset_hash": prepared.dataset_hash,
        "dataset_hash_matches_training": (train_hash == prepared.dataset_hash) if train_hash else None,
        "splits": {name: len(s) for name, s in splits.items()},
        "subset_limit": args.limit,
        "deduplication": "test images with an exact or near duplicate in training data were removed from "
                         "training (never from the test set); see data report",
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "ci": "95 % percentile"},
        "ece_bins": calibration.DEFAULT_BINS,
        "figures": figures,
        "warnings": warnings,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", jax {jax.__version__} "
                   f"{jax.devices()[0].platform}",
        "git_commit": _git_commit(),
    }
    results = json_safe(results)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")

    if args.write_checkpoint and Path(args.checkpoint).is_dir():  # never a Hub snapshot
        write_to_checkpoint(main_ckpt.folder, main_ckpt.pipeline, temps, results)
        log(f"temperatures and metrics written into {args.checkpoint}")
    if args.readme and not args.limit:  # a subset's numbers never reach the README
        from braintumor_flax.readme_table import load_json, update_readme

        readme = Path(args.readme)
        if readme.is_file():
            peer = load_json(out / "peer_comparison.json")
            if update_readme(readme, results, peer):
                log(f"README results table updated: {readme}")
            else:
                log(f"WARNING: {readme} has no results markers; table not written")
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The headline numbers for the terminal (JSON nulls print as '–')."""
    from braintumor_flax.readme_table import _num, _with_ci

    lines = []
    for task in ("view", "tumor"):
        for name, r in results.get(task, {}).items():
            lines.append(f"{task:>5} {name:<15} n={r['n']:<5} acc {_with_ci(r['accuracy'], r.get('accuracy_ci95'))} "
                         f"macro-F1 {_num(r['macro_f1'])} AUC {_num(r['macro_auc'])} ECE {_num(r['ece_raw'])} -> "
                         f"{_num(r['ece_calibrated'])} (T={_num(r['temperature'], '.2f')})")
    abl = results.get("ablation")
    if abl:
        for name, c in abl["comparison"].items():
            lines.append(f"ablation {name:<15} with {_num(c['accuracy_a'])} vs without {_num(c['accuracy_b'])}: "
                         f"diff {_with_ci(c['difference'], c.get('difference_ci95'), '+.3f')}, "
                         f"McNemar p={_num(c['mcnemar_p'], '.3g')}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, default_data_dir

    ap = argparse.ArgumentParser(prog="python -m braintumor_flax.evaluate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT_DIR), help="checkpoint folder (or Hub repo id)")
    ap.add_argument("--data-dir", default=str(default_data_dir()), help="BRISC and/or Kaggle folders")
    ap.add_argument("--out", default="results", help="folder for metrics.json, CSVs and figures")
    ap.add_argument("--ablation-checkpoint", default=None,
                    help="a second checkpoint (tumour model without the view feature) evaluated side by side")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (and of --limit's subsample)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per compiled forward call")
    ap.add_argument("--calibration", choices=("auto", "fit", "checkpoint", "none"), default="auto",
                    help="fit: fit temperatures on the validation split now; checkpoint: use the checkpoint's; "
                         "auto: the checkpoint's if they were fitted on this data's validation split, else fit; "
                         "none: raw probabilities")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per split (quick runs, tests)")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write the prediction cache")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-write-checkpoint", dest="write_checkpoint", action="store_false",
                    help="leave the checkpoint's config.json / metrics.json / model card untouched")
    ap.add_argument("--readme", default="README.md", help="README whose results table to regenerate ('' = none)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from braintumor_flax.xla_flags import configure_xla_cpu

    if "jax" not in sys.modules:  # XLA reads its flags once, when jax starts
        configure_xla_cpu()  # XLA's own CPU convolutions are ~2x faster than its default here
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.limit and args.write_checkpoint:
        log("note: --limit given, so the checkpoint is not modified (metrics on a subset)")
        args.write_checkpoint = False
    results = run(args)
    print("\n".join(summary_lines(results)))
    print(f"wrote {Path(args.out) / 'metrics.json'} in {results['meta']['timings_s']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
