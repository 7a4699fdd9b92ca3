"""Named parameters of a model: flat views for checkpoints, assignment back, and digests that key caches."""

from __future__ import annotations

import hashlib

import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Parameters as {"vgg.block1_conv1.kernel": array}: names that read like the layers they belong to."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): np.asarray(var.get_value()) for path, var in flat}


def load_flat_params(model: nnx.Module, params: dict[str, np.ndarray]) -> None:
    """Assign named arrays into a model in place; every parameter must be present with its shape."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    missing = []
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        if name not in params:
            missing.append(name)
            continue
        value = params[name]
        if value.shape != var.get_value().shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape {var.get_value().shape}")
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    if missing:
        raise ValueError(f"checkpoint lacks parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    nnx.update(model, nnx.from_flat_state(flat))


def weights_digest(*models: nnx.Module, blocks: int | None = None, salt: str = "", prefix: str = "vgg.",
                   rounded_to: str | None = None) -> str:
    """sha256 (hex) over every parameter's name and bytes, model by model: changes exactly when the weights do.

    `blocks=k` hashes only VGG blocks 1..k (the lower stage), to key caches of their outputs; `salt` adds
    whatever else shapes what the hash stands for (image size, preprocessing). `prefix`: where the VGG sits in
    the models ("" for a bare VGG16). `rounded_to="float16"` hashes the values rounded to float16, so one set of
    weights has one digest whether a checkpoint stores it in float32 or float16.
    """
    h = hashlib.sha256(salt.encode())
    prefixes = None if blocks is None else tuple(f"{prefix}block{b}_" for b in range(1, blocks + 1))
    for model in models:
        for name, value in sorted(flat_params(model).items()):
            if prefixes is None or name.startswith(prefixes):
                h.update(name.encode())
                h.update(np.ascontiguousarray(value if rounded_to is None else value.astype(rounded_to)).data)
    return h.hexdigest()


def lower_blocks_digest(model: nnx.Module) -> str:
    """Identity of a model's lower stage (its weights + what shapes its output): the key of every cache of
    lower-block outputs (training's feature cache, evaluation's prediction cache)."""
    cfg = model.config
    salt = f"{cfg.lower_blocks}|{cfg.preprocessing}|{cfg.image_size}\n"
    return weights_digest(model, blocks=cfg.lower_blocks, salt=salt)
