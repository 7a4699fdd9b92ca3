"""Fuzz the decoder and the archive reader at scale: 100,000 seeded mutations (tests/fuzz_inputs.py) of
PNG, JPEG, TIFF, GIF, BMP, WebP and zip inputs. Counts the documented outcomes (an image, or
ImageDecodeError / error rows / BatchError) and everything else that came out.

The pixel limit only decides which headers are refused before decoding. The default is the CI slice's
1 Mpx; with the server's own limit (--max-pixels 16777216, `fuzz_server_limit.json`) mutated headers
that declare large images decode more garbage, so cases are about 3x slower on average.

    python benchmarks/bench_fuzz.py [--cases 100000] [--seed 1] [--max-pixels 1048576]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_inputs  # noqa: E402

from braintumor_flax.data.limits import MAX_PIXELS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)  # the CI slice uses seed 0: these are other cases
    ap.add_argument("--max-pixels", type=int, default=1 << 20, help=f"the server's limit is {MAX_PIXELS}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz.json"))
    args = ap.parse_args(argv)
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    pool = fuzz_inputs.seeds()
    kinds = sorted(pool)
    counts: Counter = Counter()
    escaped: list[dict] = []
    slowest: list[tuple[float, str, int]] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's metadata warnings are not outcomes
        for case in range(args.cases):
            kind = kinds[case % len(kinds)]
            data = fuzz_inputs.case_bytes(kind, args.seed, case, pool)
            t = time.perf_counter()
            try:
                outcome = (fuzz_inputs.check_zip if kind == "zip" else fuzz_inputs.check_image)(data,
                                                                                                max_pixels=args.max_pixels)
            except BaseException as exc:  # noqa: BLE001 - counting what escapes is the point
                if isinstance(exc, KeyboardInterrupt):
                    raise
                outcome = "escaped"
                if len(escaped) < 50:
                    escaped.append({"kind": kind, "seed": args.seed, "case": case,
                                    "error": f"{type(exc).__name__}: {exc}"[:300]})
            slowest = sorted([*slowest, (time.perf_counter() - t, kind, case)], reverse=True)[:5]
            counts[f"{kind}:{outcome}"] += 1
            if (case + 1) % 10_000 == 0:
                print(f"{case + 1:,} cases, {time.perf_counter() - start:.0f} s, escaped {len(escaped)}", flush=True)
    elapsed = time.perf_counter() - start
    per_kind = {k: {o: counts.get(f"{k}:{o}", 0) for o in ("ok", "error", "escaped")} for k in kinds}
    result = {
        "cases": args.cases, "seed": args.seed, "max_pixels": args.max_pixels, "server_max_pixels": MAX_PIXELS,
        "per_kind": per_kind,
        "escaped": sum(v["escaped"] for v in per_kind.values()),
        "escaped_examples": escaped,
        "seconds": round(elapsed, 1), "ms_per_case": round(elapsed * 1000 / args.cases, 2),
        "slowest_cases": [{"seconds": round(s, 3), "kind": k, "case": c} for s, k, c in slowest],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "description": "2-core Intel Xeon (AVX-512), 24 GiB, shared with other jobs",
                    "loadavg_start": loadavg_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["escaped"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
