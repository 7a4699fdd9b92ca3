"""Two-stage training with Optax: stage 1 the view model, stage 2 the tumour model on frozen view features.

`StageTrainer` runs epochs of the module-level jitted `steps.train_step` over one model's data and keeps its
resumable state; batches are sharded over all local devices along a "data" mesh axis. Features the stages
read from frozen parts (lower-block outputs, the view model's 128-d feature) come from `models.forward`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from braintumor_flax.checkpoint_info import CheckpointInfo, TrainingRecord
from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models import ModelConfig, TumorClassifier, ViewClassifier, build_model
from braintumor_flax.models.forward import Forward, pad_rows, padded_chunks
from braintumor_flax.models.params import flat_params, load_flat_params, lower_blocks_digest, weights_digest
from braintumor_flax.models.pretrained import assign_vgg16, load_imagenet_vgg16
from braintumor_flax.models.shared_trunk import SharedTrunkClassifier, build_shared_trunk
from braintumor_flax.paths import cache_dir
from braintumor_flax.training.augment import StyleRandomize, style_randomize
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.training.steps import Model, StepSettings, TrainState, eval_step, make_optimizer, train_step
from braintumor_flax.xla import cpu_model

STYLE = StyleRandomize()  # the settings of TrainConfig.style_variants


@dataclasses.dataclass
class StageData:
    """What one stage trains or validates on: inputs (pixels or lower features), labels, view features."""

    inputs: np.ndarray
    labels: np.ndarray
    extra: np.ndarray | None = None
    # Training only: style-randomised copies of `inputs` [V, N, ...] (TrainConfig.style_variants); each step
    # takes, per example, the clean input or one of the copies at random.
    variants: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch_inputs(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = self.inputs[idx]
        if self.variants is None:
            return x
        pick = rng.integers(0, len(self.variants) + 1, len(idx))  # 0: the clean input
        for v in range(len(self.variants)):
            rows = pick == v + 1
            x[rows] = self.variants[v][idx[rows]]
        return x


def _mesh() -> Mesh:
    # Auto axis: XLA propagates the batch sharding (explicit sharding-in-types would reject the per-sample
    # vmap in augmentation, whose keys are not sharded).
    return jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(AxisType.Auto,))


class StageTrainer:
    """Holds the train state of one model and runs epochs over a StageData."""

    def __init__(self, model: Model, config: TrainConfig, *, from_lower: bool, steps_per_epoch: int, name: str,
                 from_pooled: bool = False):
        self.config, self.from_lower, self.name = config, from_lower, name
        self.mesh = _mesh()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        state = TrainState.create(model, make_optimizer(config, steps_per_epoch),
                                  StepSettings.of(config, from_lower=from_lower, from_pooled=from_pooled),
                                  frozen_blocks=config.frozen_blocks)
        self.state = jax.device_put(state, self.replicated)

    # -- state ------------------------------------------------------------------------------------------
    def model(self) -> Model:
        return self.state.model()

    def save_state(self, path: Path, epoch: int, history: list[dict], depends_on: str = "") -> None:
        """Resumable state as plain arrays (npz without pickles) + JSON; structure comes from the code."""
        _write_leaves(path, (self.state.params, self.state.opt_state))
        path.with_suffix(".json").write_text(
            json.dumps({"epoch": epoch, "history": history, "depends_on": depends_on}, indent=1))

    def load_state(self, path: Path) -> tuple[int, list[dict]]:
        meta = json.loads(path.with_suffix(".json").read_text())
        params, opt_state = _read_leaves(path, (self.state.params, self.state.opt_state))
        self.state = jax.device_put(self.state.replace(params=params, opt_state=opt_state), self.replicated)
        return int(meta["epoch"]), list(meta["history"])

    # -- loops ------------------------------------------------------------------------------------------
    def _shard(self, array: np.ndarray | None) -> jax.Array | None:
        return None if array is None else jax.device_put(array, self.batch_sharding)

    def run_epoch(self, data: StageData, epoch: int) -> dict[str, float]:
        bs = self.config.batch_size
        n_dev = jax.local_device_count()
        if bs % n_dev:
            raise ValueError(f"batch size {bs} must be divisible by the {n_dev} local devices")
        # Seeded shuffle per (stage, epoch); the last partial batch is dropped so every step has one shape.
        rng = np.random.default_rng([self.config.seed, name_seed(self.name), epoch])
        order = rng.permutation(len(data))
        variant_rng = np.random.default_rng([self.config.seed, name_seed(self.name), epoch, 1])
        steps = len(data) // bs
        if steps == 0:
            raise ValueError(f"{self.name}: {len(data)} training examples are fewer than one batch of {bs}")
        base_key = jax.random.fold_in(jax.random.key(self.config.seed), name_seed(self.name))
        losses, accs = [], []
        bar = tqdm(range(steps), desc=f"{self.name} epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                   dynamic_ncols=True, mininterval=2.0)
        for step in bar:
            idx = np.sort(order[step * bs : (step + 1) * bs])
            key = jax.random.fold_in(base_key, epoch * steps + step)
            extra = data.extra[idx] if data.extra is not None else None
            inputs = data.batch_inputs(idx, variant_rng)
            self.state, loss, acc = train_step(self.state, self._shard(inputs), self._shard(extra),
                                               self._shard(data.labels[idx]), key)
            losses.append(loss)
            accs.append(acc)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{float(np.mean(accs[-10:])):.3f}")
        return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accs))}

    def predict_logits(self, data: StageData) -> Any:
        """Deterministic logits over fixed-size (padded) batches, a multiple of the device count (the shared-trunk
        model: a (view, tumour) pair)."""
        n_dev = jax.local_device_count()
        batch_size = max(n_dev, self.config.eval_batch_size - self.config.eval_batch_size % n_dev)
        parts = []
        for start, rows, padded in padded_chunks(len(data), batch_size):
            x = jnp.asarray(pad_rows(data.inputs, start, rows, padded))
            extra = None if data.extra is None else jnp.asarray(pad_rows(data.extra, start, rows, padded))
            parts.append(jax.tree.map(lambda a, r=rows: np.asarray(a)[:r], eval_step(self.state, x, extra)))
        if not parts:
            raise ValueError("nothing to predict")
        return jax.tree.map(lambda *p: np.concatenate(p), *parts)

    def evaluate(self, data: StageData) -> dict[str, float]:
        """Validation loss and accuracy (the shared-trunk model: of the tumour head, plus the view head's)."""
        logits = self.predict_logits(data)
        if not self.state.settings.multitask:
            return _loss_and_accuracy(logits, data.labels)
        view, tumor = (_loss_and_accuracy(lg, data.labels[:, i]) for i, lg in enumerate(logits))
        return {**tumor, "view_loss": view["loss"], "view_accuracy": view["accuracy"]}


def _write_leaves(path: Path, tree: Any) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))})
    tmp.replace(path.with_suffix(".npz"))


