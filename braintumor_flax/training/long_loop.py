"""The long run's loop (training/long_run.py has the model, the steps and what a state holds): epochs of steps
with a state saved atomically every few minutes, `progress.json` after every few steps, validation of the EMA
weights after every epoch, then the checkpoint. `train.py --recipe shared-long-128` runs it; the background
command (`training/background.py`) starts it at low priority and prints its progress."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from braintumor_flax.data.splits import PreparedData
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.paths import PROJECT_ROOT
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.training.long_run import (
    PROGRESS_FILE,
    STATE_FILE,
    LongData,
    LongState,
    _new_state,
    _score,
    _StopFlag,
    depends_on,
    evaluate,
    kill_if_asked,
    load_run_state,
    long_train_step,
    pipeline_of,
    save_run_state,
    train_long,
)
from braintumor_flax.training.pipeline import machine_description
from braintumor_flax.training.run_files import load_meta, write_json
from braintumor_flax.training.segmentation import MaskSource

PROGRESS_EVERY_S = 20.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of an epoch: a function of (seed, epoch) only; the last partial batch is dropped."""
    return np.random.default_rng([seed, 37, epoch]).permutation(n)


class _Clock:
    """This session's time and step durations, on top of what the saved state had accumulated."""

    def __init__(self, meta: dict[str, Any]):
        self.start, self.elapsed_before = time.monotonic(), float(meta["elapsed_s"])
        self.durations: list[float] = []
        self.saved_sps = meta.get("seconds_per_step")
        self.last_save = self.last_progress = self.start

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.start

    def seconds_per_step(self) -> float | None:
        """The median step of this session after its first (which compiles), else the last session's."""
        if len(self.durations) > 1:
            return float(np.median(self.durations[1:]))
        return self.saved_sps if self.saved_sps is not None else (self.durations[0] if self.durations else None)


def _progress(run_dir: Path, config: TrainConfig, meta: dict[str, Any], clock: _Clock, steps_per_epoch: int,
              status: str, **extra: Any) -> None:
    done = meta["epoch"] * steps_per_epoch + meta["step_in_epoch"]
    total = config.epochs * steps_per_epoch
    sps = clock.seconds_per_step()
    val_s = meta.get("val_seconds") or (sps or 0.0) * steps_per_epoch / 8  # before the first validation: a guess
    eta = None if sps is None else round((total - done) * sps + (config.epochs - meta["epoch"]) * val_s)
    running = meta["running"]
    write_json(run_dir / PROGRESS_FILE, {
        "recipe": config.recipe, "status": status, "pid": os.getpid(), "updated_at": _now(),
        "epoch": meta["epoch"], "epochs": config.epochs, "step": done, "total_steps": total,
        "steps_per_epoch": steps_per_epoch, "step_in_epoch": meta["step_in_epoch"],
        "current_epoch": {"train_loss": float(np.mean(running["loss"])) if running["loss"] else None,
                          "train_seg_loss": float(np.mean(running["seg_loss"])) if running["seg_loss"] else None},
        "history": meta["history"], "best_epoch": meta["best_epoch"],
        "elapsed_s": round(clock.elapsed(), 1), "eta_s": eta, "seconds_per_step": sps,
        "ms_per_image_step": None if sps is None else round(1000 * sps / config.batch_size, 1),
        "last_state_saved_at": meta.get("saved_at"), "last_state_step": meta.get("saved_step"),
        "sessions": meta["sessions"], "machine": machine_description(), **extra})
    clock.last_progress = time.monotonic()


