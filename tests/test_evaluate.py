"""End-to-end `python -m braintumor_flax.evaluation` on a tiny generated dataset with stand-in checkpoints."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from braintumor_flax.calibration import softmax
from braintumor_flax.data.datasets import Split
from braintumor_flax.evaluation import evaluate
from braintumor_flax.labels import TUMOR_CLASSES
from braintumor_flax.models.forward import Forward
from braintumor_flax.reports import readme as readme_table

pytestmark = pytest.mark.slow  # one end-to-end run (~1 min of CPU) shared by the tests of this module

SIZE = 32
CODES = {"glioma": "gl", "meningioma": "me", "no_tumor": "no", "pituitary": "pi"}
KAGGLE = {"glioma": "glioma", "meningioma": "meningioma", "no_tumor": "notumor", "pituitary": "pituitary"}


def _image(rng: np.random.Generator, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Blocky noise: every image distinct, also under the perceptual hash used for deduplication.
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((48, 40), Image.Resampling.NEAREST).save(path, quality=95)


def _make_data(root: Path) -> dict[str, int]:
    """BRISC and Kaggle layouts; 3 train images per stratum so the validation split is non-empty."""
    rng = np.random.default_rng(0)
    counts = {"brisc_test": 0, "kaggle_test": 0}
    i = 0
    for tumor, code in CODES.items():
        for plane in ("ax", "co", "sa"):
            for split, n in (("train", 3), ("test", 1)):
                for _ in range(n):
                    i += 1
                    _image(rng, root / "brisc2025/classification_task" / split / tumor /
                           f"brisc2025_{split}_{i:05d}_{code}_{plane}_t1.jpg")
                counts["brisc_test"] += n if split == "test" else 0
        for split, prefix, n in (("Training", "Tr", 4), ("Testing", "Te", 2)):
            for j in range(n):
                _image(rng, root / "kaggle" / split / KAGGLE[tumor] / f"{prefix}-{code}_{j:04d}.jpg")
        counts["kaggle_test"] += 2
    return counts


def _make_checkpoints(main: Path, ablation: Path) -> None:
    """Main (tumour model with the view branch) and ablation (without), random heads, the same lower blocks in
    every model of both checkpoints (as after frozen-trunk training), so one trunk pass serves all of them."""
    from conftest import make_tiny_pipeline

    main_pipeline = make_tiny_pipeline(image_size=SIZE, seed=1)
    ablation_pipeline = make_tiny_pipeline(image_size=SIZE, seed=1, use_view_feature=False)
    ablation_pipeline.view_model = main_pipeline.view_model
    main_pipeline.save_pretrained(main)
    ablation_pipeline.save_pretrained(ablation)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("shared.safetensors", "view/model.safetensors", "tumor/model.safetensors"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINTUMOR_FLAX_CACHE", str(root / "cache"))
        counts = _make_data(root / "data")
        ckpt, ablation = root / "ckpt", root / "ablation"
        _make_checkpoints(ckpt, ablation)
        weights_before = _digest(ckpt)
        readme = root / "README.md"
        readme.write_text(f"# demo\n\n## Results\n{readme_table.START}\nold\n{readme_table.END}\n\nafter\n")
        args = ["--checkpoint", str(ckpt), "--data-dir", str(root / "data"), "--out", str(root / "results"),
                "--ablation-checkpoint", str(ablation), "--bootstrap", "200", "--readme", str(readme)]
        assert evaluate.main(args) == 0
        first = json.loads((root / "results" / "metrics.json").read_text())

        # Second run: logits come from the cache (the forward pass must not run) and the temperatures
        # written into the checkpoint by the first run are reused (auto), so nothing changes.
        def no_forward(*a, **k):
            raise AssertionError("forward pass ran although every logit was cached")

        mp.setattr(Forward, "__call__", no_forward)
        mp.setattr(Forward, "lower", no_forward)
        lower_files = sorted((root / "cache" / "predictions").glob("lower_*.npy"))
        assert evaluate.main([*args, "--out", str(root / "results2"), "--no-plots"]) == 0
        second = json.loads((root / "results2" / "metrics.json").read_text())
    return {"root": root, "ckpt": ckpt, "ablation": ablation, "counts": counts, "metrics": first,
            "second": second, "readme": readme, "weights_before": weights_before, "lower_files": lower_files}


def test_metrics_json_schema(run):
    m, counts = run["metrics"], run["counts"]
    assert set(m["view"]) == {"brisc2025_test"} and set(m["tumor"]) == {"brisc2025_test", "kaggle_test"}
    assert m["view"]["brisc2025_test"]["n"] == counts["brisc_test"]
    assert m["tumor"]["kaggle_test"]["n"] == counts["kaggle_test"]
    union = m["union"]  # both test sets, each picture once: here no picture is in both
    assert union["images"] == counts["brisc_test"] + counts["kaggle_test"]
    assert union["tumor"]["n"] == union["distinct_pictures"] <= union["images"]
    for task, name in (("view", "brisc2025_test"), ("tumor", "brisc2025_test"), ("tumor", "kaggle_test")):
        r = m[task][name]
        for key in ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_auc", "per_class", "ece_raw",
                    "ece_calibrated", "confusion_matrix", "temperature"):
            assert key in r, (task, name, key)
        assert np.sum(r["confusion_matrix"]) == r["n"]
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
    assert set(m["tumor"]["brisc2025_test"]["per_plane"]) == {"axial", "coronal", "sagittal"}
    assert sum(p["n"] for p in m["tumor"]["brisc2025_test"]["per_plane"].values()) == counts["brisc_test"]
    assert m["calibration"]["source"] == "fitted by evaluate" and m["calibration"]["n_val_tumor"] > 0
    assert set(m["ablation"]["comparison"]) == {"brisc2025_test", "kaggle_test"}
    assert m["ablation"]["use_view_feature"] is False
    assert m["meta"]["train_datasets"] == "all"


def test_lower_blocks_cached_once_per_split(run):
    # Main and ablation share their frozen trunk: one lower-output file per split (val + two test sets).
    assert len(run["lower_files"]) == 3
    shapes = {np.load(p, mmap_mode="r").shape[1:] for p in run["lower_files"]}
    assert shapes == {(SIZE // 16, SIZE // 16, 512)}


def test_metrics_agree_with_the_per_image_csv(run):
    m = run["metrics"]
    for task, name in (("view", "brisc2025_test"), ("tumor", "kaggle_test")):
        with (run["root"] / "results" / f"predictions_{task}_{name}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == m[task][name]["n"]
        acc = np.mean([r["true"] == r["predicted"] for r in rows])
        assert m[task][name]["accuracy"] == pytest.approx(acc)
        # Calibrated probabilities in the CSV are softmax(logits / T) with the reported temperature.
        names = m[task][name]["class_names"]
        logits = np.array([[float(r[f"logit_{c}"]) for c in names] for r in rows])
        probs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
        np.testing.assert_allclose(probs, softmax(logits, m[task][name]["temperature"]), atol=2e-5)
    abl = m["ablation"]["comparison"]["kaggle_test"]
    with (run["root"] / "results" / "predictions_tumor_ablation_kaggle_test.csv").open() as f:
        assert abl["accuracy_b"] == pytest.approx(np.mean([r["true"] == r["predicted"] for r in csv.DictReader(f)]))


def test_figures_written(run):
    for name in run["metrics"]["meta"]["figures"]:
        data = (run["root"] / "results" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    names = set(run["metrics"]["meta"]["figures"])
    assert {"confusion_tumor_kaggle_test.png", "roc_view_brisc2025_test.png", "reliability_tumor_brisc2025_test.png",
            "tumor_accuracy_per_plane.png", "ablation_tumor_accuracy.png"} <= names


def test_checkpoint_gets_temperatures_and_metrics_but_keeps_its_weights(run):
    from braintumor_flax.serve.predictor import Predictor

    ckpt, m = run["ckpt"], run["metrics"]
    assert _digest(ckpt) == run["weights_before"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["calibration"]["tumor_temperature"] == pytest.approx(m["calibration"]["tumor_temperature"])
    assert config["calibration"]["view_temperature"] == pytest.approx(m["calibration"]["view_temperature"])
    stored = json.loads((ckpt / "metrics.json").read_text())
    assert stored["tumor"]["kaggle_test"]["accuracy"] == m["tumor"]["kaggle_test"]["accuracy"]
    assert "reliability" not in stored["tumor"]["kaggle_test"]
    card = (ckpt / "README.md").read_text()
    assert f"{m['tumor']['kaggle_test']['accuracy']:.3f}" in card and "Ablation" in card
    # The app's predictor now returns calibrated probabilities.
    served = Predictor.from_pretrained(ckpt).calibration
    assert served.tumor_temperature == pytest.approx(m["calibration"]["tumor_temperature"])


def test_second_run_reuses_cache_and_temperatures(run):
    a, b = run["metrics"], run["second"]
    assert b["calibration"]["source"] == "checkpoint"
    assert b["calibration"]["tumor_temperature"] == pytest.approx(a["calibration"]["tumor_temperature"])
    for task in ("view", "tumor"):
        for name in a[task]:
            for key in ("accuracy", "accuracy_ci95", "macro_f1", "macro_auc", "ece_calibrated"):
                assert b[task][name][key] == pytest.approx(a[task][name][key]), (task, name, key)


def test_readme_block_regenerated(run):
    text = run["readme"].read_text()
    assert "old" not in text and text.endswith("after\n") and text.startswith("# demo")
    acc = run["metrics"]["tumor"]["brisc2025_test"]["accuracy"]
    assert f"{acc:.3f}" in text and "Ablation" in text and "Do not edit this block by hand" in text
    # --check passes now and fails after a hand edit.
    metrics_path = run["root"] / "results2" / "metrics.json"
    common = ["--metrics", str(metrics_path), "--readme", str(run["readme"]), "--checkpoint", str(run["ckpt"]),
              "--peer", str(run["root"] / "none.json")]
    assert readme_table.main(common) == 0
    assert readme_table.main([*common, "--check"]) == 0
    run["readme"].write_text(text.replace(f"{acc:.3f}", "0.999", 1))
    assert readme_table.main([*common, "--check"]) == 1
    assert readme_table.main(common) == 0 and readme_table.main([*common, "--check"]) == 0


def test_readme_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert readme_table.update_readme(readme, {"tumor": {}}) is False
    assert readme.read_text() == "no markers here\n"


def test_evaluation_logits_are_the_apps(run):
    """Evaluation's logits (trunk shared across checkpoints, read back from the cache) equal the app's."""
    from braintumor_flax.evaluation.predictions import load_checkpoint, predict_splits
    from braintumor_flax.serve.predictor import Predictor

    rng = np.random.default_rng(3)
    n = 5
    split = Split("x", rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), np.zeros(n, np.int32),
                  np.full(n, -1, np.int32), np.array(["k"] * n), [f"p{i}" for i in range(n)],
                  [str(i) for i in range(n)])
    main, abl = load_checkpoint(run["ckpt"]), load_checkpoint(run["ablation"])
    for cache in (None, run["root"] / "cache-forward", run["root"] / "cache-forward"):  # none, cold, warm
        logits = predict_splits([("main", main, True), ("abl", abl, False)], {"x": split}, batch_size=4,
                                cache=cache)
        ref = Predictor(main.pipeline, batch_size=8).predict_arrays(split.images)
        np.testing.assert_allclose(logits["main"]["x"].view, ref.view_logits, rtol=2e-4, atol=1e-3)
        np.testing.assert_allclose(logits["main"]["x"].tumor, ref.tumor_logits, rtol=2e-4, atol=1e-3)
        # The ablation model has no view branch: its plain forward is the reference.
        np.testing.assert_allclose(logits["abl"]["x"].tumor, np.asarray(abl.pipeline.tumor_model(split.images)),
                                   rtol=2e-4, atol=1e-3)
        assert logits["abl"]["x"].view is None


def test_stratified_subset_keeps_every_class():
    n = 40
    tumor = np.repeat(np.arange(4), 10).astype(np.int32)
    split = Split("x", np.zeros((n, 2, 2, 3), np.uint8), tumor, np.full(n, -1, np.int32),
                  np.array(["k"] * n), [f"p{i}" for i in range(n)], [str(i) for i in range(n)])
    sub = split.stratified_subset(8, seed=0)
    assert len(sub) == 8 and np.bincount(sub.tumor).tolist() == [2, 2, 2, 2]
    assert split.stratified_subset(8, seed=0).paths == sub.paths
    assert split.stratified_subset(None, seed=0) is split
    assert len(TUMOR_CLASSES) == 4


def test_benchmark_blocks_regenerated_from_their_json(tmp_path):
    """The OOD and serving tables come from the benchmark JSON files; a hand edit fails --check."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.json").write_text(json.dumps({"tumor": {}}))
    (results / "ood_eval.json").write_text(json.dumps({
        "false_alarm_target": 0.01, "fit_subsample": {"train": 10, "val": 5},
        "mri": {"test_brisc2025": {"n": 200, "false_alarms": 3, "false_alarm_rate": 0.015,
                                   "by_check": {"feature_distance": 3}}},
        "non_mri": {"n": 20, "detection_rate": 0.95,
                    "per_kind": {"noise_grey": {"n": 20, "detected": 19, "detection_rate": 0.95}}}}))
    (results / "bench_app.json").write_text(json.dumps({
        "cold_start_s": {"empty_xla_cache": 25.0, "with_xla_cache": 12.5},
        "latency_one_image": {"analyze_with_gradcam": {"median_ms": 321.0}, "predict_json": {"median_ms": 250.0},
                              "default_client": {"analyze_with_gradcam": {"median_ms": 480.0}},
                              "tls_context_ms": {"median_ms": 55.0}},
        "concurrency": {"clients": 8, "requests": 200, "wrong_answers": 0, "errors": 1},
        "memory": {"growth_ratio": 1.02}, "machine": {"cores": 2, "loadavg_start": [0.1], "loadavg_end": [1.9]}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{readme_table.START}\n{readme_table.END}\n<!-- ood:start -->\nold\n<!-- ood:end -->\n"
                      "<!-- serving:start -->\n<!-- serving:end -->\n")
    args = ["--metrics", str(results / "metrics.json"), "--readme", str(readme), "--checkpoint", str(tmp_path / "no"),
            "--peer", str(results / "none.json"), "--ood", str(results / "ood_eval.json"),
            "--bench-app", str(results / "bench_app.json"), "--bench-inference", str(results / "none.json")]
    assert readme_table.main([*args, "--check"]) == 1
    assert readme_table.main(args) == 0 and readme_table.main([*args, "--check"]) == 0
    text = readme.read_text()
    assert "old\n" not in text
    assert "| BRISC 2025 test (brain MRI: a flag is a false alarm) | 200 | 3 | 1.5 % |" in text
    assert "| grey noise | 20 | 19 | 95 % |" in text
    assert "321 ms" in text and "1 of 200 | 0 | **missed** |" in text  # one error misses the target
    assert "(55 ms here)" in text and "| 480 ms (`/predict` JSON: – ms) | ≤ 400 ms | **missed** |" in text
    assert "| 25.0 s | ≤ 20 s | **missed** |" in text and "| 12.5 s | ≤ 20 s | met |" in text
    readme.write_text(text.replace("321 ms", "300 ms"))
    assert readme_table.main([*args, "--check"]) == 1


def test_generalization_block_marks_the_unseen_source_and_counts_no_tumour_confusions():
    names = ["glioma", "meningioma", "no_tumor", "pituitary"]

    def test_set(cm):
        n = sum(map(sum, cm))
        return {"class_names": names, "confusion_matrix": cm, "accuracy": sum(cm[i][i] for i in range(4)) / n,
                "accuracy_ci95": [0.5, 0.99], "per_class": {"meningioma": {"recall": cm[1][1] / sum(cm[1])}}}

    # BRISC: 2 of 40 tumours called "no tumour", 1 of 10 no-tumour slices called a tumour.
    brisc = test_set([[10, 0, 1, 0], [0, 9, 1, 0], [1, 0, 9, 0], [0, 0, 0, 19]])
    kaggle = test_set([[5, 0, 5, 0], [0, 4, 6, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    runs = [{"meta": {"recipe": "r", "train_datasets": "all"}, "tumor": {"brisc2025_test": brisc,
                                                                         "kaggle_test": kaggle}},
            {"meta": {"recipe": "r", "train_datasets": ["brisc2025"]}, "tumor": {"brisc2025_test": brisc,
                                                                                 "kaggle_test": kaggle}}]
    rows = readme_table.generalization_markdown(runs).splitlines()
    assert rows[2].startswith("| r | BRISC + Kaggle | 0.940 [0.500, 0.990] | 0.900 | 0.050 | 0.100 | 0.725")
    assert "unseen" not in rows[2]
    assert rows[3].startswith("| r | BRISC | 0.940 [0.500, 0.990] | 0.900 | 0.050 | 0.100 | "
                              "0.725 [0.500, 0.990] (unseen source) | 0.400 | 0.367 | 0.000 |")


def test_ood_block_names_where_its_statistics_came_from():
    row = {"n": 10, "false_alarms": 1, "false_alarm_rate": 0.1, "by_check": {"feature_distance": 1}}
    refitted = readme_table.ood_markdown({"model": "/x/checkpoints", "mri": {"test_brisc2025": row},
                                          "fit_subsample": {"train": 2500, "val": 1771}, "false_alarm_target": 0.01})
    assert "fitted on 2500 training slices" in refitted and "over 1771 validation slices" in refitted
    stored = readme_table.ood_markdown({"model": "/x/checkpoints-shared-trunk", "mri": {"test_brisc2025": row},
                                        "fit_subsample": None, "false_alarm_target": 0.01})
    assert "stored in `checkpoints-shared-trunk`" in stored and "| 10 | 1 | 10.0 % |" in stored


def test_recipe_row_reads_training_from_metrics_when_the_checkpoint_is_not_here():
    """A run evaluated from an ignored folder (runs/…) still shows its validation figure and training cost:
    metrics.json carries the training summary, and the README row prefers the checkpoint's own config."""
    from braintumor_flax.checkpoint_info import TrainingRecord

    history = [{"epoch": 1, "val_accuracy": 0.81}, {"epoch": 2, "val_accuracy": 0.92},
               {"kept_epoch": 2, "val_accuracy": 0.92}]
    record = TrainingRecord(recipe="r", config={"epochs": 2}, history={"shared": history},
                            timings_s={"total_s": 1800.0}, machine="test cpu")
    training = evaluate._training_summary(record)
    assert evaluate._training_summary(None) is None and "config" not in training
    metrics = {"meta": {"recipe": "r", "checkpoint": "runs/x", "training": training}, "tumor": {}, "view": {}}
    row = readme_table.recipes_markdown([(metrics, None)]).splitlines()[2]
    assert "| 0.920 |" in row and "| 30 min, test cpu |" in row and "validation by groups" not in row
    grouped = evaluate._training_summary(TrainingRecord(recipe="r", config={"val_grouping": "imagenet:0.85"},
                                                        history={"shared": history}))
    metrics_grouped = {**metrics, "meta": {**metrics["meta"], "training": grouped}}
    assert "| r, validation by groups `imagenet:0.85` |" in readme_table.recipes_markdown([(metrics_grouped, None)])
    edited = {"training": {**training, "history": {"shared": [{"val_accuracy": 0.5}]}}}
    assert "| 0.500 |" in readme_table.recipes_markdown([(metrics, edited)]).splitlines()[2]


def test_recipe_row_of_a_checkpoint_folder_since_replaced(tmp_path):
    """A folder whose model was replaced (its head refitted) no longer speaks for the earlier run: that row reads
    its own metrics.json record and says where the weights went; the new model's row reads the refit stage."""
    from braintumor_flax.checkpoint_info import TrainingRecord

    trunk = [{"epoch": 1, "val_accuracy": 0.90}, {"kept_epoch": 1, "val_accuracy": 0.90}]
    refit = [{"epoch": 1, "val_accuracy": 0.95}, {"kept_epoch": 1, "val_accuracy": 0.95}]
    now = TrainingRecord(recipe="r-refit", history={"shared": trunk, "tumor_head": refit}, timings_s={"total_s": 120})
    (tmp_path / "config.json").write_text(json.dumps({"training": now.to_dict()}))
    before = {"meta": {"recipe": "r", "checkpoint": str(tmp_path),
                       "training": evaluate._training_summary(TrainingRecord(recipe="r", history={"shared": trunk},
                                                                             timings_s={"total_s": 60}))},
              "tumor": {}, "view": {}}
    after = {"meta": {"recipe": "r-refit", "checkpoint": str(tmp_path)}, "tumor": {}, "view": {}}
    runs = [(m, readme_table._checkpoint_config(m)) for m in (after, before)]
    new_row, old_row = readme_table.recipes_markdown(runs).splitlines()[2:4]
    assert "| 0.950 |" in new_row and "| 2 min" in new_row and "git history" not in new_row
    assert "| 0.900 |" in old_row and "| 1 min" in old_row and "before its r-refit (git history)" in old_row
