"""Export the Flax networks to ONNX, so ONNX Runtime can run *the same* network(s) as XLA in a benchmark.

Only used by the benchmarks (the product's runtime is JAX). The graph mirrors `braintumor_flax.models`:
caffe preprocessing (RGB→BGR, ImageNet mean) → VGG16 convs (NCHW) → NHWC flatten (Keras/Flax order,
so the Dense weights apply unchanged) → heads. `kind="trunk"` is a plain VGG16 (13 convs, 5 pools);
`kind="both"` is the served two-stage network: shared blocks 1-4 once, block 5 and a head per model.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models.params import flat_params
from braintumor_flax.models.vgg16 import CAFFE_MEAN_BGR, VGG16_BLOCKS


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, array: np.ndarray, prefix: str) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        out = self.name(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _convs(g: _Graph, x: str, params: dict[str, np.ndarray], prefix: str, block: int) -> str:
    for i in range(1, len(VGG16_BLOCKS[block - 1]) + 1):
        layer = f"{prefix}vgg.block{block}_conv{i}"
        w = g.const(params[f"{layer}.kernel"].transpose(3, 2, 0, 1), "w")  # HWIO → OIHW
        b = g.const(params[f"{layer}.bias"], "b")
        x = g.op("Relu", [g.op("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    return x


def _pool(g: _Graph, x: str) -> str:
    return g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])


def _flatten_nhwc(g: _Graph, x: str) -> str:
    x = g.op("Transpose", [x], perm=[0, 2, 3, 1])
    return g.op("Flatten", [x], axis=1)


def _dense(g: _Graph, x: str, params: dict[str, np.ndarray], layer: str, relu: bool) -> str:
    y = g.op("Gemm", [x, g.const(params[f"{layer}.kernel"], "w"), g.const(params[f"{layer}.bias"], "b")])
    return g.op("Relu", [y]) if relu else y


def export_onnx(pipeline: BrainTumorPipeline, kind: Literal["trunk", "both"] = "both") -> bytes:
    """uint8 NHWC [N, S, S, 3] in; `trunk`: block-5 pool output; `both`: view_logits, tumor_logits, feature."""
    view = {k: v.astype(np.float32) for k, v in flat_params(pipeline.view_model).items()}
    tumor = {k: v.astype(np.float32) for k, v in flat_params(pipeline.tumor_model).items()}
    size = pipeline.view_model.config.image_size
    shared = pipeline.view_model.config.lower_blocks
    g = _Graph()
    x = g.op("Cast", ["images"], to=TensorProto.FLOAT)
    x = g.op("Gather", [x, g.const(np.array([2, 1, 0], np.int64), "bgr")], axis=3)  # RGB → BGR
    x = g.op("Sub", [x, g.const(np.array(CAFFE_MEAN_BGR, np.float32), "mean")])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC → NCHW, the layout ORT's kernels want
    outputs: list[onnx.ValueInfoProto] = []
    if kind == "trunk":
        for block in range(1, 6):
            x = _pool(g, _convs(g, x, view, "", block))
        g.nodes.append(helper.make_node("Identity", [x], ["features"]))
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 512, size // 32, size // 32]))
    else:
        lower = x
        for block in range(1, shared + 1):
            lower = _pool(g, _convs(g, lower, view, "", block))
        if not pipeline.shares_lower_blocks:
            raise ValueError("export expects the two models to share their frozen lower blocks")

        def upper(params: dict[str, np.ndarray]) -> str:
            y = lower
            for block in range(shared + 1, 6):
                y = _pool(g, _convs(g, y, params, "", block))
            return _flatten_nhwc(g, y)

        feature = _dense(g, upper(view), view, "feature", relu=True)
        view_logits = _dense(g, feature, view, "classifier", relu=False)
        image = _dense(g, upper(tumor), tumor, "image_feature", relu=True)
        if pipeline.tumor_model.config.use_view_feature:
            proj = _dense(g, feature, tumor, "view_projection", relu=True)
            image = g.op("Concat", [image, proj], axis=1)
        fused = _dense(g, image, tumor, "fused", relu=True)
        tumor_logits = _dense(g, fused, tumor, "classifier", relu=False)
        for name, value, dim in (("view_logits", view_logits, 3), ("tumor_logits", tumor_logits, 4),
                                 ("feature", feature, pipeline.view_model.config.feature_dim)):
            g.nodes.append(helper.make_node("Identity", [value], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", dim]))
    graph = helper.make_graph(
        g.nodes, f"braintumor_flax_{kind}",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        outputs, g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="braintumor-flax")
    onnx.checker.check_model(model, full_check=False)
    return model.SerializeToString()
