"""float32 vs float16 storage of a checkpoint: the same images through both, answers compared.

    python benchmarks/compare_precision.py --checkpoint checkpoints --data-dir ../shared/data

The float16 copy is the float32 checkpoint's weights rounded to float16 (what `save_pretrained(dtype="float16")`
stores) and computed in float32, as the app does. Reports, per test set, each copy's tumour and view accuracy,
how many answers differ and the largest probability difference (results/compare_precision.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import machine, write_json  # noqa: E402

from braintumor_flax.calibration import softmax  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402
from braintumor_flax.models.params import flat_params, load_flat_params  # noqa: E402
from braintumor_flax.training.fit_statistics import prepare_training_data  # noqa: E402


def load_rounded_to_fp16(folder: Path) -> BrainTumorPipeline:
    """The checkpoint loaded again, every weight rounded to float16 (and held in float32 for the CPU)."""
    copy = BrainTumorPipeline.load_folder(folder)
    for model in copy.models.values():
        load_flat_params(model, {k: v.astype(np.float16).astype(np.float32) for k, v in flat_params(model).items()})
    return copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints-shared-trunk")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "compare_precision.json")
    args = ap.parse_args()
    load0 = [round(v, 2) for v in os.getloadavg()]
    fp32 = BrainTumorPipeline.load_folder(args.checkpoint)
    fp16 = load_rounded_to_fp16(args.checkpoint)
    data = prepare_training_data(fp32, args.data_dir)
    t_view, t_tumor = fp32.info.calibration.view_temperature, fp32.info.calibration.tumor_temperature
    results = {}
    t0 = time.perf_counter()
    for name in ("val", "test_brisc2025", "test_kaggle"):
        split = data.splits[name]
        outs = {tag: Forward.from_pipeline(p, batch_size=32)(split.images) for tag, p in (("fp32", fp32),
                                                                                        ("fp16", fp16))}
        row: dict = {"n": len(split)}
        for task, labels, temp in (("tumor", split.tumor, t_tumor), ("view", split.plane, t_view)):
            logits = {tag: getattr(o, f"{task}_logits") for tag, o in outs.items()}
            known = labels >= 0
            if not known.any():
                continue
            probs = {tag: softmax(lg, temp) for tag, lg in logits.items()}
            row[task] = {**{f"accuracy_{tag}": float((lg[known].argmax(1) == labels[known]).mean())
                            for tag, lg in logits.items()},
                         "answers_differ": int((logits["fp32"].argmax(1) != logits["fp16"].argmax(1)).sum()),
                         "max_probability_difference": float(np.abs(probs["fp32"] - probs["fp16"]).max())}
        results[name] = row
    write_json(args.out, {"checkpoint": str(args.checkpoint), "splits": results,
                          "seconds": round(time.perf_counter() - t0, 1), "machine": machine(load0)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