def _read_leaves(path: Path, like: Any) -> Any:
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as data:
        leaves = [data[f"leaf_{i:05d}"] for i in range(len(data.files))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    known = labels >= 0
    if not known.any():
        return {"loss": float("nan"), "accuracy": float("nan")}
    loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits[known]), jnp.asarray(labels[known]))
    return {"loss": float(loss.mean()), "accuracy": float((logits[known].argmax(-1) == labels[known]).mean())}


def name_seed(text: str) -> int:
    """A stable 31-bit seed from a stage name (shuffles and dropout keys differ between stages)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def view_outputs(view_model: ViewClassifier, inputs: np.ndarray, *, from_lower: bool, batch_size: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(view logits, 128-d view features), deterministic, from pixels or from cached lower-block features."""
    forward = Forward(view_model, batch_size=batch_size)
    out = forward(lower=inputs) if from_lower else forward(inputs)
    return out.view_logits, out.view_feature


# ----------------------------------------------------------------------------------------------- lower-feature cache
def lower_features(model: Model, split: Split, *, batch_size: int = 32, use_cache: bool = True,
                   style: tuple[StyleRandomize, int] | None = None) -> np.ndarray:
    """float16 [N, *lower_shape] outputs of the frozen lower blocks, computed once per image and cached
    on disk by (weights digest, file content hash): reruns, resumed runs and stage 2 reuse them.

    `style` = (settings, variant ≥ 1): the outputs for that style-randomised copy of every image instead (its
    curve seeded by the image's content hash and the variant, so the cache can always be recomputed)."""
    forward = Forward(model if isinstance(model, ViewClassifier) else None,
                      model if isinstance(model, TumorClassifier) else None, batch_size=batch_size)

    def pixels(rows: list[int] | slice) -> np.ndarray:
        images = split.images[rows]
        if style is None:
            return images
        hashes = np.asarray(split.content_hash)[rows]
        return style_randomize(images, [[int(h[:15], 16), style[1]] for h in hashes], style[0])

    if not use_cache:
        return forward.lower(pixels(slice(None))).astype(np.float16)
    folder = cache_dir("features", lower_blocks_digest(model)[:16],
                       *([] if style is None else [f"style-{style[0].digest()}-{style[1]}"]))
    files = [folder / f"{h}.npy" for h in split.content_hash]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    chunk = 512  # written as we go, so an interrupted extraction resumes where it stopped
    what = "" if style is None else f", style copy {style[1]}"
    for start in tqdm(range(0, len(todo), chunk), desc=f"lower VGG blocks ({split.name}{what}, {len(todo)} new images)",
                      unit="chunk", dynamic_ncols=True):
        rows = todo[start : start + chunk]
        feats = forward.lower(pixels(rows))
        for i, feat in zip(rows, feats.astype(np.float16), strict=True):
            tmp = files[i].with_suffix(".tmp.npy")
            np.save(tmp, feat)
            tmp.replace(files[i])
    if not files:
        return np.zeros((0, *forward.lower_shape), np.float16)
    return np.stack([np.load(f) for f in files])


