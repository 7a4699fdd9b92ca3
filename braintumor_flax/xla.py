"""XLA CPU settings for this project, applied per compiled function (`cpu_jit`), never through XLA_FLAGS.

Why: jaxlib 0.10's XLA CPU backend hands convolution graphs to YNNPACK by default (`__ynn_fusion` custom
fusions; at batch 1 the whole VGG16 trunk becomes one fusion), which is slow for these convolutions on the
CPUs we measured. An empty YNN fusion-type list makes XLA use its own (Eigen) convolutions instead.

Measured (benchmarks/bench_vgg_runtime.py, VGG16 trunk at 128 px, ratios vs ONNX Runtime in the same run,
2-core AMD EPYC): batch 1 1.81-2.42x ORT with YNN → 0.99-1.02x without; batch 8 1.36-1.39x → 1.18x.
Same outputs (max abs difference ~1e-6). Passing the option to `jax.jit(..., compiler_options=...)` needs
no import-order care, unlike XLA_FLAGS, which XLA reads once per process.

`BRAINTUMOR_NO_XLA_TUNING=1` turns it off (e.g. to measure the default); on a jaxlib other than the one it
was validated on, it is off, since an unknown option fails compilation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jax

_KNOWN_GOOD_JAXLIB = ("0.10.",)
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def cpu_compiler_options() -> dict[str, str]:
    """Compiler options for `jax.jit` on this machine: YNNPACK fusions off on CPU, nothing elsewhere."""
    if os.environ.get("BRAINTUMOR_NO_XLA_TUNING") == "1" or jax.default_backend() != "cpu":
        return {}
    try:
        if not version("jaxlib").startswith(_KNOWN_GOOD_JAXLIB):
            return {}
    except PackageNotFoundError:
        return {}
    return dict(_YNN_OFF)


def cpu_model() -> str:
    """The CPU's model name: figures are comparable only on one CPU model (AVX2 and AVX-512 machines differ)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def cpu_jit(fn: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit` with the project's CPU compiler options (decided at first call, when the backend is known)."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            compiled.append(jax.jit(fn, compiler_options=cpu_compiler_options(), **jit_kwargs))
        return compiled[0](*args, **kwargs)

    return call
