"""Do pasted tumours help the tumour head on a source it was not fitted on? Two head refits compared on Kaggle.

Both heads are refitted over the same frozen trunk (a shared-trunk checkpoint before its head refit) on BRISC's
training images only: recipe `--a` (default shared-frozen3-refit-pastes: also one slice per no-tumour training
image with a BRISC tumour pasted in, `training/lesion_paste.py`) and recipe `--b` (default shared-frozen3-refit).
They are compared, paired, on Kaggle's training and validation images, whose labels neither head saw; no test
set is part of it. The trunk's blocks 4-5 did see those images in their own training, so this measures the head's
part of the transfer, not the whole model's. Also reported: both heads on BRISC's validation split.

    python benchmarks/eval_paste_transfer.py --checkpoint CHECKPOINT_BEFORE_ITS_REFIT \
        [--out results/paste_transfer.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_common import cpu_ticks, finish  # noqa: E402

from braintumor_flax.evaluation.metrics import paired_accuracy_difference  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.labels import TUMOR_CLASSES  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.config import get_recipe  # noqa: E402
from braintumor_flax.training.fit_statistics import prepare_training_data  # noqa: E402
from braintumor_flax.training.head_refit import refit_tumor_head, trunk_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a shared-trunk checkpoint before its head refit")
    ap.add_argument("--a", default="shared-frozen3-refit-pastes", help="the candidate refit recipe")
    ap.add_argument("--b", default="shared-frozen3-refit", help="the refit recipe it is compared with")
    ap.add_argument("--source", default="brisc2025", help="the heads are fitted on this dataset's images only")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--max-images", type=int, default=None, help="cap per split (smoke runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "paste_transfer.json")
    args = ap.parse_args(argv)
    ticks, t0 = cpu_ticks(), time.perf_counter()
    data_dir = args.data_dir or default_data_dir()
    data = prepare_training_data(BrainTumorPipeline.from_pretrained(args.checkpoint), data_dir)
    own = data.training_from((args.source,))
    others = [data.splits[s].subset(data.splits[s].dataset != args.source) for s in ("train", "val")]
    pools = {"other_source_train_val": others, "own_validation": [own.splits["val"]]}
    answers: dict[str, dict[str, np.ndarray]] = {name: {} for name in pools}
    result: dict = {"checkpoint": str(args.checkpoint), "a": args.a, "b": args.b, "fitted_on": args.source,
                    "sets": {}, "refit_s": {}}
    for key, recipe in (("a", args.a), ("b", args.b)):
        pipeline = BrainTumorPipeline.from_pretrained(args.checkpoint)
        config = get_recipe(recipe, max_images=args.max_images)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            refit_tumor_head(pipeline, own, config, run_dir, masks_from=data_dir)
        result["refit_s"][key] = round(time.perf_counter() - t, 1)
        forward = Forward.from_pipeline(pipeline, batch_size=64)  # compiled once for every image set
        for name, parts in pools.items():
            answers[name][key] = np.concatenate([
                trunk_outputs(pipeline, p, forward=forward)[0].tumor_logits.argmax(axis=1) for p in parts])
    for name, parts in pools.items():
        truth = np.concatenate([p.tumor for p in parts])
        keep = truth >= 0
        entry = paired_accuracy_difference(truth[keep], answers[name]["a"][keep], answers[name]["b"][keep])
        entry["datasets"] = sorted({d for p in parts for d in p.dataset})
        entry["recall"] = {cls: {k: float((a[keep][truth[keep] == c] == c).mean()) for k, a in answers[name].items()}
                           for c, cls in enumerate(TUMOR_CLASSES) if (truth[keep] == c).any()}
        result["sets"][name] = entry
        print(name, entry, flush=True)
    return finish(args.out, result, started=t0, ticks=ticks)


if __name__ == "__main__":
    raise SystemExit(main())
