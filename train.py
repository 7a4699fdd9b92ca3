"""Train both models and write a checkpoint: `python train.py --data-dir ../shared/data --recipe faithful`."""

from __future__ import annotations

from braintumor_flax.training.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