# ----------------------------------------------------------------------------------------------- stages
def build_models(config: TrainConfig, weights_source: str | Path | None = None) -> tuple[ViewClassifier,
                                                                                          TumorClassifier]:
    """Both models with the ImageNet VGG16 convolutions (random ones for `config.pretrained=False`)."""
    view_config = ModelConfig("view", image_size=config.image_size, width_divisor=config.width_divisor,
                              lower_blocks=config.lower_blocks)
    tumor_config = dataclasses.replace(view_config, task="tumor")
    if not config.use_view_feature:
        tumor_config = dataclasses.replace(tumor_config, view_projection_dim=0)
    view, tumor = build_model(view_config, seed=config.seed), build_model(tumor_config, seed=config.seed + 1)
    if config.pretrained:
        weights = load_imagenet_vgg16(weights_source)
        for model in (view, tumor):
            assign_vgg16(model.vgg, weights)
    else:
        # The same random lower blocks in both models, as the ImageNet ones would be: they stay shareable.
        nnx.update(tumor.vgg, nnx.state(view.vgg))
    return view, tumor  # type: ignore[return-value]


def fit_stage(trainer: StageTrainer, train: StageData, val: StageData, state_path: Path, resume: bool,
              log: Callable[[str], None], depends_on: str) -> list[dict]:
    """Train for the configured epochs, saving a resumable state after each one.

    `depends_on` digests what the state was computed from (data, config, and for stage 2 the view model):
    a saved state made from anything else is stale and training of this stage restarts from scratch.
    """
    start_epoch, history = 0, []
    best: tuple[float, int, Any] | None = None  # (val accuracy, epoch, params) with config.keep_best
    # The best epoch's parameters are saved beside the state, so a resumed run (also one resumed after its last
    # epoch) still keeps the best epoch of the whole run, not of its resumed part.
    best_path = state_path.with_name(state_path.name + "_best")
    if resume and state_path.with_suffix(".npz").is_file():
        saved = json.loads(state_path.with_suffix(".json").read_text()).get("depends_on")
        if saved == depends_on:
            start_epoch, history = trainer.load_state(state_path)
            log(f"{trainer.name}: resumed after epoch {start_epoch}")
            if trainer.config.keep_best and best_path.with_suffix(".npz").is_file():
                meta = json.loads(best_path.with_suffix(".json").read_text())
                if meta.get("depends_on") == depends_on and meta["epoch"] <= start_epoch:
                    params = jax.device_put(_read_leaves(best_path, trainer.state.params), trainer.replicated)
                    best = (meta["val_accuracy"], meta["epoch"], params)
        else:
            log(f"{trainer.name}: saved state was made from other inputs; training this stage from scratch")
    for epoch in range(start_epoch, trainer.config.epochs):
        t0 = time.perf_counter()
        stats = trainer.run_epoch(train, epoch)
        val_stats = trainer.evaluate(val) if len(val) else {}
        entry = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()},
                 **{f"val_{k}": v for k, v in val_stats.items()}, "seconds": round(time.perf_counter() - t0, 1)}
        history.append(entry)
        log(f"{trainer.name} epoch {epoch + 1}/{trainer.config.epochs}: " + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "epoch"))
        score = val_stats.get("accuracy", float("nan"))
        if trainer.config.keep_best and score == score and (best is None or score > best[0]):
            best = (score, epoch + 1, trainer.state.params)
            _write_leaves(best_path, best[2])
            best_path.with_suffix(".json").write_text(json.dumps(
                {"epoch": epoch + 1, "val_accuracy": score, "depends_on": depends_on}))
        trainer.save_state(state_path, epoch + 1, history, depends_on)
    if best is not None and best[1] != trainer.config.epochs:
        # Model selection on validation only (never a test set): the weights of the best epoch are kept.
        trainer.state = trainer.state.replace(params=best[2])
        log(f"{trainer.name}: kept epoch {best[1]} (validation accuracy {best[0]:.4f})")
    if best is not None:
        history.append({"kept_epoch": best[1], "val_accuracy": best[0]})
    return history


