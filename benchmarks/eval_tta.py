"""Test-time horizontal flips: does averaging a slice's logits with its mirror image's earn its doubled compute?

Issue 11 allows test-time flips "only if the gain is significant and the cost fits". The rule, fixed before
looking at any test figure: adopt only if the tumour-accuracy gain on **validation** has a paired 95 % interval
above zero. The test sets are reported beside it, never used to decide. Both passes go through the one
forward path (`models.forward.Forward`), the second on the mirrored pixels; the answer with flips is the
argmax of the mean of the two passes' logits (temperatures rescale logits and keep the argmax).

    python benchmarks/eval_tta.py [--model checkpoints-shared-trunk] [--out results/eval_tta.json]
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
from bench_common import cpu_ticks, machine, write_json  # noqa: E402

from braintumor_flax.data.datasets import prepare  # noqa: E402
from braintumor_flax.evaluation.evaluate import TEST_SETS, VAL_SPLIT  # noqa: E402
from braintumor_flax.evaluation.metrics import paired_accuracy_difference  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.labels import TUMOR_CLASSES  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.config import TrainConfig  # noqa: E402


def flip_gain(forward: Forward, images: np.ndarray, tumour: np.ndarray) -> dict:
    """Accuracy with flips minus without, paired, plus meningioma recall each way and the time of each pass."""
    t = time.perf_counter()
    plain = forward(images, want_view=False).tumor_logits
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    mirrored = forward(np.ascontiguousarray(images[:, :, ::-1]), want_view=False).tumor_logits
    mirrored_s = time.perf_counter() - t
    assert plain is not None and mirrored is not None
    single, both = plain.argmax(axis=1), (plain + mirrored).argmax(axis=1)
    out = paired_accuracy_difference(tumour, both, single)
    meningioma = tumour == TUMOR_CLASSES.index("meningioma")
    out["meningioma_recall"] = {"with_flips": float((both[meningioma] == tumour[meningioma]).mean()),
                                "without": float((single[meningioma] == tumour[meningioma]).mean())}
    out["seconds"] = {"one_pass": round(plain_s, 1), "mirrored_pass": round(mirrored_s, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "eval_tta.json"))
    args = ap.parse_args()
    ticks = cpu_ticks()
    pipeline = BrainTumorPipeline.from_pretrained(args.model)
    trained = TrainConfig.from_record(pipeline.info.training)
    data = prepare(args.data_dir or default_data_dir(), image_size=pipeline.view_model.config.image_size,
                   **trained.split_args())
    forward = Forward.from_pipeline(pipeline, batch_size=16)
    result: dict = {"model": args.model, "rule": "adopt only if the validation gain's paired 95 % CI is above 0",
                    "note": "difference = accuracy with flips - without (paired bootstrap, exact McNemar)",
                    "splits": {}}
    for name in [VAL_SPLIT, *TEST_SETS.values()]:
        split = data.splits.get(name)
        if split is None or not len(split):
            continue
        known = split.tumor >= 0
        result["splits"][name] = flip_gain(forward, split.images[known], split.tumor[known])
        print(name, result["splits"][name], flush=True)
    val = result["splits"].get(VAL_SPLIT, {})
    result["adopt"] = bool(val and val.get("difference_ci95", [0])[0] > 0)
    result["cost"] = "a second full forward pass per image: about 2x the model time of every answer"
    result["machine"] = machine(ticks_start=ticks)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
