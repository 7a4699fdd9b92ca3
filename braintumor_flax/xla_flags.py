"""XLA CPU settings for this project.  Call ``configure_xla_cpu()`` BEFORE ``import jax``.

Why: jaxlib 0.10.2's XLA CPU backend by default hands convolution graphs to YNNPACK
(``__ynn_fusion`` custom fusions; at batch 1 the whole VGG16 trunk becomes ONE YNN fusion).
On this 2-core AMD EPYC (Zen1, AVX2) that path is slow.  Setting the YNN fusion-type list to
empty makes XLA use its own (Eigen) convolutions instead.

Measured (benchmarks/bench_vgg_runtime.py, VGG16 conv trunk 128 px, JAX and ONNX Runtime
interleaved in one process, ratios vs ORT intra_op=2; machine shared/loaded, so trust ratios):
  batch 1 : default 1.81-2.42x ORT -> YNN off 0.99-1.02x ORT   (~1.9x faster)
  batch 8 : default 1.36-1.39x ORT -> YNN off 1.18x ORT         (~1.15x faster)
  block-5 fwd+bwd (3x conv512 @8x8 + Dense, batch 64): YNN off 1.22x faster (loaded box, noisy)
Same outputs (max rel err < 1e-6 vs ORT).

Equivalent per-jit form (no env var, only for selected functions):
    jax.jit(f, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
"""
from __future__ import annotations

import os
import sys

# Only validated on this jaxlib; unknown flags in XLA_FLAGS abort the process on other versions.
_KNOWN_GOOD_JAXLIB = ("0.10.",)
_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def configure_xla_cpu(disable_ynn: bool = True, force: bool = False) -> str:
    """Append the CPU XLA flags to ``XLA_FLAGS``; returns the resulting value.

    Must run before jax is imported (XLA_FLAGS is read once per process).  Set env
    ``BRAINTUMOR_NO_XLA_TUNING=1`` to skip.  Does nothing on non-validated jaxlib
    versions unless ``force``.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("BRAINTUMOR_NO_XLA_TUNING") == "1":
        return flags
    if "jax" in sys.modules:
        import warnings

        warnings.warn("configure_xla_cpu() called after jax was imported; XLA_FLAGS may be ignored", stacklevel=2)
    if not force:
        try:
            from importlib.metadata import version

            if not version("jaxlib").startswith(_KNOWN_GOOD_JAXLIB):
                return flags
        except Exception:
            return flags
    if disable_ynn and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        flags = f"{flags} {_YNN_OFF}".strip()
    os.environ["XLA_FLAGS"] = flags
    return flags
