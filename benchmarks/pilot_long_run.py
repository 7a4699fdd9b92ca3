"""Timing pilot of the long CPU run's step (recipe shared-long-128), for sizing its epochs: a few dozen steps at
batch 32 on real data, every block trained or blocks 1-2 frozen (`--frozen-blocks`). Nothing is saved but the
timings (`--out`, JSON).

    python benchmarks/pilot_long_run.py --frozen-blocks 0 --steps 20 --out results/long_run_pilot_f0.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from braintumor_flax.data.datasets import prepare
from braintumor_flax.paths import default_data_dir
from braintumor_flax.training.config import get_recipe
from braintumor_flax.training.long_loop import epoch_order
from braintumor_flax.training.long_run import LongData, _new_state, long_train_step
from braintumor_flax.training.pipeline import machine_description


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--recipe", default="shared-long-128")
    p.add_argument("--frozen-blocks", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 2 untimed: compilation, warm-up)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    config = get_recipe(args.recipe, frozen_blocks=args.frozen_blocks)
    t0 = time.perf_counter()
    data_dir = args.data_dir or default_data_dir()
    data = prepare(data_dir, image_size=config.image_size, **config.split_args()).training_from(config.train_datasets)
    prepare_s = time.perf_counter() - t0
    train = LongData.of(data.splits["train"], data_dir, config.max_images)
    steps_per_epoch = len(train) // config.batch_size
    state = _new_state(config, steps_per_epoch, None)
    order = epoch_order(config.seed, 0, len(train))
    durations = []
    for step in range(args.steps + 2):
        idx = np.sort(order[step * config.batch_size:(step + 1) * config.batch_size])
        t = time.perf_counter()
        state, loss, _ = long_train_step(state, jnp.asarray(train.images[idx]), jnp.asarray(train.labels[idx]),
                                         jnp.asarray(train.masks[idx]), jnp.asarray(train.known[idx]),
                                         jax.random.fold_in(jax.random.key(config.seed), step))
        float(loss)
        durations.append(time.perf_counter() - t)
        print(f"step {step}: {durations[-1]:.2f} s, loss {float(loss):.4f}", flush=True)
    timed = np.asarray(durations[2:])
    result = {"recipe": config.recipe, "frozen_blocks": args.frozen_blocks, "batch_size": config.batch_size,
              "image_size": config.image_size, "timed_steps": len(timed), "first_step_s": round(durations[0], 1),
              "median_step_s": round(float(np.median(timed)), 3), "mean_step_s": round(float(timed.mean()), 3),
              "ms_per_image_step": round(1000 * float(np.median(timed)) / config.batch_size, 1),
              "train_images": len(train), "steps_per_epoch": steps_per_epoch,
              "epoch_s_estimate": round(float(np.median(timed)) * steps_per_epoch),
              "prepare_s": round(prepare_s, 1), "machine": machine_description(),
              "load_average_at_end": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
