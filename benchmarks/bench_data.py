"""Time prepare() cold (empty cache) and warm (second run) on the full data.

    nice -n 10 python -m benchmarks.bench_data [--data-dir ../shared/data] [--image-size 128]

Writes results/bench_data.json. The cold run uses a fresh temporary cache folder
(BRAINTUMOR_FLAX_CACHE), so the user's real cache is neither used nor touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from braintumor_flax.data.datasets import prepare
from braintumor_flax.paths import PROJECT_ROOT, default_data_dir


def _run(data_dir: Path, image_size: int, workers: int) -> dict:
    t0 = time.perf_counter()
    prep = prepare(data_dir, image_size=image_size, workers=workers)
    return {"seconds": round(time.perf_counter() - t0, 3), "timings": prep.report["timings"],
            "cache": prep.report["cache"], "dataset_hash": prep.dataset_hash,
            "split_sizes": {k: len(v) for k, v in prep.splits.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench_data.json")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_data_cache_")
    old = os.environ.get("BRAINTUMOR_FLAX_CACHE")
    os.environ["BRAINTUMOR_FLAX_CACHE"] = tmp
    try:
        cold = _run(args.data_dir, args.image_size, args.workers)
        print(f"cold  prepare: {cold['seconds']:8.2f} s  decoded {cold['cache']['decoded']} files")
        warm = _run(args.data_dir, args.image_size, args.workers)
        print(f"warm  prepare: {warm['seconds']:8.2f} s  decoded {warm['cache']['decoded']} files")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("BRAINTUMOR_FLAX_CACHE", None)
        else:
            os.environ["BRAINTUMOR_FLAX_CACHE"] = old
    assert cold["dataset_hash"] == warm["dataset_hash"], "cached run gave different data"
    ratio = cold["seconds"] / warm["seconds"]
    print(f"speed-up: {ratio:.1f}x   (warm breakdown: {warm['timings']})")
    result = {"image_size": args.image_size, "workers": args.workers, "cold": cold, "warm": warm,
              "speedup": round(ratio, 2), "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