def _fresh_meta(config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    return {"depends_on": depends_on(config, data), "epoch": 0, "step_in_epoch": 0, "history": [],
            "running": {"loss": [], "seg_loss": [], "tumor_accuracy": []}, "best_epoch": None, "best_score": None,
            "elapsed_s": 0.0, "sessions": 1, "seconds_per_step": None, "val_seconds": None}


def _save(run_dir: Path, state: LongState, best: Any, order: np.ndarray, meta: dict[str, Any], clock: _Clock,
          steps_per_epoch: int) -> None:
    meta.update(elapsed_s=round(clock.elapsed(), 3), seconds_per_step=clock.seconds_per_step(), saved_at=_now(),
                saved_step=meta["epoch"] * steps_per_epoch + meta["step_in_epoch"])
    save_run_state(run_dir, state, best, order, meta)
    clock.last_save = time.monotonic()


def _resume(run_dir: Path, state: LongState, best: Any, meta: dict[str, Any], n_train: int,
            log: Callable[[str], None]) -> tuple[LongState, Any, np.ndarray | None, dict[str, Any]]:
    if not (run_dir / STATE_FILE).is_file():
        log(f"{run_dir}: no saved state, starting the run")
        return state, best, None, meta
    saved = load_meta(run_dir / STATE_FILE)
    if saved["depends_on"] != meta["depends_on"]:
        # Hours of work are not thrown away silently: the recipe or the data split changed since it was saved.
        raise SystemExit(f"{run_dir / STATE_FILE} was made with another recipe or data split; move the folder away "
                         "(or delete it) to start this run again")
    state, best, order, meta = load_run_state(run_dir, state, n_train)
    meta["sessions"] += 1
    log(f"{run_dir}: resumed at epoch {meta['epoch'] + 1}, step {meta['step_in_epoch']} of it "
        f"(state saved {meta.get('saved_at')})")
    return state, best, order, meta


def run_epochs(config: TrainConfig, data: PreparedData, masks_from: MaskSource, run_dir: Path, *,
               weights_source: str | Path | None, save_every_s: float, log: Callable[[str], None]
               ) -> BrainTumorPipeline:
    run_dir.mkdir(parents=True, exist_ok=True)
    train = LongData.of(data.splits["train"], masks_from, config.max_images)
    val = LongData.of(data.splits["val"], masks_from, config.max_images)
    bs = config.batch_size
    steps_per_epoch = len(train) // bs
    if not steps_per_epoch:
        raise ValueError(f"{len(train)} training images are fewer than one batch of {bs}")
    state = _new_state(config, steps_per_epoch, weights_source)
    state, best, order, meta = _resume(run_dir, state, state.ema, _fresh_meta(config, data), len(train), log)
    log(f"long run {config.recipe}: {len(train)} train ({int(train.known.sum())} with a mask) / {len(val)} val "
        f"images, {steps_per_epoch} steps an epoch, {config.epochs} epochs")
    clock = _Clock(meta)
    base_key = jax.random.key(config.seed)
    with _StopFlag() as stop:
        _progress(run_dir, config, meta, clock, steps_per_epoch, "training")
        for epoch in range(meta["epoch"], config.epochs):
            if order is None or meta["step_in_epoch"] == 0:
                order = epoch_order(config.seed, epoch, len(train))
            for step in range(meta["step_in_epoch"], steps_per_epoch):
                t = time.monotonic()
                idx = np.sort(order[step * bs:(step + 1) * bs])
                key = jax.random.fold_in(base_key, epoch * steps_per_epoch + step)
                state, loss, aux = long_train_step(state, jnp.asarray(train.images[idx]),
                                                   jnp.asarray(train.labels[idx]), jnp.asarray(train.masks[idx]),
                                                   jnp.asarray(train.known[idx]), key)
                running = meta["running"]
                running["loss"].append(float(loss))
                running["seg_loss"].append(float(aux["seg_loss"]))
                running["tumor_accuracy"].append(float(aux["tumor_accuracy"]))
                meta["step_in_epoch"] = step + 1
                clock.durations.append(time.monotonic() - t)
                kill_if_asked(epoch * steps_per_epoch + step + 1)
                if stop.requested or time.monotonic() - clock.last_save >= save_every_s:
                    _save(run_dir, state, best, order, meta, clock, steps_per_epoch)
                if stop.requested:
                    _progress(run_dir, config, meta, clock, steps_per_epoch, "stopped")
                    raise SystemExit(f"stopped on SIGTERM; state saved at step {meta['saved_step']}")
                if time.monotonic() - clock.last_progress >= PROGRESS_EVERY_S:
                    _progress(run_dir, config, meta, clock, steps_per_epoch, "training")
            best = _end_epoch(config, state, best, val, meta, epoch, log)
            _save(run_dir, state, best, order, meta, clock, steps_per_epoch)
            _progress(run_dir, config, meta, clock, steps_per_epoch, "training")
    _progress(run_dir, config, meta, clock, steps_per_epoch, "finalising")
    kept = best if config.keep_best and meta["best_epoch"] is not None else state.ema
    history = meta["history"] + ([{"kept_epoch": meta["best_epoch"],
                                   "val_accuracy": meta["history"][meta["best_epoch"] - 1]["val_tumor_accuracy"]}]
                                 if config.keep_best and meta["best_epoch"] else [])
    return pipeline_of(config, data, state, kept, val, {"shared": history},
                       {"total_s": clock.elapsed()}, train_mask_slices=int(train.known.sum()))


def _end_epoch(config: TrainConfig, state: LongState, best: Any, val: LongData, meta: dict[str, Any], epoch: int,
               log: Callable[[str], None]) -> Any:
    """Validate the EMA weights; record the epoch; the new best EMA weights (or the old)."""
    t = time.monotonic()
    scores, _ = evaluate(state, state.ema, val, config.eval_batch_size)
    meta["val_seconds"] = round(time.monotonic() - t, 1)
    running = meta["running"]
    entry = {"epoch": epoch + 1, "train_loss": float(np.mean(running["loss"])),
             "train_seg_loss": float(np.mean(running["seg_loss"])),
             "train_tumor_accuracy": float(np.mean(running["tumor_accuracy"])), **scores,
             "val_seconds": meta["val_seconds"]}
    meta["history"].append(entry)
    log(f"long run epoch {epoch + 1}/{config.epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in entry.items()
                                                                       if isinstance(v, float)))
    if meta["best_score"] is None or _score(entry) > meta["best_score"]:
        best, meta["best_epoch"], meta["best_score"] = state.ema, epoch + 1, _score(entry)
    meta.update(epoch=epoch + 1, step_in_epoch=0, running={"loss": [], "seg_loss": [], "tumor_accuracy": []})
    return best