def digest(*parts: Any) -> str:
    """What a saved train state was computed from: JSON-able parts and models (by their weights)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, nnx.Module):
            h.update(weights_digest(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _resume_key(config: TrainConfig) -> dict[str, Any]:
    """Config fields that change what an epoch computes (a constant-rate run can be extended by epochs)."""
    fields = config.to_dict()
    if config.schedule == "constant":
        fields.pop("epochs")
    return fields


def _cap(split: Split, limit: int | None) -> Split:
    """`max_images`: a class-stratified subset (seeded), so a capped run still sees every class."""
    return split.stratified_subset(limit)


def _stage_inputs(config: TrainConfig, data: PreparedData, lower_model: Model
                  ) -> tuple[Split, Split, np.ndarray, np.ndarray]:
    """The (capped) train / val splits and what the models train on: their pixels, or, with the lower blocks
    frozen, the lower blocks' cached outputs."""
    train, val = _cap(data.splits["train"], config.max_images), _cap(data.splits["val"], config.max_images)
    if not config.lower_features_cacheable:
        return train, val, train.images, val.images
    return (train, val, lower_features(lower_model, train, batch_size=config.eval_batch_size),
            lower_features(lower_model, val, batch_size=config.eval_batch_size))


def _style_variants(config: TrainConfig, split: Split, lower_model: Model) -> np.ndarray | None:
    """[V, N, *lower_shape]: the cached lower-block outputs of `config.style_variants` style-randomised copies of
    every training image (None without)."""
    if not config.style_variants:
        return None
    if not config.lower_features_cacheable:
        raise ValueError("style_variants are cached lower-block features: they need frozen, cached lower blocks "
                         "(a recipe training every block uses pixel_augment instead)")
    return np.stack([lower_features(lower_model, split, batch_size=config.eval_batch_size, style=(STYLE, v))
                     for v in range(1, config.style_variants + 1)])


def _training_record(config: TrainConfig, data: PreparedData, history: dict[str, Any],
                     timings: dict[str, float]) -> TrainingRecord:
    counts = {name: len(split) for name, split in data.splits.items()}
    return TrainingRecord(
        recipe=config.recipe, config=config.to_dict(), dataset_hash=data.dataset_hash,
        data_summary=f"split sizes after deduplication {counts}", history=history,
        timings_s={k: round(v, 1) for k, v in timings.items()},
        machine=machine_description(), jax_version=jax.__version__)


def machine_description() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {jax.local_device_count()} × {jax.devices()[0].platform}"


