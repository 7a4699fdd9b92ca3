"""Training configuration: one dataclass, and named recipes (`train.py --recipe NAME`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from braintumor_flax.checkpoint_info import TrainingRecord
from braintumor_flax.data.splits import DEFAULT_SEED, DEFAULT_VAL_FRACTION


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    recipe: str = "faithful"
    image_size: int = 128
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-4
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0  # > 0 switches Adam to AdamW
    label_smoothing: float = 0.0
    # VGG blocks 1..frozen_blocks keep their ImageNet weights (the original froze blocks 1-4).
    frozen_blocks: int = 4
    # With the lower blocks frozen, their output is computed once per image and cached; augmentation then
    # acts on those cached feature maps (flips and zoom of e.g. the 8×8×512 map) instead of on pixels.
    cache_lower_features: bool = True
    hflip: bool = True
    vflip: bool = True
    zoom: float = 0.2
    use_view_feature: bool = True  # False = the ablation: tumour model without the view branch
    pretrained: bool = True  # ImageNet VGG16 convolutions; False = random (generated-data tests)
    # Start from this checkpoint's weights (trunk and heads; the shared-trunk model), not from ImageNet: a CPU
    # recipe that continues a trained model with more blocks unfrozen costs a few epochs, not a whole training.
    init_from: str = ""
    # "two_stage": the original's two networks, trained one after the other; "shared_trunk": one trunk, both
    # heads trained together (models/shared_trunk.py).
    model: Literal["two_stage", "shared_trunk"] = "two_stage"
    pixel_augment: bool = False  # source-robustness augmentation on pixels (training/augment.PixelAugment)
    # Which one (augment.PIXEL_AUGMENTS): "basic" (the GPU recipes'), or "source", which adds the processing
    # changes between sources (denoising, blur, sharpening, resampling, JPEG, non-monotone intensity curves).
    augment_profile: str = "basic"
    # The long CPU run's trainer (training/long_run.py): resumable at any step from a state saved every few
    # minutes, the tumour-mask decoder trained in the same run, and a weight EMA.
    long_run: bool = False
    ema_decay: float = 0.0  # > 0: an exponential moving average of the weights is what is validated and saved
    seg_weight: float = 0.0  # long_run: weight of the decoder's mask loss (BRISC masks) beside the heads' losses
    decoder_learning_rate: float = 0.0  # long_run: the decoder's peak rate (it starts from scratch); 0 = the trunk's
    # Frozen, cached lower blocks: also cache the lower-block features of this many style-randomised copies of
    # each training image (training/augment.StyleRandomize: random intensity curves); each step draws the clean
    # features or one copy's per example. The cached recipes' stand-in for pixel_augment's intensity changes.
    style_variants: int = 0
    keep_best: bool = False  # keep the epoch with the best validation tumour accuracy, not the last
    # A last stage: the tumour head alone, refitted for this many epochs over the frozen trunk's cached output
    # (training/head_refit.py; seconds an epoch on a CPU), at this peak rate; the best epoch on validation kept.
    head_refit_epochs: int = 0
    head_refit_learning_rate: float = 1e-4
    # ... and over this many pixel-augmented copies of each training image (training/augment.PixelAugment: scale,
    # shift, rotation, intensity), each run through the frozen trunk once: the refit's aim at source differences.
    head_refit_views: int = 0
    # ... and over this many slices per no-tumour training image with a BRISC tumour pasted in along its mask
    # (training/lesion_paste.py, labelled with the donor's class): against the shortcut "this look = no tumour".
    head_refit_pastes: int = 0
    width_divisor: int = 1  # > 1 narrows the VGG (tests); 1 = VGG16
    val_fraction: float = DEFAULT_VAL_FRACTION
    seed: int = DEFAULT_SEED
    # Validation takes whole groups of look-alike images (a data/grouping.py spec, e.g. "imagenet:0.85"), so that it
    # resembles the test sets' unseen patients; "": images drawn one by one (every checkpoint before the option).
    val_grouping: str = ""
    eval_batch_size: int = 64
    max_images: int | None = None  # cap per split, for smoke tests
    # Train (and validate) on these datasets only, e.g. ("brisc2025",) to test on Kaggle as an unseen source;
    # empty = all. The test splits are the same either way.
    train_datasets: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def split_args(self) -> dict[str, Any]:
        """How this config splits training from validation: `data.datasets.prepare(..., **config.split_args())`
        re-creates the split wherever a checkpoint's split is needed."""
        from braintumor_flax.models.pretrained import imagenet_features  # what an "imagenet:" grouping compares

        return {"val_fraction": self.val_fraction, "seed": self.seed, "val_grouping": self.val_grouping,
                "look_alike_features": imagenet_features}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Fields this version knows; missing ones take their defaults (older checkpoints)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        if "train_datasets" in known:  # a list in JSON
            known["train_datasets"] = tuple(known["train_datasets"])
        return cls(**known)

    @classmethod
    def from_record(cls, record: TrainingRecord | None) -> TrainConfig:
        """The config a checkpoint was trained with (defaults when it says nothing)."""
        return cls.from_dict(record.config if record is not None else {})

    @property
    def lower_blocks(self) -> int:
        """Where the models' trunk splits into a lower (frozen, cacheable) and an upper part: after the frozen
        blocks (blocks 1-3 frozen: block 3's output is cached and block 4 trains on it); block 4 otherwise."""
        return self.frozen_blocks if 1 <= self.frozen_blocks <= 4 else 4

    @property
    def lower_features_cacheable(self) -> bool:
        return self.cache_lower_features and 1 <= self.frozen_blocks <= 4