def refuse_committed(path: Path) -> None:
    """Never write into a committed checkpoint folder (checkpoints*/ at the project root)."""
    resolved = Path(path).resolve()
    try:
        first = resolved.relative_to(PROJECT_ROOT).parts[0]
    except (ValueError, IndexError):
        return
    if first.startswith("checkpoints"):
        raise SystemExit(f"{path}: a committed checkpoint folder; the long run writes under runs/ only")


def train_and_save(config: TrainConfig, data: PreparedData, data_dir: str | Path, run_dir: Path, out: Path, *,
                   weights_source: str | Path | None = None, save_every_s: float,
                   log: Callable[[str], None] = print) -> BrainTumorPipeline:
    """The whole run: train (or resume), then the finalisation every recipe gets, then the checkpoint in `out`."""
    from braintumor_flax.training.fit_statistics import finalize_pipeline  # it imports the pipeline module

    refuse_committed(out)
    refuse_committed(run_dir)
    pipeline = train_long(config, data, data_dir, run_dir, weights_source=weights_source, save_every_s=save_every_s,
                          log=log)
    finalize_pipeline(pipeline, data)  # temperatures and OOD statistics, on validation
    pipeline.save_pretrained(out)
    progress = run_dir / PROGRESS_FILE
    write_json(progress, {**json.loads(progress.read_text()), "status": "done", "checkpoint": str(out),
                          "updated_at": _now()})
    log(f"long run {config.recipe}: checkpoint saved to {out}")
    return pipeline
