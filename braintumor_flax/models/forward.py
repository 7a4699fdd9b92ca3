"""The one forward path: uint8 pixels → lower VGG blocks → view head → tumour head, batched and padded.

Everything that runs the two models goes through `Forward`: the app and API (`serve.predictor`), evaluation,
the post-training fits (temperatures, OOD limits) and training's feature pass (lower-block outputs for the
cache, the frozen view model's 128-d features for stage 2). The composition itself is `two_stage`, traced
inside every compiled program; the optional outputs of the same call are

* Grad-CAM (`explain=True`): the tumour model's last convolution (block5_conv3, before its pooling,
  [B, S/16, S/16, 512]) weighted by the gradient of one tumour logit (the predicted class, or `target`):
  ``w_k = mean_ij d logit_c / d A_ijk``, ``cam_ij = ReLU(sum_k w_k A_ijk)``. The view feature enters the
  tumour head as a constant, so the map explains the tumour branch's own evidence. `cam_method="hirescam"`
  keeps the gradient per position instead, ``cam_ij = ReLU(sum_k d logit_c / d A_ijk * A_ijk)``: each
  position's first-order share of the logit, faithful to a Flatten head where the mean gradient is not
  (benchmarks/eval_explanations.py compares the two against the expert masks);
* the spatial mean of the lower blocks' output (`pooled=True`, [B, 512]: the OOD check's feature);
* the lower blocks' output itself (`keep_lower=True`, for on-disk caches);
* what the tumour head reads (`head_inputs=True`: its branch's last conv pooled and flattened, [B, flat_dim];
  the view feature comes with it), for a refit of that head over the frozen trunk (`training.head_refit`);
* the tumour mask (`segment=True`, [B, S, S] probabilities): the segmentation decoder (`models.segmentation`)
  reads VGG blocks 1-3's activations (a deep decoder also blocks 4-5's) from the same trunk pass.

Lower-block outputs can be passed in instead of pixels (`lower=`), so a cached trunk costs only the heads.
Batches are zero-padded to one shape so each program compiles once; `lone_chunk_own_shape` gives a single
image (the app's interactive case) its own batch-1 program instead of paying for a padded batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from braintumor_flax.models.classifiers import TumorClassifier, ViewClassifier, pooled_features
from braintumor_flax.models.segmentation import TumorSegmenter, encode
from braintumor_flax.xla import cpu_jit

CAM_METHODS = ("gradcam", "hirescam")  # what `explain=True` maps (see the module docstring)


class TwoModels(Protocol):
    """What `Forward.from_pipeline` reads (a `hub.BrainTumorPipeline`; models never import the hub)."""

    view_model: ViewClassifier
    tumor_model: TumorClassifier
    shares_lower_blocks: bool
    shares_trunk: bool
    segmenter: TumorSegmenter | None


@dataclasses.dataclass
class Outputs:
    """Per-image outputs of one call (numpy, float32). Optional parts are None unless requested."""

    view_logits: np.ndarray | None  # [N, 3]; None when neither asked for nor needed by the tumour model
    tumor_logits: np.ndarray | None  # [N, 4]; None for a view-only Forward
    view_feature: np.ndarray | None  # [N, 128]
    cam: np.ndarray | None = None  # [N, h, w] >= 0, not normalised (explain=True)
    target: np.ndarray | None = None  # [N] the tumour class each map explains (explain=True)
    lower_pooled: np.ndarray | None = None  # [N, 512] (pooled=True)
    lower: np.ndarray | None = None  # [N, h, w, 512] (keep_lower=True)
    mask_prob: np.ndarray | None = None  # [N, S, S] in [0, 1] on the model grid (segment=True)
    tumor_pooled: np.ndarray | None = None  # [N, flat_dim] the tumour head's image input (head_inputs=True)


def padded_chunks(n: int, batch_size: int, *, lone_chunk_own_shape: bool = False
                  ) -> Iterator[tuple[int, int, int]]:
    """(start, real rows, padded rows) per chunk of `n` rows: every chunk is padded to `batch_size` (one
    compiled shape), except that with `lone_chunk_own_shape` a chunk of one row keeps batch 1."""
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        yield start, rows, 1 if (rows == 1 and lone_chunk_own_shape) else batch_size


def pad_rows(array: np.ndarray, start: int, rows: int, padded: int, dtype: np.dtype | None = None) -> np.ndarray:
    """array[start:start+rows] zero-padded to `padded` rows."""
    out = np.zeros((padded, *array.shape[1:]), dtype or array.dtype)
    out[:rows] = array[start:start + rows]
    return out


def two_stage(view: ViewClassifier | None, tumor: TumorClassifier | None, view_lower: jax.Array,
              tumor_lower: jax.Array | None, *, want_view: bool, explain: bool = False,
              target: jax.Array | None = None, share_trunk: bool = False,
              upper: dict[str, jax.Array] | None = None, head_inputs: bool = False,
              cam_method: str = "gradcam") -> dict[str, jax.Array]:
    """Lower-block outputs → view logits and feature → tumour logits (+ Grad-CAM). Traced, never called eagerly.

    `share_trunk`: the models' whole VGG is one (the shared-trunk model): its upper blocks run once for both.
    `upper`, if given, receives that trunk's upper block activations (the deep segmenter's inputs).
    `head_inputs`: also return the tumour head's image input ("tumor_pooled").
    """
    out: dict[str, jax.Array] = {}
    needs_feature = tumor is not None and tumor.config.use_view_feature
    feature = None
    view_last_conv = None
    if view is not None and (want_view or needs_feature or share_trunk or upper is not None):
        view_last_conv = view.upper_convs(view_lower, intermediates=upper)
        out["view_logits"], feature = view.head(view_last_conv)
        out["view_feature"] = feature
    if tumor is None:
        return out
    assert tumor_lower is not None
    last_conv = view_last_conv if share_trunk and view_last_conv is not None else tumor.upper_convs(tumor_lower)
    if head_inputs:
        out["tumor_pooled"] = pooled_features(last_conv)
    if not explain:
        out["tumor_logits"] = tumor.head(last_conv, feature if needs_feature else None)
        return out
    fixed_feature = jax.lax.stop_gradient(feature) if needs_feature else None
    tumor_logits, pullback = jax.vjp(lambda a: tumor.head(a, fixed_feature), last_conv)
    # target < 0 means "the predicted class"; samples are independent, so one vjp serves the batch.
    chosen = jnp.where(target < 0, jnp.argmax(tumor_logits, axis=-1), target)
    (grads,) = pullback(jax.nn.one_hot(chosen, tumor_logits.shape[-1], dtype=tumor_logits.dtype))
    weights = grads if cam_method == "hirescam" else grads.mean(axis=(1, 2), keepdims=True)
    out["tumor_logits"] = tumor_logits
    out["cam"] = jax.nn.relu((weights * last_conv).sum(axis=-1))
    out["target"] = chosen
    return out


@dataclasses.dataclass(frozen=True)
class _Program:
    """What one compiled program computes (its static configuration)."""

    from_lower: bool
    want_view: bool
    explain: bool
    pooled: bool
    keep_lower: bool
    segment: bool = False
    head_inputs: bool = False
    cam_method: str = "gradcam"


class Forward:
    """Compiled forward passes of a view model and (optionally) a tumour model for fixed batch shapes.

    `share_lower`: both models hold identical lower blocks (the frozen ImageNet blocks of the faithful
    recipe), so the trunk's lower part runs once per image for both.
    """

    def __init__(self, view_model: ViewClassifier | None, tumor_model: TumorClassifier | None = None, *,
                 share_lower: bool = False, share_trunk: bool = False, batch_size: int = 16,
                 lone_chunk_own_shape: bool = False, segmenter: TumorSegmenter | None = None):
        if view_model is None and tumor_model is None:
            raise ValueError("Forward needs at least one model")
        models = [m for m in (view_model, tumor_model) if m is not None]
        sizes = {m.config.image_size for m in models}
        if len(sizes) != 1:
            raise ValueError(f"the models disagree on image size: {sorted(sizes)}")
        self.image_size = sizes.pop()
        self._lower_shape = models[0].config.lower_shape
        self._flat_dim = models[0].config.flat_dim
        self.batch_size = batch_size
        self.lone_chunk_own_shape = lone_chunk_own_shape
        self.has_view, self.has_tumor = view_model is not None, tumor_model is not None
        self._tumor_uses_view = bool(self.has_view and tumor_model is not None and tumor_model.config.use_view_feature)
        self.share_lower = share_lower or share_trunk or not (self.has_view and self.has_tumor)
        self.share_trunk = share_trunk and self.has_view and self.has_tumor
        self.has_segmenter = segmenter is not None
        if segmenter is not None and segmenter.config.image_size != self.image_size:
            raise ValueError(f"the segmenter is for {segmenter.config.image_size} px, the models for {self.image_size}")
        # A deep decoder reads blocks 4-5 of the one trunk; the attach check (hub) guarantees the trunk matches.
        self._segmenter_deep = segmenter is not None and segmenter.config.deep
        if self._segmenter_deep and not (self.has_view and (self.share_trunk or not self.has_tumor)):
            raise ValueError("a segmenter that reads VGG blocks 4-5 needs one shared trunk")
        self._graphs, self._states = zip(*(nnx.split(m) for m in (view_model, tumor_model, segmenter)
                                           if m is not None), strict=True)
        self._programs: dict[_Program, Callable] = {}
        self._lower_fn = cpu_jit(lambda states, images: self._models(states)[0 if self.has_view else 1].lower(images))

    @classmethod
    def from_pipeline(cls, pipeline: TwoModels, **kwargs) -> Forward:
        return cls(pipeline.view_model, pipeline.tumor_model, share_lower=pipeline.shares_lower_blocks,
                   share_trunk=pipeline.shares_trunk, segmenter=pipeline.segmenter, **kwargs)

    @property
    def lower_shape(self) -> tuple[int, int, int]:
        return self._lower_shape

    def _models(self, states) -> tuple[ViewClassifier | None, TumorClassifier | None]:
        live = iter(nnx.merge(g, s) for g, s in zip(self._graphs, states, strict=True))
        return (next(live) if self.has_view else None), (next(live) if self.has_tumor else None)

    def _segmenter(self, states) -> TumorSegmenter:
        return nnx.merge(self._graphs[-1], states[-1])

    def _program(self, p: _Program) -> Callable:
        if p not in self._programs:
            def run(states, x, target):
                view, tumor = self._models(states)
                if p.from_lower:
                    lower = x.astype(jnp.float32)
                    tumor_lower = lower
                else:
                    base = view if view is not None else tumor
                    if p.segment:  # one VGG pass gives the lower output and the decoder's activations
                        lower, skips = encode(base.vgg, x, base.config.lower_blocks)
                    else:
                        lower = base.lower(x)
                    tumor_lower = None if tumor is None else (lower if self.share_lower else tumor.lower(x))
                upper: dict[str, jax.Array] | None = {} if p.segment and self._segmenter_deep else None
                out = two_stage(view, tumor, lower, tumor_lower, want_view=p.want_view, explain=p.explain,
                                target=target, share_trunk=self.share_trunk, upper=upper,
                                head_inputs=p.head_inputs, cam_method=p.cam_method)
                if upper:
                    skips = {**upper, **skips}
                if p.pooled:
                    out["lower_pooled"] = lower.mean(axis=(1, 2))
                if p.keep_lower:
                    out["lower"] = lower
                if p.segment:
                    out["mask_prob"] = jax.nn.sigmoid(self._segmenter(states)(skips))
                return out

            self._programs[p] = cpu_jit(run)
        return self._programs[p]

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3] images, got {images.shape}")
        return images

    def lower(self, images: np.ndarray, *, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """float32 [N, *lower_shape]: the lower blocks' output (of the view model, else the tumour model)."""
        images = self._check(images)
        parts = []
        for start, rows, padded in padded_chunks(len(images), self.batch_size):
            out = self._lower_fn(self._states, jnp.asarray(pad_rows(images, start, rows, padded, np.uint8)))
            parts.append(np.asarray(out)[:rows])
            if progress:
                progress(start + rows, len(images))
        return np.concatenate(parts) if parts else np.zeros((0, *self.lower_shape), np.float32)

    def __call__(self, images: np.ndarray | None = None, *, lower: np.ndarray | None = None, want_view: bool = True,
                 explain: bool = False, target: np.ndarray | None = None, pooled: bool = False,
                 keep_lower: bool = False, segment: bool = False, head_inputs: bool = False,
                 cam_method: str = "gradcam", progress: Callable[[int, int], None] | None = None) -> Outputs:
        """Outputs for uint8 RGB `images` [N, S, S, 3], or for precomputed `lower` outputs [N, h, w, 512].

        From `lower`, both models read the same lower output, so the models must share their lower blocks.
        """
        if (images is None) == (lower is None):
            raise ValueError("pass either images or lower-block outputs")
        if lower is not None and not self.share_lower:
            raise ValueError("these models have different lower blocks: pass images, not one lower output")
        if explain and not self.has_tumor:
            raise ValueError("Grad-CAM explains the tumour model, which this Forward does not hold")
        if cam_method not in CAM_METHODS:
            raise ValueError(f"cam_method must be one of {CAM_METHODS}, not {cam_method!r}")
        if head_inputs and not self.has_tumor:
            raise ValueError("head_inputs=True returns the tumour head's inputs: this Forward has no tumour model")
        if segment and (not self.has_segmenter or lower is not None):
            raise ValueError("segment=True needs a segmenter and pixels (it reads VGG blocks 1-3)")
        x = self._check(images) if images is not None else np.asarray(lower)
        n = len(x)
        spec = _Program(from_lower=lower is not None, want_view=want_view, explain=explain, pooled=pooled,
                        keep_lower=keep_lower and lower is None,  # the lower output is not returned back
                        segment=segment, head_inputs=head_inputs, cam_method=cam_method if explain else "gradcam")
        program = self._program(spec)
        targets = np.full((n,), -1, np.int32) if target is None else np.asarray(target, np.int32)
        parts: list[dict[str, np.ndarray]] = []
        for start, rows, padded in padded_chunks(n, self.batch_size, lone_chunk_own_shape=self.lone_chunk_own_shape):
            chunk = pad_rows(x, start, rows, padded, np.uint8 if lower is None else np.float32)
            chunk_targets = pad_rows(targets, start, rows, padded) if explain else None
            out = program(self._states, jnp.asarray(chunk),
                          None if chunk_targets is None else jnp.asarray(chunk_targets))
            parts.append({k: np.asarray(v)[:rows] for k, v in out.items()})
            if progress:
                progress(start + rows, n)
        return self._outputs(parts, n, spec)

    def _outputs(self, parts: list[dict[str, np.ndarray]], n: int, spec: _Program) -> Outputs:
        side = self.image_size // 16
        empty = {"view_logits": (3,), "view_feature": (128,), "tumor_logits": (4,), "cam": (side, side),
                 "target": (), "lower_pooled": (self.lower_shape[-1],), "lower": self.lower_shape,
                 "mask_prob": (self.image_size, self.image_size), "tumor_pooled": (self._flat_dim,)}

        def get(key: str) -> np.ndarray | None:
            if parts and key in parts[0]:
                joined = np.concatenate([p[key] for p in parts])
                return joined if key == "target" else joined.astype(np.float32)
            if not parts and n == 0:
                return np.zeros((0, *empty[key]), np.int32 if key == "target" else np.float32)
            return None

        needs_view = spec.want_view or self._tumor_uses_view
        return Outputs(
            view_logits=get("view_logits") if self.has_view and needs_view else None,
            tumor_logits=get("tumor_logits") if self.has_tumor else None,
            view_feature=get("view_feature") if self.has_view and needs_view else None,
            cam=get("cam") if spec.explain else None,
            target=get("target") if spec.explain else None,
            lower_pooled=get("lower_pooled") if spec.pooled else None,
            lower=get("lower") if spec.keep_lower else None,
            mask_prob=get("mask_prob") if spec.segment else None,
            tumor_pooled=get("tumor_pooled") if spec.head_inputs else None,
        )
