"""Dataset discovery, deduplication and train/val/test splits.

`prepare(data_dir)` is the one entry point training needs; `python -m braintumor_flax.data`
prints the data report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from braintumor_flax.data import dedup, twins
from braintumor_flax.data.grouping import (
    GROUPING_SIZE,
    Features,
    grouped_stratified_val,
    look_alike_groups,
    parse_grouping,
)
from braintumor_flax.data.imagecache import CACHE_VERSION, ImageCache
from braintumor_flax.data.splits import DEFAULT_SEED, DEFAULT_VAL_FRACTION, PreparedData, Record, Split
from braintumor_flax.labels import PLANES, TUMOR_CLASSES, normalize_plane, normalize_tumor
from braintumor_flax.paths import cache_dir, default_data_dir

__all__ = ["DEFAULT_SEED", "DEFAULT_VAL_FRACTION", "PreparedData", "Record", "Split", "discover", "prepare"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
_SPLIT_DIRS = {"train": "train", "training": "train", "test": "test", "testing": "test"}
# brisc2025_<split>_<index>_<tumor>_<plane>_<sequence>
_BRISC_NAME = re.compile(r"^brisc2025_(train|test)_(\d+)_([a-z]+)_([a-z]+)_([a-z0-9]+)$", re.IGNORECASE)
PIPELINE_VERSION = 2  # part of dataset_hash: bump when split/dedup rules change (2: twin groups)
TWIN_SIZE = 128  # the twin finder reads 128 px copies, whatever size a recipe trains at


def _images_under(d: Path) -> list[Path]:
    """Image files below `d` (recursive), skipping hidden files and folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [x for x in dirnames if not x.startswith(".")]
        out += [Path(dirpath, f) for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def _class_dirs(d: Path) -> dict[Path, str]:
    out = {}
    for c in sorted(d.iterdir()):
        if c.is_dir():
            with contextlib.suppress(ValueError):  # not a class folder (e.g. masks/)
                out[c] = normalize_tumor(c.name)
    return out


def _labelled_split_dirs(d: Path) -> dict[Path, str]:
    """Children of `d` that look like <split>/<class>/ folders."""
    out = {}
    for s in sorted(d.iterdir()):
        if s.is_dir() and s.name.lower() in _SPLIT_DIRS and _class_dirs(s):
            out[s] = _SPLIT_DIRS[s.name.lower()]
    return out


def _find_dataset_roots(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        d = Path(dirpath)
        if _labelled_split_dirs(d):
            found.append(d)
            dirnames[:] = []  # a dataset's own sub-folders are not further datasets
    return found


def _dataset_kind(files: list[Path]) -> str:
    # Structure, not folder names: BRISC is the layout whose files carry labels in their names.
    hits = sum(bool(_BRISC_NAME.match(p.stem)) for p in files)
    return "brisc2025" if files and hits * 2 > len(files) else "kaggle"


def discover_detailed(root: str | Path) -> tuple[list[Record], list[dict]]:
    """Records under `root` plus label disagreements between folder and file name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    records: list[Record] = []
    issues: list[dict] = []
    for ds_root in _find_dataset_roots(root):
        by_split = {s: (split, _class_dirs(s)) for s, split in _labelled_split_dirs(ds_root).items()}
        files = [(p, split, tumor) for s, (split, classes) in by_split.items()
                 for c, tumor in classes.items() for p in _images_under(c)]
        kind = _dataset_kind([p for p, _, _ in files])
        for p, split, folder_tumor in files:
            tumor, plane = folder_tumor, None
            m = _BRISC_NAME.match(p.stem)
            if kind == "brisc2025" and m:
                try:
                    name_tumor, plane = normalize_tumor(m.group(3)), normalize_plane(m.group(4))
                except ValueError as exc:
                    issues.append({"path": str(p), "issue": f"unparseable file-name labels ({exc})"})
                    name_tumor = folder_tumor
                if name_tumor != folder_tumor:  # the file name wins
                    issues.append({"path": str(p), "issue": "tumour label: folder says "
                                   f"{folder_tumor}, file name says {name_tumor}; using file name"})
                    tumor = name_tumor
                if _SPLIT_DIRS[m.group(1).lower()] != split:
                    issues.append({"path": str(p), "issue": f"file name says split {m.group(1)}, "
                                   f"folder says {split}; using folder"})
            records.append(Record(p, kind, split, tumor, plane))
    if not records:  # no labelled layout: a plain folder of images to predict on
        records = [Record(p, "folder", "predict", None, None) for p in _images_under(root)]
    return records, issues


def discover(root: str | Path) -> list[Record]:
    """All images under `root`: Kaggle / BRISC layouts (any depth), else a plain folder."""
    return discover_detailed(root)[0]


# ---------------------------------------------------------------------------------------------
# splits


def _stratified_val(keys: list[tuple], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: round(n * fraction) of each stratum, seeded."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    val = np.zeros(len(keys), bool)
    for k in sorted(groups, key=repr):
        idx = np.array(groups[k])
        n_val = int(round(len(idx) * val_fraction))
        val[rng.permutation(idx)[:n_val]] = True
    return val


def _role(r: Record) -> str:
    return "train" if r.split == "train" else ("predict" if r.split == "predict" else f"test_{r.dataset}")


def prepare(data_dir: str | Path | None = None, *, image_size: int = 128, val_fraction: float = DEFAULT_VAL_FRACTION,
            seed: int = DEFAULT_SEED, val_grouping: str = "", look_alike_features: Features | None = None,
            cache: bool = True, workers: int = 2, verbose: bool = False) -> PreparedData:
    """Discover, decode (cached), deduplicate and split the data under `data_dir`.

    Splits: "train", "val" (stratified by dataset x tumour x plane) and "test_<dataset>" per
    labelled dataset; a plain image folder gives a single "predict" split. `val_grouping` draws
    validation by groups of look-alike images (a spec of data/grouping.py, e.g. "imagenet:0.85", whose
    features `look_alike_features` computes); "" draws images one by one.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    records, label_issues = discover_detailed(data_dir)
    t_discover = time.perf_counter() - t0
    rel = [r.path.relative_to(data_dir).as_posix() for r in records]

    if cache:
        store = ImageCache(image_size)
    else:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="braintumor_flax_nocache_")
        store = ImageCache(image_size, root=Path(tmp.name))
    progress = _progress_printer() if verbose else None
    entries, cache_stats = store.lookup([r.path for r in records], workers=workers, progress=progress)
    t_decode = time.perf_counter() - t0

    skipped = [{"path": rel[i], "reason": e.error} for i, e in enumerate(entries) if e.error]
    ok = [i for i, e in enumerate(entries) if not e.error]
    items = [dedup.Item(rel[i], records[i].dataset, _role(records[i]), records[i].tumor, records[i].plane,
                        entries[i].pixel_hash, entries[i].phash) for i in ok]
    t1 = time.perf_counter()
    twin_store = store if image_size == TWIN_SIZE else ImageCache(
        TWIN_SIZE, root=None if cache else Path(tmp.name) / f"s{TWIN_SIZE}")

    def twin_images() -> np.ndarray:
        return twin_store.load(twin_store.lookup([records[i].path for i in ok], workers=workers)[0])

    links = twins.collection_twins(twin_images, [entries[i].sha1 for i in ok],
                                   cache=cache_dir("twins") if cache else None)
    plan = dedup.plan(items, links)
    t_dedup = time.perf_counter() - t1
    kept = [ok[k] for k in np.flatnonzero(plan.keep)]

    def make(name: str, idx: list[int]) -> Split:
        recs = [records[i] for i in idx]
        return Split(
            name=name,
            images=store.load([entries[i] for i in idx]),  # straight into the split's own array
            tumor=np.array([TUMOR_CLASSES.index(r.tumor) if r.tumor else -1 for r in recs], np.int32),
            plane=np.array([PLANES.index(r.plane) if r.plane else -1 for r in recs], np.int32),
            dataset=np.array([r.dataset for r in recs], dtype=str),
            paths=[rel[i] for i in idx],
            content_hash=[entries[i].sha1 for i in idx],
        )

    by_role: dict[str, list[int]] = defaultdict(list)
    for i in kept:
        by_role[_role(records[i])].append(i)
    splits: dict[str, Split] = {}
    grouping: dict | None = None  # how validation was grouped, for the report
    if "train" in by_role:
        pool = by_role.pop("train")
        keys = [(records[i].dataset, records[i].tumor, records[i].plane) for i in pool]
        if parse_grouping(val_grouping) is not None:
            def grouping_images() -> np.ndarray:  # the same split at any training size
                sized = store if image_size == GROUPING_SIZE else ImageCache(
                    GROUPING_SIZE, root=None if cache else Path(tmp.name) / f"s{GROUPING_SIZE}")
                return sized.load(sized.lookup([records[i].path for i in pool], workers=workers)[0])

            groups = look_alike_groups(val_grouping, phashes=np.array([entries[i].phash for i in pool], np.uint64),
                                       images=grouping_images, features=look_alike_features)
            is_val = grouped_stratified_val(keys, groups, val_fraction, seed)
            sizes = np.unique(groups, return_counts=True)[1]
            grouping = {"spec": val_grouping, "groups": len(sizes), "largest_group": int(sizes.max()),
                        "single_images": int((sizes == 1).sum()), "val_images": int(is_val.sum())}
        else:
            is_val = _stratified_val(keys, val_fraction, seed)
        splits["train"] = make("train", [i for i, v in zip(pool, is_val, strict=True) if not v])
        splits["val"] = make("val", [i for i, v in zip(pool, is_val, strict=True) if v])
    for role in sorted(by_role):
        splits[role] = make(role, by_role[role])
    if not cache:
        tmp.cleanup()

    report = _build_report(data_dir, records, rel, splits, skipped, label_issues, plan, items, cache_stats,
                           image_size=image_size, val_fraction=val_fraction, seed=seed, val_grouping=val_grouping)
    if grouping is not None:
        report["val_grouping"] = grouping
    report["timings"] = {"discover_s": round(t_discover, 2), "hash_and_decode_s": round(t_decode - t_discover, 2),
                         "dedup_s": round(t_dedup, 2), "total_s": round(time.perf_counter() - t0, 2)}
    return PreparedData(splits, report, _dataset_hash(splits, image_size, val_fraction, seed, val_grouping),
                        image_size, records)


def _dataset_hash(splits: dict[str, Split], image_size: int, val_fraction: float, seed: int,
                  val_grouping: str = "") -> str:
    grouping = f" grouping={val_grouping}" if val_grouping else ""  # absent for the random draw: old hashes hold
    h = hashlib.sha256(f"v{PIPELINE_VERSION}/{CACHE_VERSION} size={image_size} val={val_fraction} "
                       f"seed={seed}{grouping}\n".encode())
    for name in sorted(splits):
        s = splits[name]
        for p, c, t, pl in sorted(zip(s.paths, s.content_hash, s.tumor.tolist(), s.plane.tolist(), strict=True)):
            h.update(f"{name}\t{p}\t{c}\t{t}\t{pl}\n".encode())
    return h.hexdigest()


def twin_group_ids(report: dict) -> dict[str, int]:
    """Path → twin group number for every file with a copy (a data report's `twin_groups`); a file missing
    from it has no copy."""
    return {path: k for k, paths in enumerate(report.get("twin_groups", [])) for path in paths}


def _progress_printer():
    last = [0.0]

    def show(n: int, total: int) -> None:
        now = time.perf_counter()
        if n == total or now - last[0] > 2:
            last[0] = now
            print(f"\rdecoding {n}/{total}", end="\n" if n == total else "", file=sys.stderr, flush=True)

    return show


# ---------------------------------------------------------------------------------------------
# report


def _build_report(data_dir, records, rel, splits, skipped, label_issues, plan, items, cache_stats, **params) -> dict:
    rows_of: dict[int, list[int]] = defaultdict(list)
    for k, g in enumerate(plan.group.tolist()):
        rows_of[g].append(k)
    # Every picture that has copies, as its files (kept or not): what evaluation needs to count a slice once.
    twin_groups = sorted(sorted(items[k].path for k in rows) for rows in rows_of.values() if len(rows) > 1)
    counts: dict[str, dict] = {}
    for name, s in splits.items():
        table: dict[str, dict[str, int]] = {}
        for t, p in zip(s.tumor.tolist(), s.plane.tolist(), strict=True):
            tn = TUMOR_CLASSES[t] if t >= 0 else "unknown"
            pn = PLANES[p] if p >= 0 else "unknown"
            table.setdefault(tn, {}).setdefault(pn, 0)
            table[tn][pn] += 1
        counts[name] = {"total": len(s), "by_tumor_plane": table,
                        "by_dataset": {d: int(n) for d, n in zip(*np.unique(s.dataset, return_counts=True),
                                                                    strict=True)}}
    discovered: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        discovered[r.dataset][r.split] += 1
    return {
        "data_dir": str(data_dir),
        "params": params,
        "discovered": {d: dict(v) for d, v in discovered.items()},
        "counts": counts,
        "skipped": skipped,
        "label_issues": label_issues,
        "dedup": plan.stats,
        "conflicts": plan.conflicts,
        "removed": plan.removed,
        "twin_groups": twin_groups,
        "cache": cache_stats,
    }


def format_report(report: dict) -> str:
    """Human-readable tables of the report."""
    lines = [f"data: {report['data_dir']}  params: {report['params']}", "", "discovered files:"]
    for ds, by in report["discovered"].items():
        lines.append(f"  {ds:<10} " + "  ".join(f"{k}={v}" for k, v in sorted(by.items())))
    cols = [(t, p) for t in (*TUMOR_CLASSES, "unknown") for p in (*PLANES, "unknown")]
    used = [c for c in cols if any(report["counts"][s]["by_tumor_plane"].get(c[0], {}).get(c[1])
                                   for s in report["counts"])]
    lines += ["", "images per split (tumour / plane):"]
    tumors = [t for t in (*TUMOR_CLASSES, "unknown") if any(c[0] == t for c in used)]
    header = f"  {'split':<16}{'total':>7}" + "".join(f"{t[:10]:>12}" for t in tumors) + "   planes ax/co/sa/?"
    lines.append(header)
    for name, c in report["counts"].items():
        tab = c["by_tumor_plane"]
        per_t = "".join(f"{sum(tab.get(t, {}).values()):>12}" for t in tumors)
        per_p = "/".join(str(sum(tab.get(t, {}).get(p, 0) for t in tab)) for p in (*PLANES, "unknown"))
        ds = ", ".join(f"{d}={n}" for d, n in c["by_dataset"].items())
        lines.append(f"  {name:<16}{c['total']:>7}{per_t}   {per_p}   ({ds})")
    d = report["dedup"]
    g = d["groups"]
    lines += ["", f"duplicates: {g['pictures']} distinct pictures, {g['with_copies']} of them with copies "
                  f"(largest group {g['largest']} files; docs/duplicates.md)"]
    for ds, st in d["per_dataset"].items():
        lines.append(f"  {ds:<10} files={st['files']} distinct pictures={st['distinct_pictures']} "
                     f"distinct pixels={st['distinct_pixels']}")
    lines.append(f"  {'links by kind':<16}{'pairs':>8}{'cross-dataset':>15}{'train-test':>12}")
    for kind, c in d["links_by_kind"].items():
        lines.append(f"  {kind:<16}{c.get('pairs', 0):>8}{c.get('cross_dataset', 0):>15}{c.get('train_test', 0):>12}")
    for sets, count in d["kept_test_groups_shared"].items():
        lines.append(f"  kept test pictures in both {sets.replace('&', ' and ')}: {count}")
    if "twin_finder" in d:
        t = d["twin_finder"]
        lines.append(f"  twin finder: {t['candidates_scored']} candidate pairs scored, {t['twin_pairs']} twins at "
                     f"aligned structure correlation >= {t['threshold']}, {t['seconds']} s")
    lines.append("  removed:")
    for k, v in d["removed_by_reason"].items():
        lines.append(f"    {k:<44}{v:>6}")
    lines.append(f"    {'total':<44}{d['removed_total']:>6}")
    if "val_grouping" in report:
        g = report["val_grouping"]
        lines += ["", f"validation by groups ({g['spec']}): {g['groups']} groups, the largest {g['largest_group']} "
                      f"images, {g['single_images']} alone; {g['val_images']} images in validation"]
    lines += ["", f"conflicting-label groups (all members dropped): {len(report['conflicts'])}"]
    for c in report["conflicts"]:
        lines.append("  " + " = ".join(f"{p} [{t}/{pl}]" for p, t, pl in
                                       zip(c["paths"], c["tumor"], c["plane"], strict=True)))
    lines += ["", f"files skipped: {len(report['skipped'])}"]
    lines += [f"  {s['path']}: {s['reason']}" for s in report["skipped"]]
    if report["label_issues"]:
        lines += ["", f"label issues: {len(report['label_issues'])}"]
        lines += [f"  {x['path']}: {x['issue']}" for x in report["label_issues"]]
    cs = report["cache"]
    lines += ["", f"cache: {cs['cache_hits']} hits, {cs['decoded']} decoded; timings {report.get('timings', {})}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Discover, deduplicate and report on the MRI data.")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-grouping", default="",
                    help="draw validation by groups of look-alike images, e.g. phash:6 (default: one by one; "
                         "the imagenet kind needs the models: train.py and the evaluation draw it)")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here")
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args(argv)
    try:
        prep = prepare(args.data_dir, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed,
                       val_grouping=args.val_grouping, cache=not args.no_cache, verbose=True)
    except ValueError as exc:  # a grouping this command cannot draw (the ImageNet kind needs the models)
        raise SystemExit(f"error: {exc}") from None
    print(format_report(prep.report))
    print(f"\ndataset_hash: {prep.dataset_hash}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**prep.report, "dataset_hash": prep.dataset_hash}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
