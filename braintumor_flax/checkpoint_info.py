"""What a checkpoint says about itself besides its weights: one typed, documented description.

Stored in the checkpoint's `config.json` next to the model configs (see `hub`); every reader goes through
`CheckpointInfo`, so each default is stated here once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from braintumor_flax.labels import PLANES, TUMOR_CLASSES


def _known_fields(kind: type, values: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of `values` that are fields of the dataclass `kind` (others, e.g. fit diagnostics, dropped)."""
    names = {f.name for f in dataclasses.fields(kind)}
    return {k: v for k, v in (values or {}).items() if k in names}


@dataclasses.dataclass
class Calibration:
    """Softmax temperatures (Guo et al., 2017), fitted on the validation split; 1.0 = raw softmax."""

    view_temperature: float = 1.0
    tumor_temperature: float = 1.0
    fitted_on: str = "none"  # "validation split ..." when fitted; evaluation reuses only those
    method: str = "temperature scaling (min NLL)"

    @property
    def fitted_on_validation(self) -> bool:
        return "validation" in self.fitted_on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Calibration:
        """From config.json's `calibration`, or from a fit's result (its diagnostics are not stored)."""
        return cls(**_known_fields(cls, values))


@dataclasses.dataclass
class TrainingRecord:
    """How the weights were made: the recipe and its full config, the data, the history and the machine."""

    recipe: str = "unknown"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # `TrainConfig.to_dict()`
    dataset_hash: str | None = None  # `data.datasets.prepare(...).dataset_hash` of the training data
    data_summary: str = ""
    history: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    machine: str = ""
    jax_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckpointInfo:
    """Calibration, OOD statistics, provenance and layout facts of one checkpoint."""

    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    # The OOD check's statistics as `ood.fit_ood` returns them (limits in config.json, matrices in
    # ood.safetensors); None = image checks with default limits only.
    ood: dict[str, Any] | None = None
    training: TrainingRecord | None = None
    # Both models hold bit-identical lower blocks, so the trunk's lower part runs once per image.
    shared_lower_blocks: bool = False
    # Both models hold one whole trunk (the shared-trunk model): all of it runs once per image.
    shared_trunk: bool = False
    class_names: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {"view": list(PLANES), "tumor": list(TUMOR_CLASSES)})

    @property
    def recipe(self) -> str | None:
        return None if self.training is None else self.training.recipe

    @property
    def dataset_hash(self) -> str | None:
        return None if self.training is None else self.training.dataset_hash

    def to_dict(self) -> dict[str, Any]:
        """The config.json keys (absent parts left out, so an old checkpoint re-saves to the same file)."""
        out: dict[str, Any] = {"calibration": self.calibration.to_dict(), "class_names": self.class_names,
                               "shared_lower_blocks": self.shared_lower_blocks}
        if self.shared_trunk:  # written only when true: older checkpoints re-save to the same file
            out["shared_trunk"] = True
        if self.ood is not None:
            out["ood"] = self.ood
        if self.training is not None:
            out["training"] = self.training.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointInfo:
        default = cls()
        return cls(
            calibration=Calibration.from_dict(data.get("calibration")),
            ood=data.get("ood"),
            training=TrainingRecord(**_known_fields(TrainingRecord, data["training"]))
            if data.get("training") else None,
            shared_lower_blocks=bool(data.get("shared_lower_blocks", False)),
            shared_trunk=bool(data.get("shared_trunk", False)),
            class_names=data.get("class_names", default.class_names),
        )
