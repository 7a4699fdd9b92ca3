"""Training cost of the faithful recipe on this machine.

Measures, in one run on the same images: (a) the frozen lower VGG blocks per image (paid once, then cached),
(b) one cached-feature train step (blocks 5 + heads, feature-space augmentation), and the peer (c): the same
step computing the frozen blocks from pixels every time, as a plain implementation of the recipe does.
From these it projects the wall time of both stages on the full deduplicated data, and, given a training log
(`runs/faithful/training_log.json`, written by train.py), reports the measured wall times next to it.

    python benchmarks/bench_training.py --steps 3 --log runs/faithful/training_log.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing


import jax  # noqa: E402
import numpy as np  # noqa: E402

from braintumor_flax.data.datasets import prepare  # noqa: E402
from braintumor_flax.training.config import get_recipe  # noqa: E402
from braintumor_flax.training.pipeline import StageData, StageTrainer, build_models, lower_features  # noqa: E402


def _time_steps(trainer: StageTrainer, data: StageData, steps: int) -> float:
    """Seconds per train step (after one compile step)."""
    bs = trainer.config.batch_size
    key = jax.random.key(0)

    def step(i: int) -> None:
        idx = np.arange(i * bs, (i + 1) * bs) % len(data)
        out = trainer._train_step(trainer.params, trainer.opt_state, trainer.rest, trainer._shard(data.inputs[idx]),
                                  None, trainer._shard(data.labels[idx]), jax.random.fold_in(key, i))
        trainer.params, trainer.opt_state = out[0], out[1]
        jax.block_until_ready(out[2])

    step(0)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--log", type=Path, default=None, help="training_log.json of a real run to report")
    p.add_argument("--out", type=Path, default=Path("results/bench_training.json"))
    args = p.parse_args()
    config = get_recipe("faithful")
    data = prepare(args.data_dir, image_size=config.image_size, **config.split_args())
    train = data.splits["train"]
    n_plane, n_all = int((train.plane >= 0).sum()), len(train)
    n_val = len(data.splits["val"])
    view_model, _ = build_models(config)
    sample = train.subset(np.arange(config.batch_size * 2))

    t0 = time.perf_counter()
    lower = lower_features(view_model, sample, batch_size=config.batch_size, use_cache=False)
    lower_per_image = (time.perf_counter() - t0) / len(sample)  # includes one compile: an upper bound

    labels = np.maximum(sample.plane, 0)
    cached = StageTrainer(view_model, config, from_lower=True, steps_per_epoch=10, name="bench-cached")
    cached_step = _time_steps(cached, StageData(lower, labels), args.steps)
    pixels = StageTrainer(view_model, config, from_lower=False, steps_per_epoch=10, name="bench-pixels")
    pixel_step = _time_steps(pixels, StageData(sample.images, labels), args.steps)

    steps_total = config.epochs * (n_plane // config.batch_size + n_all // config.batch_size)
    projected = {
        "lower_features_s": lower_per_image * (n_all + n_val),
        "train_steps_cached_s": cached_step * steps_total,
        "train_steps_pixels_s": pixel_step * steps_total,
    }
    result = {
        "machine": f"{jax.devices()[0].platform} x{jax.local_device_count()}",
        "images": {"stage1_train": n_plane, "stage2_train": n_all, "val": n_val},
        "seconds_per_image_lower_blocks": round(lower_per_image, 4),
        "seconds_per_step_cached": round(cached_step, 3),
        "seconds_per_step_pixels_peer": round(pixel_step, 3),
        "speedup_cached_vs_pixels_per_step": round(pixel_step / cached_step, 2),
        "projected_total_cached_min": round(
            (projected["lower_features_s"] + projected["train_steps_cached_s"]) / 60, 1),
        "projected_total_pixels_min": round(projected["train_steps_pixels_s"] / 60, 1),
    }
    if args.log and args.log.is_file():
        result["measured_run"] = json.loads(args.log.read_text()).get("timings_s")
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