RECIPES: dict[str, TrainConfig] = {
    # The original Keras recipe: Adam 1e-4, cross-entropy, 5 epochs, batch 64, flips + zoom, blocks 1-4 frozen.
    "faithful": TrainConfig(),
    "faithful-20ep": TrainConfig(recipe="faithful-20ep", epochs=20),
    # Same recipe without the view feature: the ablation the original claimed but never showed.
    "faithful-no-view": TrainConfig(recipe="faithful-no-view", use_view_feature=False),
    # Full fine-tuning (GPU): all blocks trained, pixel-space augmentation, warm-up + cosine, label smoothing.
    "finetune-12ep": TrainConfig(recipe="finetune-12ep", epochs=12, frozen_blocks=0, cache_lower_features=False,
                                 schedule="warmup_cosine", warmup_epochs=1.0, learning_rate=1e-4,
                                 weight_decay=1e-4, label_smoothing=0.1),
    "finetune-30ep": TrainConfig(recipe="finetune-30ep", epochs=30, frozen_blocks=0, cache_lower_features=False,
                                 schedule="warmup_cosine", warmup_epochs=2.0, learning_rate=1e-4,
                                 weight_decay=1e-4, label_smoothing=0.1),
    # One trunk, both heads (models/shared_trunk.py), trained together; chosen on validation (keep_best).
    # CPU: blocks 1-4 frozen and cached, block 5 and both heads trained (an epoch of block 5 costs minutes here).
    "shared-frozen4": TrainConfig(recipe="shared-frozen4", model="shared_trunk", epochs=20, schedule="warmup_cosine",
                                  warmup_epochs=1.0, learning_rate=3e-4, weight_decay=1e-4, label_smoothing=0.1,
                                  keep_best=True),
    # CPU, a larger input instead of a deeper unfreezing: blocks 1-4 frozen and cached at 192 px (their 12×12×512
    # output), block 5 and both heads trained, then the head refit. 8 epochs, sized for the 60 min; measured
    # 71 min on a 2-core AMD EPYC (blocks 1-4 forward ~150 ms / image, ~310 s a trunk epoch). Not adopted (README).
    "shared-frozen4-192-refit": TrainConfig(recipe="shared-frozen4-192-refit", model="shared_trunk", image_size=192,
                                            epochs=8, schedule="warmup_cosine", warmup_epochs=1.0, learning_rate=3e-4,
                                            weight_decay=1e-4, label_smoothing=0.1, keep_best=True,
                                            head_refit_epochs=30),
    # CPU, further: blocks 1-3 frozen and their output cached; blocks 4-5 and both heads trained.
    "shared-frozen3": TrainConfig(recipe="shared-frozen3", model="shared_trunk", epochs=6, frozen_blocks=3,
                                  schedule="warmup_cosine", warmup_epochs=0.5, learning_rate=2e-4, weight_decay=1e-4,
                                  label_smoothing=0.1, keep_best=True),
    # shared-frozen3, then its tumour head refitted for 30 epochs over the frozen trunk's output: the served model.
    # (Its heads were still underfitting after the trunk's 6 epochs; the trunk, and with it the segmenter, stay.)
    "shared-frozen3-refit": TrainConfig(recipe="shared-frozen3-refit", model="shared_trunk", epochs=6,
                                        frozen_blocks=3, schedule="warmup_cosine", warmup_epochs=0.5,
                                        learning_rate=2e-4, weight_decay=1e-4, label_smoothing=0.1, keep_best=True,
                                        head_refit_epochs=30),
    # shared-frozen3-refit whose head also trains on two pixel-augmented copies of every training image. Measured
    # and not adopted: more robust to an unseen source, significantly lower on validation (README, Results).
    "shared-frozen3-refit-views": TrainConfig(recipe="shared-frozen3-refit-views", model="shared_trunk", epochs=6,
                                              frozen_blocks=3, schedule="warmup_cosine", warmup_epochs=0.5,
                                              learning_rate=2e-4, weight_decay=1e-4, label_smoothing=0.1,
                                              keep_best=True, head_refit_epochs=30, head_refit_views=2),
    # shared-frozen3-refit whose head also trains on one slice per no-tumour training image with a BRISC tumour
    # pasted in (training/lesion_paste.py).
    "shared-frozen3-refit-pastes": TrainConfig(recipe="shared-frozen3-refit-pastes", model="shared_trunk", epochs=6,
                                               frozen_blocks=3, schedule="warmup_cosine", warmup_epochs=0.5,
                                               learning_rate=2e-4, weight_decay=1e-4, label_smoothing=0.1,
                                               keep_best=True, head_refit_epochs=30, head_refit_pastes=1),
    # shared-frozen3 with one style-randomised copy of every training image (its block-3 features cached too):
    # aimed at the contrast shortcut ("FLAIR / T2 / CT look" = no tumour) of shared-frozen3 on the test sets.
    # Measured and not adopted: lower on validation and on both test sets
    # (docs/experiments/style-randomisation-not-adopted.md).
    "shared-frozen3-style": TrainConfig(recipe="shared-frozen3-style", model="shared_trunk", epochs=6,
                                        frozen_blocks=3, schedule="warmup_cosine", warmup_epochs=0.5,
                                        learning_rate=2e-4, weight_decay=1e-4, label_smoothing=0.1, keep_best=True,
                                        style_variants=1),
    # CPU: the served checkpoint continued for 2 epochs with blocks 3-5 trainable, on pixels with the
    # source-robustness augmentation, then the head refit. Blocks 1-2 frozen: about 60 % of the cost of training
    # every block (2-core Xeon). `--init-from` names the checkpoint (default: the served one). Not adopted (README).
    "shared-frozen2-aug-warm": TrainConfig(recipe="shared-frozen2-aug-warm", model="shared_trunk", epochs=2,
                                           frozen_blocks=2, cache_lower_features=False, pixel_augment=True,
                                           vflip=False, schedule="warmup_cosine", warmup_epochs=0.25,
                                           learning_rate=5e-5, weight_decay=1e-4, label_smoothing=0.1,
                                           keep_best=True, head_refit_epochs=30,
                                           init_from="checkpoints-shared-trunk"),
    # GPU: every block trained on pixels with the source-robustness augmentation, at four input sizes.
    **{f"shared-finetune-{size}": TrainConfig(
        recipe=f"shared-finetune-{size}", model="shared_trunk", image_size=size, epochs=30, frozen_blocks=0,
        cache_lower_features=False, pixel_augment=True, vflip=False, schedule="warmup_cosine", warmup_epochs=2.0,
        learning_rate=1e-4, weight_decay=1e-4, label_smoothing=0.1, keep_best=True) for size in (128, 160, 192, 224)},
    # Seconds-long smoke test on a handful of images.
    "tiny": TrainConfig(recipe="tiny", image_size=32, epochs=2, batch_size=4, eval_batch_size=8, max_images=24),
}