def train_pipeline(config: TrainConfig, data_dir: str | Path | None, run_dir: str | Path, *,
                   resume: bool = False, weights_source: str | Path | None = None,
                   data: PreparedData | None = None, log: Callable[[str], None] = print,
                   view_from: str | Path | None = None) -> BrainTumorPipeline:
    """Stage 1 (view model on plane-labelled images), then stage 2 (tumour model with frozen view features).

    `view_from` takes the view model of an existing checkpoint and skips stage 1 (to retrain only the
    tumour model, e.g. for the ablation without the view feature).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if data is None:
        # Imported here: dataset preparation needs the deduplication libraries, which a GPU machine running
        # packed splits (training.gpu) does not have.
        from braintumor_flax.data.datasets import prepare

        data = prepare(data_dir, image_size=config.image_size, **config.split_args())
    data = data.training_from(config.train_datasets)
    timings["data_s"] = time.perf_counter() - t0
    if config.model == "shared_trunk":
        if view_from is not None:
            raise ValueError("--view-from applies to the two-stage model only")
        pipeline = train_shared_trunk(config, data, run_dir, resume=resume, weights_source=weights_source, log=log)
    else:
        pipeline = _train_two_stage(config, data, run_dir, timings, t0, resume=resume, weights_source=weights_source,
                                    log=log, view_from=view_from)
    if config.head_refit_epochs:
        from braintumor_flax.training.head_refit import refit_tumor_head  # it builds on this module

        refit_tumor_head(pipeline, data, config, run_dir, resume=resume, masks_from=data_dir, log=log)
    return pipeline


def _train_two_stage(config: TrainConfig, data: PreparedData, run_dir: Path, timings: dict[str, float], t0: float,
                     *, resume: bool, weights_source: str | Path | None, log: Callable[[str], None],
                     view_from: str | Path | None) -> BrainTumorPipeline:
    view_model, tumor_model = build_models(config, weights_source)
    t = time.perf_counter()
    train_split, val_split, train_x, val_x = _stage_inputs(config, data, view_model)
    from_lower = config.lower_features_cacheable
    train_styled = _style_variants(config, train_split, view_model)
    timings["lower_features_s"] = time.perf_counter() - t

    # Stage 1: view planes exist only where the file name says (BRISC).
    t = time.perf_counter()
    has_plane, val_has_plane = train_split.plane >= 0, val_split.plane >= 0
    stage1_train = StageData(train_x[has_plane], train_split.plane[has_plane],
                             variants=None if train_styled is None else train_styled[:, has_plane])
    stage1_val = StageData(val_x[val_has_plane], val_split.plane[val_has_plane])
    log(f"stage 1 (view): {len(stage1_train)} train / {len(stage1_val)} val images, recipe {config.recipe}")
    view_trainer: StageTrainer | None = None
    if view_from is not None:
        view_model = BrainTumorPipeline.from_pretrained(view_from).view_model
        if view_model.config.image_size != config.image_size:
            raise ValueError(f"{view_from}: view model is for {view_model.config.image_size} px, "
                             f"not {config.image_size}")
        view_history: list[dict] = [{"reused_from": str(view_from)}]
        log(f"stage 1 skipped: view model taken from {view_from}")
    else:
        steps = max(1, len(stage1_train) // config.batch_size)
        view_trainer = StageTrainer(view_model, config, from_lower=from_lower, steps_per_epoch=steps, name="view")
        view_history = fit_stage(view_trainer, stage1_train, stage1_val, run_dir / "view_state", resume, log,
                                 depends_on=digest(_resume_key(config), data.dataset_hash, "view"))
        view_model = view_trainer.model()
    timings["stage1_s"] = time.perf_counter() - t

    # Stage 2: the view model is frozen; its 128-d feature is computed once per image (no augmentation),
    # and not at all for the ablation, whose tumour model never reads it.
    t = time.perf_counter()
    with_tumor, val_with_tumor = train_split.tumor >= 0, val_split.tumor >= 0
    train_feat = val_feat = None
    if config.use_view_feature:
        _, train_feat = view_outputs(view_model, train_x[with_tumor], from_lower=from_lower,
                                     batch_size=config.eval_batch_size)
        _, val_feat = view_outputs(view_model, val_x[val_with_tumor], from_lower=from_lower,
                                   batch_size=config.eval_batch_size)
    stage2_train = StageData(train_x[with_tumor], train_split.tumor[with_tumor], train_feat,
                             variants=None if train_styled is None else train_styled[:, with_tumor])
    stage2_val = StageData(val_x[val_with_tumor], val_split.tumor[val_with_tumor], val_feat)
    log(f"stage 2 (tumour): {len(stage2_train)} train / {len(stage2_val)} val images, "
        f"view feature {'on' if config.use_view_feature else 'off (ablation)'}")
    steps = max(1, len(stage2_train) // config.batch_size)
    tumor_trainer = StageTrainer(tumor_model, config, from_lower=from_lower, steps_per_epoch=steps, name="tumor")
    tumor_history = fit_stage(tumor_trainer, stage2_train, stage2_val, run_dir / "tumor_state", resume, log,
                              depends_on=digest(_resume_key(config), data.dataset_hash, "tumor", view_model))
    tumor_model = tumor_trainer.model()
    timings["stage2_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    if view_trainer is not None:  # its eval program is compiled already
        view_val_logits = view_trainer.predict_logits(stage1_val)
    else:
        view_val_logits, _ = view_outputs(view_model, stage1_val.inputs, from_lower=from_lower,
                                          batch_size=config.eval_batch_size)
    np.savez(run_dir / "val_outputs.npz", view_logits=view_val_logits, view_labels=stage1_val.labels,
             tumor_logits=tumor_trainer.predict_logits(stage2_val), tumor_labels=stage2_val.labels)
    record = _training_record(config, data, {"view": view_history, "tumor": tumor_history}, timings)
    (run_dir / "training_log.json").write_text(json.dumps(record.to_dict(), indent=1))
    # Bit-identical lower blocks (frozen ImageNet or shared random ones) let the trunk's lower part run once.
    shared = lower_blocks_digest(view_model) == lower_blocks_digest(tumor_model)
    return BrainTumorPipeline(view_model, tumor_model, info=CheckpointInfo(training=record, shared_lower_blocks=shared))



def init_shared_trunk(model: SharedTrunkClassifier, checkpoint: str | Path) -> None:
    """Copy a shared-trunk checkpoint's trunk and both heads into `model` (same architecture and input size)."""
    source = BrainTumorPipeline.from_pretrained(checkpoint)
    if not source.info.shared_trunk:
        raise ValueError(f"{checkpoint}: not a shared-trunk checkpoint")
    theirs, ours = source.view_model.config, model.view.config
    if (theirs.image_size, theirs.width_divisor) != (ours.image_size, ours.width_divisor):
        raise ValueError(f"{checkpoint}: {theirs.image_size} px / width ÷{theirs.width_divisor}, the recipe wants "
                         f"{ours.image_size} px / ÷{ours.width_divisor}")
    # Loaded as equal copies, the view and tumour models give the one trunk the same values.
    for mine, loaded in ((model.view, source.view_model), (model.tumor, source.tumor_model)):
        load_flat_params(mine, flat_params(loaded))


