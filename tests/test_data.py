"""Discovery, dedup/leakage policy, splits, cache and augmentation.

Tiny datasets in both publisher layouts are built in tmp_path from real files of
../shared/data, with planted duplicates, leaks, label conflicts and broken files.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from braintumor_flax.data import dedup
from braintumor_flax.data.datasets import Record, Split, _stratified_val, discover, discover_detailed, prepare
from braintumor_flax.data.imageio import decode_image
from braintumor_flax.labels import PLANES, TUMOR_CLASSES

KAGGLE_CLASSES = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
BRISC_CLASSES = {"glioma": "gl", "meningioma": "me", "no_tumor": "no", "pituitary": "pi"}


def _spaced(files: list[Path], n: int, offset: int = 0) -> list[Path]:
    """n files spread over the sorted list: neighbours in a folder are often slices of one patient."""
    step = max(1, len(files) // (n + 1))
    return [files[offset + step * (k + 1)] for k in range(n)]


def _reencode(src: Path, dst: Path, quality: int = 70) -> None:
    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, "JPEG", quality=quality)
    dst.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> dict:
    from tests.conftest import REAL_DATA

    if not (REAL_DATA / "brisc2025").is_dir() or not (REAL_DATA / "kaggle-brain-tumor-mri").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    root = tmp_path_factory.mktemp("data")
    kag = root / "kaggle-copy"  # any folder name: detection is by structure
    bri = root / "nested" / "bri"
    planted: dict[str, str] = {}
    # Kaggle layout: Training|Testing/<class>/
    for cls in KAGGLE_CLASSES:
        for split, n in (("Training", 3), ("Testing", 1)):
            files = sorted((REAL_DATA / "kaggle-brain-tumor-mri" / split / cls).glob("*.jpg"))
            (kag / split / cls).mkdir(parents=True)
            for p in _spaced(files, n):
                shutil.copy(p, kag / split / cls / p.name)
    # BRISC layout: classification_task/{train,test}/<class>/ + masks that must be ignored
    for cls in BRISC_CLASSES:
        for split, n in (("train", 2), ("test", 1)):
            files = sorted((REAL_DATA / "brisc2025/classification_task" / split / cls).glob("*.jpg"))
            (bri / "classification_task" / split / cls).mkdir(parents=True)
            for p in _spaced(files, n):
                shutil.copy(p, bri / "classification_task" / split / cls / p.name)
    (bri / "segmentation_task/train/masks").mkdir(parents=True)
    Image.new("L", (8, 8)).save(bri / "segmentation_task/train/masks/brisc2025_train_00001_gl_ax_t1.png")

    ktr, kte = kag / "Training", kag / "Testing"
    btr = bri / "classification_task/train"
    # a. exact duplicate inside Kaggle training
    src = sorted((ktr / "glioma").glob("*.jpg"))[0]
    shutil.copy(src, ktr / "glioma" / "Tr-dup.jpg")
    planted["within_exact"] = sorted(["kaggle-copy/Training/glioma/Tr-dup.jpg", str(src.relative_to(root))])
    # b. re-encoded copy of a Kaggle test image in Kaggle training (near duplicate leak)
    _reencode(next((kte / "meningioma").glob("*.jpg")), ktr / "meningioma" / "Tr-reenc.jpg")
    planted["leak_near"] = "kaggle-copy/Training/meningioma/Tr-reenc.jpg"
    # c. a Kaggle test image copied into BRISC training (cross-dataset exact leak)
    shutil.copy(next((kte / "glioma").glob("*.jpg")), btr / "glioma" / "brisc2025_train_09000_gl_ax_t1.jpg")
    planted["leak_exact_cross"] = "nested/bri/classification_task/train/glioma/brisc2025_train_09000_gl_ax_t1.jpg"
    # d. identical image with a conflicting plane label
    src = next((btr / "pituitary").glob("*.jpg"))
    conflict_copy = btr / "pituitary" / "brisc2025_train_09001_pi_xx_t1.jpg"
    plane_code = {"ax": "co", "co": "sa", "sa": "ax"}[src.stem.split("_")[4]]
    conflict_copy = conflict_copy.with_name(conflict_copy.name.replace("xx", plane_code))
    shutil.copy(src, conflict_copy)
    planted["conflict"] = [str(p.relative_to(root)) for p in sorted([src, conflict_copy])]
    # e. file name says meningioma, folder says glioma (file name wins)
    men = sorted((REAL_DATA / "brisc2025/classification_task/train/meningioma").glob("*_sa_*.jpg"))[250]
    shutil.copy(men, btr / "glioma" / "brisc2025_train_09002_me_sa_t1.jpg")
    planted["mislabelled"] = "nested/bri/classification_task/train/glioma/brisc2025_train_09002_me_sa_t1.jpg"
    # f. broken files: garbage and a truncated JPEG
    (ktr / "notumor" / "Tr-bad.jpg").write_bytes(b"definitely not a jpeg")
    data = next((ktr / "pituitary").glob("*.jpg")).read_bytes()
    (ktr / "pituitary" / "Tr-trunc.jpg").write_bytes(data[: len(data) // 3])
    planted["broken"] = ["kaggle-copy/Training/notumor/Tr-bad.jpg", "kaggle-copy/Training/pituitary/Tr-trunc.jpg"]
    # g. a left-right mirrored copy of a Kaggle test image, and a blurred, darker one, in training
    test_pit = next((kte / "pituitary").glob("*.jpg"))
    Image.open(test_pit).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        ktr / "pituitary" / "Tr-mirror.jpg", quality=90)
    planted["leak_mirrored"] = "kaggle-copy/Training/pituitary/Tr-mirror.jpg"
    blurred = Image.open(next((kte / "notumor").glob("*.jpg"))).convert("L").filter(ImageFilter.GaussianBlur(1.5))
    blurred.point(lambda v: int(v * 0.8)).save(ktr / "notumor" / "Tr-blurred.jpg", quality=85)
    planted["leak_blurred"] = "kaggle-copy/Training/notumor/Tr-blurred.jpg"
    (kag / "README.txt").write_text("not an image")
    return {"root": root, "planted": planted}


@pytest.fixture
def prepared(fake_root, tmp_cache):
    return prepare(fake_root["root"], image_size=32, val_fraction=0.25, seed=0)


# ---- discovery -----------------------------------------------------------------------------


def test_discover_real_layouts_counts(real_data_dir):
    recs = discover(real_data_dir)
    count = lambda **kw: sum(all(getattr(r, k) == v for k, v in kw.items()) for r in recs)
    assert count(dataset="brisc2025", split="train") == 5000
    assert count(dataset="brisc2025", split="test") == 1000
    assert count(dataset="kaggle", split="train") == 5712
    assert count(dataset="kaggle", split="test") == 1311
    assert count(dataset="kaggle", tumor="no_tumor") == 1595 + 405  # "notumor" folder
    # planes from BRISC file names (README: train ax 1595 / co 1676 / sa 1729)
    assert [count(dataset="brisc2025", split="train", plane=p) for p in PLANES] == [1595, 1676, 1729]
    assert count(dataset="kaggle", plane=None) == 7023
    assert not any(r.path.suffix == ".png" for r in recs)  # segmentation masks ignored


def test_discover_single_dataset_root(real_data_dir):
    recs = discover(real_data_dir / "brisc2025")
    assert len(recs) == 6000 and {r.dataset for r in recs} == {"brisc2025"}


def test_discover_fake_root_labels(fake_root):
    recs, issues = discover_detailed(fake_root["root"])
    by_path = {str(r.path.relative_to(fake_root["root"])): r for r in recs}
    mis = by_path[fake_root["planted"]["mislabelled"]]
    assert (mis.tumor, mis.plane, mis.dataset) == ("meningioma", "sagittal", "brisc2025")
    assert [i["path"] for i in issues] == [str(fake_root["root"] / fake_root["planted"]["mislabelled"])]
    assert {r.dataset for r in recs} == {"kaggle", "brisc2025"}
    assert all(r.plane is None for r in recs if r.dataset == "kaggle")
    assert all(r.plane in PLANES for r in recs if r.dataset == "brisc2025")
    assert not any("masks" in r.path.parts or r.path.suffix == ".txt" for r in recs)


def test_discover_plain_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "x.PNG")
    Image.new("L", (4, 4)).save(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / ".hidden" / "z.png")
    recs = discover(tmp_path)
    assert sorted(r.path.name for r in recs) == ["x.PNG", "y.jpg"]
    assert all(r == Record(r.path, "folder", "predict", None, None) for r in recs)


# ---- prepare: dedup, leakage, splits -------------------------------------------------------


def test_prepare_removes_planted_defects(prepared, fake_root):
    planted, rep = fake_root["planted"], prepared.report
    removed = {r["path"]: r for r in rep["removed"]}
    first, second = planted["within_exact"]  # the first path in sort order is the copy kept
    assert first not in removed
    assert (removed[second]["reason"], removed[second]["kind"], removed[second]["match"]) == (
        "within_split", "exact", first)
    leak = removed[planted["leak_near"]]
    assert (leak["reason"], leak["kind"], leak["cross_dataset"]) == ("train_test_leak", "re-encoded", False)
    assert leak["match"].startswith("kaggle-copy/Testing/meningioma/")
    mirrored, blurred = removed[planted["leak_mirrored"]], removed[planted["leak_blurred"]]
    assert (mirrored["reason"], mirrored["kind"]) == ("train_test_leak", "mirrored")
    assert mirrored["match"].startswith("kaggle-copy/Testing/pituitary/")
    assert blurred["reason"] == "train_test_leak" and blurred["match"].startswith("kaggle-copy/Testing/notumor/")
    assert leak["match"].startswith("kaggle-copy/Testing/meningioma/")
    cross = removed[planted["leak_exact_cross"]]
    assert (cross["reason"], cross["kind"], cross["cross_dataset"]) == ("train_test_leak", "exact", True)
    assert [c["paths"] for c in rep["conflicts"]] == [planted["conflict"]]
    assert all(removed[p]["reason"] == "conflicting_labels" for p in planted["conflict"])
    assert sorted(s["path"] for s in rep["skipped"]) == planted["broken"]
    assert all(s["reason"] for s in rep["skipped"])
    assert len(removed) == 7, removed  # nothing else in the sample is a duplicate


def test_prepare_split_contents(prepared, fake_root):
    s = prepared.splits
    assert sorted(s) == ["test_brisc2025", "test_kaggle", "train", "val"]
    assert len(s["test_kaggle"]) == 4 and len(s["test_brisc2025"]) == 4  # tests are never thinned
    assert len(s["train"]) + len(s["val"]) == 20
    removed = {r["path"] for r in prepared.report["removed"]} | set(fake_root["planted"]["broken"])
    all_paths = [p for sp in s.values() for p in sp.paths]
    assert len(all_paths) == len(set(all_paths)) and not removed & set(all_paths)
    for sp in s.values():
        assert sp.images.shape == (len(sp), 32, 32, 3) and sp.images.dtype == np.uint8
        assert sp.tumor.dtype == np.int32 and sp.plane.dtype == np.int32
        assert len(sp.content_hash) == len(sp) and all(len(h) == 40 for h in sp.content_hash)
        assert ((sp.plane >= 0) == (sp.dataset == "brisc2025")).all()
        assert (sp.tumor >= 0).all()
    # labels line up with paths, and pixels with the files
    tr = s["train"]
    for k, path in enumerate(tr.paths):
        folder = Path(path).parent.name.replace("notumor", "no_tumor")
        if "09002" not in path:
            assert TUMOR_CLASSES[tr.tumor[k]] == folder
    k = tr.paths.index(next(p for p in tr.paths if p.startswith("kaggle-copy")))
    from braintumor_flax.data.imageio import to_model_input
    np.testing.assert_array_equal(tr.images[k], to_model_input(decode_image(fake_root["root"] / tr.paths[k]), 32))


def test_training_from_one_dataset_keeps_every_test_split(prepared):
    from braintumor_flax.training.config import TrainConfig

    only = prepared.training_from(("brisc2025",))
    assert set(only.splits["train"].dataset) == {"brisc2025"} and set(only.splits["val"].dataset) <= {"brisc2025"}
    for name in ("train", "val"):
        kept = [p for p, d in zip(prepared.splits[name].paths, prepared.splits[name].dataset, strict=True)
                if d == "brisc2025"]
        assert only.splits[name].paths == kept
    for name in ("test_brisc2025", "test_kaggle"):
        assert only.splits[name] is prepared.splits[name]
    assert prepared.training_from(()) is prepared
    with pytest.raises(ValueError, match="no images from"):
        prepared.training_from(("brats",))
    config = TrainConfig(train_datasets=("kaggle",))  # recorded in checkpoints as JSON, read back as a tuple
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_prepare_report_is_json_and_formats(prepared):
    import json

    from braintumor_flax.data.datasets import format_report
    json.dumps(prepared.report)
    text = format_report(prepared.report)
    assert "conflicting-label groups (all members dropped): 1" in text and "Tr-bad.jpg" in text


def test_dataset_hash_stable_and_sensitive(fake_root, tmp_cache):
    a = prepare(fake_root["root"], image_size=32, val_fraction=0.25, seed=0)
    b = prepare(fake_root["root"], image_size=32, val_fraction=0.25, seed=0)
    c = prepare(fake_root["root"], image_size=32, val_fraction=0.25, seed=1)
    assert a.dataset_hash == b.dataset_hash != c.dataset_hash
    assert a.splits["val"].paths == b.splits["val"].paths


def test_plain_folder_prepare(tmp_path, tmp_cache):
    Image.new("L", (10, 6), 50).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"junk")
    prep = prepare(tmp_path, image_size=16)
    assert list(prep.splits) == ["predict"]
    sp = prep.splits["predict"]
    assert sp.paths == ["a.png"] and sp.tumor.tolist() == [-1] and sp.plane.tolist() == [-1]
    assert prep.report["skipped"][0]["path"] == "b.png"


# ---- cache ---------------------------------------------------------------------------------


def test_cache_second_run_decodes_nothing_and_rereads_changed_file(fake_root, tmp_path, tmp_cache):
    root = tmp_path / "copy"
    shutil.copytree(fake_root["root"], root)
    first = prepare(root, image_size=32)
    n_files = first.report["cache"]["files"]
    assert 0 < first.report["cache"]["decoded"] < n_files  # byte-identical copies share one entry
    second = prepare(root, image_size=32)
    assert second.report["cache"]["decoded"] == 0 and second.report["cache"]["cache_hits"] == n_files - 2 + 2
    for name in first.splits:
        np.testing.assert_array_equal(first.splits[name].images, second.splits[name].images)
    # change one test image: exactly that file is decoded again, and its new pixels are used
    target = next((root / "kaggle-copy/Testing/pituitary").glob("*.jpg"))
    Image.open(target).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, quality=95)
    third = prepare(root, image_size=32)
    assert third.report["cache"]["decoded"] == 1
    sp = third.splits["test_kaggle"]
    k = sp.paths.index(str(target.relative_to(root)))
    old = second.splits["test_kaggle"].images[k]
    np.testing.assert_allclose(sp.images[k].astype(int), old[:, ::-1].astype(int), atol=12)
    assert third.dataset_hash != second.dataset_hash
    # a different image size is a different cache
    assert prepare(root, image_size=24).report["cache"]["decoded"] == first.report["cache"]["decoded"]


def test_cache_disabled_matches_cached(fake_root, tmp_cache):
    a = prepare(fake_root["root"], image_size=32, cache=False)
    assert not any(tmp_cache.rglob("manifest.json"))
    b = prepare(fake_root["root"], image_size=32)
    assert a.dataset_hash == b.dataset_hash
    np.testing.assert_array_equal(a.splits["train"].images, b.splits["train"].images)


# ---- dedup and split helpers ---------------------------------------------------------------


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300).astype(np.uint64)
    h[10] = h[20] ^ np.uint64(0b101)  # distance 2
    h[30] = h[40]  # distance 0
    i, j, d = dedup.near_pairs(h, 22, block=64)
    got = set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    want = {(a, b, bin(int(h[a]) ^ int(h[b])).count("1")) for a in range(300) for b in range(a + 1, 300)
            if bin(int(h[a]) ^ int(h[b])).count("1") <= 22}
    assert got == want and (10, 20, 2) in got and (30, 40, 0) in got
    assert dedup.nearest_distances(h)[30] == 0 and dedup.nearest_distances(h)[10] == 2


def _item(path, role="train", phash=0, px=None, tumor="glioma", plane=None, dataset="kaggle"):
    return dedup.Item(path, dataset, role, tumor, plane, px or path, phash)


def test_plan_follows_chains_into_groups():
    # a~b and b~c are copies but a and c are not compared alike: one picture, one kept copy per split.
    items = [_item("a", phash=0b0000), _item("b", phash=0b0011), _item("c", phash=0b1111),
             _item("t", role="test_kaggle", phash=0b1111 << 20 | 0b1111), _item("u", phash=0b1111 << 20 | 0b1100)]
    res = dedup.plan(items, threshold=2)
    assert res.keep.tolist() == [True, False, False, True, False]
    assert res.group.tolist() == [0, 0, 0, 3, 3]
    by_path = {r["path"]: r for r in res.removed}
    assert (by_path["b"]["match"], by_path["b"]["kind"]) == ("a", "re-encoded")
    assert (by_path["c"]["match"], by_path["c"]["kind"]) == ("a", "chained")
    assert (by_path["u"]["reason"], by_path["u"]["match"]) == ("train_test_leak", "t")
    assert res.stats["groups"]["with_copies"] == 2


def test_plan_never_removes_test_and_prefers_plane_labels():
    items = [
        _item("k_train", phash=5, px="x"),
        _item("k_test", role="test_kaggle", phash=5, px="x"),
        _item("b_test", role="test_brisc2025", phash=5, px="x", plane="axial", dataset="brisc2025"),
        _item("u1", role="train", phash=2**40, px="y", dataset="kaggle"),
        _item("u2", role="train", phash=2**40, px="y", plane="coronal", dataset="brisc2025"),
    ]
    res = dedup.plan(items, threshold=2)
    assert res.keep.tolist() == [False, True, True, False, True]  # u2 kept: it has a plane label


def test_plan_conflicting_tumour_labels_dropped_everywhere():
    items = [_item("a", px="z", tumor="glioma"), _item("b", role="test_kaggle", px="z", tumor="pituitary"),
             _item("c", phash=2**63 - 1)]
    res = dedup.plan(items)
    assert res.keep.tolist() == [False, False, True] and len(res.conflicts) == 1


def test_stratified_val_fractions_and_seed():
    keys = [("kaggle", "glioma", None)] * 50 + [("brisc2025", "glioma", "axial")] * 10 + [("x", "y", "z")] * 3
    v0, v0b, v1 = (_stratified_val(keys, 0.2, s) for s in (0, 0, 1))
    assert v0[:50].sum() == 10 and v0[50:60].sum() == 2 and v0[60:].sum() == 1
    assert (v0 == v0b).all() and (v0 != v1).any()
    assert not _stratified_val(keys, 0.0, 0).any()


def test_split_subset():
    s = Split("t", np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3), np.arange(4, dtype=np.int32),
              np.full(4, -1, np.int32), np.array(["a", "b", "c", "d"]), ["p0", "p1", "p2", "p3"],
              ["h0", "h1", "h2", "h3"])
    sub = s.subset(np.array([True, False, True, False]))
    assert len(sub) == 2 and sub.paths == ["p0", "p2"] and sub.tumor.tolist() == [0, 2]
    np.testing.assert_array_equal(sub.images[1], s.images[2])
    assert s.subset(np.array([3])).content_hash == ["h3"]


# ---- augmentation --------------------------------------------------------------------------


def test_augment_deterministic_and_any_channels():
    import jax

    from braintumor_flax.training.augment import augment_batch
    x = np.random.default_rng(0).random((6, 8, 8, 5), np.float32)
    a, b = augment_batch(jax.random.key(1), x), augment_batch(jax.random.key(1), x)
    c = augment_batch(jax.random.key(2), x)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_augment_flips_are_exact_flips():
    import jax

    from braintumor_flax.training.augment import augment_batch
    x = np.random.default_rng(0).random((16, 6, 7, 3), np.float32)
    y = np.asarray(augment_batch(jax.random.key(3), x, zoom=0.0))
    kinds = []
    for xi, yi in zip(x, y, strict=True):
        options = [xi, xi[:, ::-1], xi[::-1], xi[::-1, ::-1]]
        match = [k for k, o in enumerate(options) if np.allclose(yi, o)]
        assert len(match) == 1
        kinds.append(match[0])
    assert len(set(kinds)) > 1  # flips are random per sample, not per batch
    only_h = np.asarray(augment_batch(jax.random.key(3), x, vflip=False, zoom=0.0))
    assert all(np.allclose(o, xi) or np.allclose(o, xi[:, ::-1]) for o, xi in zip(only_h, x, strict=True))


def test_augment_zoom_keeps_centre_and_zero_fills():
    import jax

    from braintumor_flax.training.augment import augment_batch
    ones = np.ones((32, 16, 16, 1), np.float32)
    y = np.asarray(augment_batch(jax.random.key(0), ones, hflip=False, vflip=False, zoom=0.3))
    np.testing.assert_allclose(y[:, 6:10, 6:10], 1.0, atol=1e-5)  # the centre always stays inside
    means = y.mean(axis=(1, 2, 3))
    assert (means < 0.99).any() and np.isclose(means, 1.0).any()  # some zoom out (black border), some in
    assert y.min() >= 0 and y.max() <= 1 + 1e-5


# ---------------------------------------------------------------------------------------------
# validation drawn by groups of look-alike images (data/grouping.py)


def test_linked_groups_follow_chains_and_cosine_pairs_find_look_alikes():
    from braintumor_flax.data.grouping import cosine_pairs, linked_groups

    # 0-1 and 1-2 linked, 0-2 not: one chain; 3-4 linked; 5 alone
    groups = linked_groups(6, np.array([0, 1, 3]), np.array([1, 2, 4]))
    assert groups.tolist() == [0, 0, 0, 3, 3, 5]
    features = np.array([[1, 0], [0.95, 0.3], [0, 1], [-1, 0]], np.float32)
    first, second = cosine_pairs(features, 0.9, block=3)  # a block edge inside the rows
    assert list(zip(first.tolist(), second.tolist(), strict=True)) == [(0, 1)]


def test_grouping_specs_are_checked():
    from braintumor_flax.data.grouping import parse_grouping

    assert parse_grouping("") is None
    assert parse_grouping("imagenet:0.85") == ("imagenet", 0.85)
    assert parse_grouping("phash:6") == ("phash", 6.0)
    for bad in ("imagenet", "cosine:0.9", "phash:x", "0.85"):
        with pytest.raises(ValueError, match="validation grouping"):
            parse_grouping(bad)


def test_grouped_validation_keeps_groups_whole_and_each_stratum_within_its_share():
    from braintumor_flax.data.grouping import grouped_stratified_val

    rng = np.random.default_rng(3)
    n = 400
    keys = [("d", int(c)) for c in rng.integers(0, 3, n)]
    groups = rng.integers(0, 120, n)  # groups of about 3, mixing strata
    val = grouped_stratified_val(keys, groups, 0.2, seed=0)
    for g in np.unique(groups):  # never split between training and validation
        assert len(set(val[groups == g].tolist())) == 1
    totals, taken = _stratum_counts(keys, np.ones(n, bool)), _stratum_counts(keys, val)
    assert all(taken.get(k, 0) <= round(total * 0.2) for k, total in totals.items())
    assert val.sum() >= 0.15 * n  # small groups fill most of the share
    assert (grouped_stratified_val(keys, groups, 0.2, seed=0) == val).all()
    assert (grouped_stratified_val(keys, groups, 0.2, seed=1) != val).any()
    # All singletons: exactly the share of every stratum, as the one-by-one draw gives.
    singles = grouped_stratified_val(keys, np.arange(n), 0.2, seed=0)
    assert _stratum_counts(keys, singles) == _stratum_counts(keys, _stratified_val(keys, 0.2, 0))


def _stratum_counts(keys: list[tuple], mask: np.ndarray) -> Counter:
    return Counter(key for key, v in zip(keys, mask, strict=True) if v)


def test_prepare_with_grouping_leaves_no_look_alike_across_train_and_validation(fake_root, tmp_cache):
    """Real images: with "imagenet:C" no validation image is within C (cosine) of a training image, at any
    training size; the random draw's hash is the one every earlier checkpoint recorded."""
    from braintumor_flax.data.datasets import format_report
    from braintumor_flax.models.pretrained import imagenet_features
    from braintumor_flax.training.config import TrainConfig

    root = fake_root["root"]
    random_draw = prepare(root, image_size=32, val_fraction=0.25, seed=0)
    assert prepare(root, image_size=32, val_fraction=0.25, seed=0, val_grouping="").dataset_hash \
        == random_draw.dataset_hash
    at_128 = prepare(root, image_size=128, val_fraction=0.25, seed=0)

    image_at_128 = {p: image for name in ("train", "val")
                    for p, image in zip(at_128.splits[name].paths, at_128.splits[name].images, strict=True)}

    def unit_features(split: Split) -> np.ndarray:
        f = imagenet_features(np.stack([image_at_128[p] for p in split.paths])).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    pool = np.concatenate([unit_features(random_draw.splits["train"]), unit_features(random_draw.splits["val"])])
    similarity = pool @ pool.T - 2 * np.eye(len(pool))
    threshold = float(np.median(similarity.max(axis=1)))  # links about half of the images to a neighbour
    spec = f"imagenet:{threshold:.4f}"
    with pytest.raises(ValueError, match="needs the ImageNet features"):  # the data package imports no model
        prepare(root, image_size=32, val_fraction=0.25, seed=0, val_grouping=spec)
    split = TrainConfig(val_fraction=0.25, seed=0, val_grouping=spec).split_args()
    grouped = prepare(root, image_size=32, **split)
    assert grouped.dataset_hash != random_draw.dataset_hash
    assert grouped.report["val_grouping"]["val_images"] == len(grouped.splits["val"])
    assert f"validation by groups ({spec})" in format_report(grouped.report)
    assert grouped.splits["val"].paths == prepare(root, image_size=64, **split).splits["val"].paths
    train, val = unit_features(grouped.splits["train"]), unit_features(grouped.splits["val"])
    assert len(val) > 0 and len(train) + len(val) == len(pool)
    assert (val @ train.T).max() < float(f"{threshold:.4f}")
    # Post-ReLU features are never opposed: at cosine 0 every image joins one group, too large for validation.
    everything = TrainConfig(val_fraction=0.25, seed=0, val_grouping="imagenet:0").split_args()
    assert len(prepare(root, image_size=32, **everything).splits["val"]) == 0
    phash = prepare(root, image_size=32, val_fraction=0.25, seed=0, val_grouping="phash:64")
    assert len(phash.splits["val"]) == 0  # every hash is within 64 bits of every other