# The long CPU run (issue 37; training/long_run.py, docs/long_run.md): shared-finetune-128 (every block on pixels,
# AdamW with warm-up + cosine, label smoothing 0.1, best validation epoch kept) at batch 32, with the processing
# augmentation ("source"), the tumour-mask decoder trained through the trunk in the same run (BRISC masks), and a
# weight EMA, which is what is validated and saved. Resumable at any step: `python -m
# braintumor_flax.training.background start` runs it at low priority.
# Sizing (benchmarks/pilot_long_run.py, results/long_run_pilot.json, 7 Dec 2026, 2-core AMD EPYC AVX-512): a step
# of 32 costs 8.13 s with every block trained (254 ms an image) when nothing else runs, 6.64 s with blocks 1-2
# frozen (208 ms: only 18 % less, so every block trains), and up to 15.3 s beside another job on the 2 cores.
# An epoch is 221 steps = 1,800 s + ~150 s of validation (1,771 images forward) = ~1,950 s alone, ~2,850 s at
# 1.45× (half the time shared). 4 stretches of 3 h = 43,200 s, less ~3,000 s (4 restarts × (≤ 600 s of lost
# work + ~40 s to start) and ~500 s of finalisation): 40,000 s / 2,850 s = 14 epochs: ~7.6 h alone, ~11 h at
# 1.45×, ~14 h (a fifth stretch) only if the cores were shared all the time.
RECIPES["shared-long-128"] = dataclasses.replace(
    RECIPES["shared-finetune-128"], recipe="shared-long-128", long_run=True, batch_size=32, epochs=14,
    warmup_epochs=0.5, augment_profile="source", ema_decay=0.999, seg_weight=1.0, decoder_learning_rate=1e-3)
# The same recipe as a seconds-long smoke test (a narrowed random VGG on a few images).
RECIPES["tiny-long"] = dataclasses.replace(
    RECIPES["shared-long-128"], recipe="tiny-long", image_size=32, width_divisor=16, pretrained=False, epochs=2,
    batch_size=4, eval_batch_size=8, warmup_epochs=0.5, ema_decay=0.9, learning_rate=1e-3)


def get_recipe(name: str, **overrides: Any) -> TrainConfig:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return RECIPES[name].replace(**overrides)
