"""What the tumour mask adds to the app's compute: the served model's compiled call with and without the
segmenter, interleaved on the same real images (issue 15: at most 30 ms more per image on this CPU).

    python benchmarks/bench_segmentation_cost.py [--rounds 30] [--out results/bench_segmentation_cost.json]

Both arms are the app's own call (`Forward(..., explain=True, pooled=True)`, Grad-CAM and the OOD feature
included), at batch 1 (one upload) and batch 8 (the app's batch size); one warm-up call each, then rounds
alternate the two arms so load drifts hit both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import machine, write_json  # noqa: E402

from braintumor_flax.data.imageio import to_model_input  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.models.forward import Forward  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_segmentation_cost.json"))
    args = ap.parse_args()
    load0 = [round(v, 2) for v in os.getloadavg()]
    pipeline = BrainTumorPipeline.from_pretrained(args.model)
    if pipeline.segmenter is None:
        raise SystemExit(f"{args.model} has no segmenter")
    size = pipeline.view_model.config.image_size
    images = np.stack([to_model_input(np.asarray(Image.open(p).convert("RGB")), size)
                       for p in sorted((ROOT / "examples").glob("*.jpg"))])
    result: dict = {"model": args.model, "rounds": args.rounds}
    for batch in (1, 8):
        forward = Forward.from_pipeline(pipeline, batch_size=batch, lone_chunk_own_shape=True)
        x = np.resize(images, (batch, *images.shape[1:]))
        times: dict[str, list[float]] = {"without": [], "with": []}
        for arm in times:  # compile both programs first
            forward(x, explain=True, pooled=True, segment=arm == "with")
        for _ in range(args.rounds):
            for arm in times:
                t = time.perf_counter()
                forward(x, explain=True, pooled=True, segment=arm == "with")
                times[arm].append((time.perf_counter() - t) * 1000 / batch)
        med = {arm: statistics.median(v) for arm, v in times.items()}
        result[f"batch_{batch}"] = {"ms_per_image_without": round(med["without"], 2),
                                    "ms_per_image_with": round(med["with"], 2),
                                    "extra_ms_per_image": round(med["with"] - med["without"], 2),
                                    "target_extra_ms": 30}
    result["machine"] = machine(load0)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
