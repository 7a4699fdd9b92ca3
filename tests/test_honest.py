"""Honest figures: the clean subset (no twin in a checkpoint's training pool), the union of the test sets with
each picture once, and the committed data report's promise that no kept picture sits on two sides."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from braintumor_flax.evaluation import honest

ROOT = Path(__file__).resolve().parents[1]


def test_clean_mask_drops_every_member_of_a_trained_group():
    groups = {"test/a": 0, "train/a_mirror": 0, "test/b": 1, "kaggle/b": 1}
    paths = ["test/a", "test/b", "test/c", "train/x"]
    assert honest.clean_mask(paths, groups, {"train/a_mirror", "train/x"}).tolist() == [False, True, True, False]


def test_union_counts_each_picture_once():
    groups = {"brisc/t1": 0, "kaggle/t1": 0}
    keep = honest.first_of_each_picture(["kaggle/t1", "brisc/t1", "kaggle/t2"], groups)
    assert keep.tolist() == [False, True, True]


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_run_figures_from_prediction_files(tmp_path):
    rows = lambda prefix, pairs: [{"path": f"{prefix}/{k}", "true": t, "predicted": p}  # noqa: E731
                                  for k, (t, p) in enumerate(pairs)]
    _write(tmp_path / "predictions_tumor_brisc2025_test.csv",
           rows("b", [("glioma", "glioma"), ("meningioma", "glioma"), ("meningioma", "meningioma")]))
    _write(tmp_path / "predictions_tumor_kaggle_test.csv", rows("k", [("glioma", "glioma"), ("pituitary", "glioma")]))
    groups = {"b/0": 0, "train/0": 0, "b/2": 1, "k/0": 1}
    figures = honest.run_figures(tmp_path, groups, {"train/0"})
    b, k, u = (figures["tumor"][n] for n in ("brisc2025_test", "kaggle_test", "union_clean"))
    assert b["all"]["n"] == 3 and b["all"]["accuracy"] == pytest.approx(2 / 3)
    assert b["clean"]["n"] == 2 and b["clean"]["accuracy"] == 0.5 and b["clean"]["meningioma_recall"] == 0.5
    assert k["clean"]["n"] == 2 and u["n"] == 3  # b/2 and k/0 are one picture
    assert honest.run_figures(tmp_path / "missing", groups, set()) is None


def test_committed_honest_figures_are_reproduced():
    report, record = ROOT / "results/data_report.json", ROOT / "results/splits/a93346f63416810f.json"
    figures = honest.honest_figures(json.loads(report.read_text()), json.loads(record.read_text()), root=ROOT)
    committed = json.loads((ROOT / "results/honest.json").read_text())
    assert json.loads(json.dumps(figures)) == committed, "rerun python -m braintumor_flax.evaluation.honest"


def test_committed_split_keeps_no_picture_on_two_sides():
    """Every twin group of the committed data report keeps at most one file per role, and never a training and a
    test file together (validation is drawn from the training role, one file per picture)."""
    report = json.loads((ROOT / "results/data_report.json").read_text())
    removed = {r["path"] for r in report["removed"]}
    role_of = {}
    for name, roots in (("train", ("/train/", "/Training/")), ("test", ("/test/", "/Testing/"))):
        for group in report["twin_groups"]:
            for path in group:
                if any(r in path for r in roots):
                    role_of[path] = name
    for group in report["twin_groups"]:
        kept = defaultdict(list)
        for path in group:
            if path not in removed:
                kept[role_of[path], path.split("/")[0]].append(path)
        roles = {role for role, _ in kept}
        assert not ({"train", "test"} <= roles), group
        assert all(len(v) == 1 for v in kept.values()), group
