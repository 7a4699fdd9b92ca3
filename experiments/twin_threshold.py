"""The twin threshold's evidence: the distribution of the aligned structure correlation over every candidate pair of
the index, and example pairs as pictures on both sides of the threshold (docs/duplicates.md).

    python experiments/twin_threshold.py --data-dir ../shared/data

Writes docs/images/twins_histogram.png, docs/images/twins_{below,above}.png and results/twin_threshold.json.
Neighbouring slices are approximated by BRISC files with consecutive indices in one class folder (BRISC numbers
the slices of a scan in order); they are the pairs a threshold must not merge.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from braintumor_flax.data import twins
from braintumor_flax.data.datasets import discover
from braintumor_flax.data.imagecache import ImageCache

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_INDEX = re.compile(r"brisc2025_(train|test)_(\d+)_")


def consecutive(a: str, b: str) -> bool:
    ma, mb = _INDEX.search(a), _INDEX.search(b)
    return bool(ma and mb and ma[1] == mb[1] and Path(a).parent == Path(b).parent
                and abs(int(ma[2]) - int(mb[2])) == 1)


def montage(pairs: list[tuple[str, str, float, int]], root: Path, out: Path, size: int = 112) -> None:
    sheet = Image.new("L", (size * 4 + 12, (size + 16) * ((len(pairs) + 1) // 2)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, (a, b, score, variant) in enumerate(pairs):
        x, y = (k % 2) * (size * 2 + 12), (k // 2) * (size + 16)
        for n, p in enumerate((a, b)):
            sheet.paste(Image.open(root / p).convert("L").resize((size, size)), (x + n * size, y))
        draw.text((x + 2, y + size + 2), f"{score:.3f} {twins.VARIANT_NAMES[variant]}", fill=0)
    sheet.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.data_dir)
    records = discover(root)
    store = ImageCache(128)
    entries, _ = store.lookup([r.path for r in records])
    ok = [i for i, e in enumerate(entries) if not e.error]
    paths = [records[i].path.relative_to(root).as_posix() for i in ok]
    images = store.load([entries[i] for i in ok])
    views = np.stack([twins.normalised_view(im) for im in images])
    scored = twins.find_twins(views)
    score = scored.score
    # The prefilter's check: every scored pair searched over shifts, whatever its unshifted score.
    full = twins.score_pairs(twins.structure_view(views), scored.first, scored.second, scored.variant)
    missed = int(((full >= scored.threshold) & (score < scored.threshold)).sum())
    neighbour = np.array([consecutive(paths[a], paths[b]) for a, b in zip(scored.first, scored.second, strict=True)])
    labels = np.array([Path(p).parent.name for p in paths])
    disagree = labels[scored.first] != labels[scored.second]

    bins = np.round(np.arange(0.70, 1.0001, 0.01), 2)
    table = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (score >= lo) & (score < hi if hi < 1 else score <= hi)
        table.append({"from": float(lo), "pairs": int(m.sum()), "consecutive_brisc": int(neighbour[m].sum()),
                      "different_folder_label": int(disagree[m].sum())})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.hist(score[score >= bins[0]], bins=bins, color="0.6", label="all candidate pairs")
    ax1.set_yscale("log")
    ax1.axvline(scored.threshold, color="crimson", ls="--", label=f"threshold {scored.threshold}")
    ax1.set_xlabel("aligned structure correlation")
    ax1.set_ylabel("pairs")
    ax1.legend(fontsize=8)
    share = [t["consecutive_brisc"] / max(t["pairs"], 1) for t in table]
    ax2.bar(bins[:-1], share, width=0.009, align="edge", color="steelblue")
    ax2.axvline(scored.threshold, color="crimson", ls="--")
    ax2.set_xlabel("aligned structure correlation")
    ax2.set_ylabel("share of pairs that are consecutive BRISC slices")
    fig.tight_layout()
    fig.savefig("docs/images/twins_histogram.png", dpi=110)

    rng = np.random.default_rng(args.seed)
    for name, lo, hi in (("below", scored.threshold - 0.02, scored.threshold),
                         ("above", scored.threshold, scored.threshold + 0.02)):
        rows = np.flatnonzero((score >= lo) & (score < hi))
        pick = rng.choice(rows, size=min(12, len(rows)), replace=False)
        montage([(paths[scored.first[k]], paths[scored.second[k]], float(score[k]), int(scored.variant[k]))
                 for k in sorted(pick, key=lambda k: score[k])], root, Path(f"docs/images/twins_{name}.png"))
    Path("results/twin_threshold.json").write_text(json.dumps({
        "threshold": scored.threshold, "candidates_scored": len(score), "twins": int(scored.twin.sum()),
        "twins_missed_by_the_prefilter": missed,
        "histogram": table}, indent=1) + "\n")
    print(json.dumps(table, indent=0))


if __name__ == "__main__":
    main()
