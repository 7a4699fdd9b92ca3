"""Two checkpoints trained on one source, compared on another source's *training* images: a selection set that
neither model saw and that no test set is part of.

Leave-one-dataset-out checkpoints (`train.py --train-datasets brisc2025`) never see Kaggle's training and
validation images, so those images can choose between two recipes for robustness to an unseen source without
touching a test set; the recipe chosen is then trained on all data and tested as usual. Also reported: each
checkpoint's own validation accuracy (its training source), paired: for two checkpoints trained on all data
that is the only set.

    python benchmarks/compare_unseen_source.py --a runs/ckpt-lodo-brisc-views --b runs/ckpt-lodo-brisc-refit \
        [--out results/unseen_source_views.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_common import cpu_ticks, finish  # noqa: E402

from braintumor_flax.data.datasets import prepare  # noqa: E402
from braintumor_flax.evaluation.metrics import paired_accuracy_difference  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.labels import TUMOR_CLASSES  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.config import TrainConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="the candidate checkpoint")
    ap.add_argument("--b", type=Path, required=True, help="the checkpoint it is compared with")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "unseen_source.json")
    args = ap.parse_args(argv)
    ticks, t0 = cpu_ticks(), time.perf_counter()
    pipelines = {k: BrainTumorPipeline.from_pretrained(p) for k, p in (("a", args.a), ("b", args.b))}
    configs = {k: TrainConfig.from_record(p.info.training) for k, p in pipelines.items()}
    seen = {k: tuple(c.train_datasets) for k, c in configs.items()}
    if seen["a"] != seen["b"]:
        raise SystemExit(f"both checkpoints must be trained on the same datasets, not {seen}")
    if configs["a"].split_args() != configs["b"].split_args():
        raise SystemExit("the checkpoints split the data differently")
    # Each checkpoint reads its own input size; the split does not depend on it (same images, same order).
    sizes = {k: p.view_model.config.image_size for k, p in pipelines.items()}
    data_by_size = {size: prepare(args.data_dir or default_data_dir(), image_size=size, **configs["a"].split_args())
                    for size in sorted(set(sizes.values()))}
    data = data_by_size[sizes["a"]]
    for other in data_by_size.values():
        for name in ("train", "val"):
            if list(other.splits[name].content_hash) != list(data.splits[name].content_hash):
                raise SystemExit(f"the {name} split differs between input sizes")
    result: dict = {"a": str(args.a), "b": str(args.b), "trained_on": list(seen["a"]) or "all",
                    "image_size": sizes, "sets": {}}
    trained = seen["a"] or tuple(sorted(set(data.splits["train"].dataset)))
    # Which rows of which split each pool takes: the same rows at every input size.
    pools = {"unseen_source": {s: ~np.isin(data.splits[s].dataset, trained) for s in ("train", "val")},
             "own_validation": {"val": np.isin(data.splits["val"].dataset, trained)}}
    forwards = {k: Forward.from_pipeline(p, batch_size=64) for k, p in pipelines.items()}  # compiled once each
    for name, rows in pools.items():
        if not sum(int(r.sum()) for r in rows.values()):
            continue

        def gather(d, field: str, rows=rows) -> np.ndarray:
            return np.concatenate([getattr(d.splits[s], field)[r] for s, r in rows.items()])

        truth = gather(data, "tumor")
        keep = truth >= 0
        answers = {k: f(gather(data_by_size[sizes[k]], "images")[keep], want_view=False).tumor_logits.argmax(axis=1)
                   for k, f in forwards.items()}
        entry = paired_accuracy_difference(truth[keep], answers["a"], answers["b"])
        entry["datasets"] = sorted(set(gather(data, "dataset")))
        men = truth[keep] == TUMOR_CLASSES.index("meningioma")
        entry["meningioma_recall"] = {k: float((a[men] == truth[keep][men]).mean()) for k, a in answers.items()}
        result["sets"][name] = entry
        print(name, entry, flush=True)
    return finish(args.out, result, started=t0, ticks=ticks)


if __name__ == "__main__":
    raise SystemExit(main())