def train_shared_trunk(config: TrainConfig, data: PreparedData, run_dir: Path, *, resume: bool = False,
                       weights_source: str | Path | None = None, log: Callable[[str], None] = print
                       ) -> BrainTumorPipeline:
    """One trunk, both heads, trained together (view loss masked where the plane is unknown)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    view_config = ModelConfig("view", image_size=config.image_size, width_divisor=config.width_divisor,
                              lower_blocks=config.lower_blocks)
    model = build_shared_trunk(view_config, use_view_feature=config.use_view_feature, seed=config.seed)
    if config.init_from:
        init_shared_trunk(model, config.init_from)
        log(f"shared trunk: weights from {config.init_from}")
    elif config.pretrained:
        assign_vgg16(model.view.vgg, load_imagenet_vgg16(weights_source))
    train_split, val_split, train_x, val_x = _stage_inputs(config, data, model.view)
    from_lower = config.lower_features_cacheable
    train_data = StageData(train_x, np.stack([train_split.plane, train_split.tumor], axis=1),
                           variants=_style_variants(config, train_split, model.view))
    val_data = StageData(val_x, np.stack([val_split.plane, val_split.tumor], axis=1))
    log(f"shared trunk: {len(train_data)} train / {len(val_data)} val images, recipe {config.recipe}")
    trainer = StageTrainer(model, config, from_lower=from_lower, steps_per_epoch=max(1, len(train_data) //
                                                                                     config.batch_size), name="shared")
    history = fit_stage(trainer, train_data, val_data, run_dir / "shared_state", resume, log,
                        depends_on=digest(_resume_key(config), data.dataset_hash, "shared"))
    model = trainer.model()
    view_logits, tumor_logits = trainer.predict_logits(val_data)
    np.savez(run_dir / "val_outputs.npz", view_logits=view_logits, view_labels=val_split.plane,
             tumor_logits=tumor_logits, tumor_labels=val_split.tumor)
    record = _training_record(config, data, {"shared": history}, {"total_s": time.perf_counter() - t0})
    (run_dir / "training_log.json").write_text(json.dumps(record.to_dict(), indent=1))
    info = CheckpointInfo(training=record, shared_lower_blocks=True, shared_trunk=True)
    return BrainTumorPipeline(model.view, model.tumor, info=info)
