"""Does the tumour-mask decoder under- or over-fit? Its Dice on its own training slices against validation.

Issue 15's decoder stops at about 0.80 validation Dice (tumour slices, model grid), and fine-tuning the trunk with
it (`training.joint_segmentation`) moved that by 0.004. Which limit is it? The checkpoint's decoder is scored, with
the served forward path and its own mask threshold, on the BRISC slices with a known mask of the checkpoint's own
training and validation split (no test image): per tumour class, and the share of tumour slices it misses almost
entirely (Dice < 0.1). A training Dice far above validation says overfitting (more data or augmentation); a
training Dice itself far below the target says the decoder or its features cannot fit the masks (capacity).

    python benchmarks/eval_seg_fit.py [--model checkpoints-shared-trunk] [--out results/seg_fit.json]

With `--against B` (another decoder on the same trunk, so the same split), each split also gets B's figures and
the paired difference of tumour-slice Dice, model minus B (bootstrap CI, Wilcoxon signed-rank p): how a new
decoder is chosen on validation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import cpu_ticks, finish  # noqa: E402

from braintumor_flax.evaluation.metrics import paired_mean_difference  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.labels import TUMOR_CLASSES  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.fit_statistics import prepare_training_data  # noqa: E402
from braintumor_flax.training.segmentation import SegData, SegTrainConfig, grid_dice  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints-shared-trunk")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "seg_fit.json")
    ap.add_argument("--against", type=Path, default=None, help="a second checkpoint with a decoder on the same trunk")
    ap.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    args = ap.parse_args()
    t0, ticks = time.perf_counter(), cpu_ticks()
    pipeline = BrainTumorPipeline.from_pretrained(args.model)
    if pipeline.segmenter is None:
        raise SystemExit(f"{args.model} has no segmenter")
    data_dir = args.data_dir or default_data_dir()
    data = prepare_training_data(pipeline, data_dir)  # the checkpoint's own split
    forward = Forward.from_pipeline(pipeline, batch_size=32)
    threshold = pipeline.segmenter.config.threshold
    other = None
    if args.against is not None:
        peer = BrainTumorPipeline.from_pretrained(args.against)
        if peer.segmenter is None or peer.segmenter.config.trunk_digest != pipeline.segmenter.config.trunk_digest:
            raise SystemExit(f"{args.against} has no decoder on the trunk of {args.model}")
        other = (Forward.from_pipeline(peer, batch_size=32), peer.segmenter.config.threshold)
    # The slices the served decoder trained and validated on (BRISC, known masks).
    trained_on = pipeline.segmentation_record.get("config", {}).get("datasets", SegTrainConfig().datasets)
    config = SegTrainConfig(datasets=tuple(trained_on))
    result: dict = {"checkpoint": str(args.model), "threshold": threshold, "splits": {}}
    for name in args.splits:
        slices = SegData.of(data.splits[name], data_dir, config)
        dice = grid_dice(forward(slices.images, segment=True).mask_prob, slices.masks, threshold)
        tumour = slices.masks.any(axis=(1, 2))
        classes = data.splits[name].tumor[slices.rows]
        result["splits"][name] = {
            "slices": len(slices), "tumour_slices": int(tumour.sum()),
            "dice_tumour": float(dice[tumour].mean()),
            "dice_by_class": {c: float(dice[tumour & (classes == i)].mean())
                              for i, c in enumerate(TUMOR_CLASSES) if (tumour & (classes == i)).any()},
            "missed_share": float((dice[tumour] < 0.1).mean()),
            "empty_left_empty": float(dice[~tumour].mean()) if (~tumour).any() else None}
        if other is not None:
            other_dice = grid_dice(other[0](slices.images, segment=True).mask_prob, slices.masks, other[1])
            result["splits"][name]["against"] = {
                "checkpoint": str(args.against), "threshold": other[1],
                "empty_left_empty": float(other_dice[~tumour].mean()) if (~tumour).any() else None,
                "dice_tumour_difference": paired_mean_difference(dice[tumour], other_dice[tumour])}
    return finish(args.out, result, started=t0, ticks=ticks)


if __name__ == "__main__":
    raise SystemExit(main())
