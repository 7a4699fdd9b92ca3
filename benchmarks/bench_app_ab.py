"""Latency of this checkout's app against another checkout's (e.g. the commit before a refactor), same run.

Both `python app.py` servers run side by side on localhost, each from its own checkout with the same
checkpoint; calls alternate between them (A, B, A, B, ...) so machine load hits both alike, and only one
computes at a time. Reported: median / p90 per endpoint and the ratio B / A of the medians.

    git worktree add --detach ../baseline <commit>
    python benchmarks/bench_app_ab.py --baseline ../baseline [--calls 60] [--out results/bench_app_ab.json]
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import certifi
from gradio_client import Client, handle_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_app import EXAMPLES, ROOT, App, _stats  # noqa: E402
from bench_common import machine, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="another checkout of the project (A)")
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"), help="the checkpoint both apps serve")
    ap.add_argument("--calls", type=int, default=60, help="calls per app and endpoint")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_app_ab.json"))
    args = ap.parse_args(argv)

    tls = ssl.create_default_context(cafile=certifi.where())  # one shared context, as the README recommends
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        apps = {"A_baseline": App(args.model, work / "xla_a", work, root=Path(args.baseline).resolve()),
                "B_this": App(args.model, work / "xla_b", work, root=ROOT)}
        try:
            for app in apps.values():
                app.first_answer()
            clients = {k: Client(a.url, verbose=False, ssl_verify=tls) for k, a in apps.items()}
            image = handle_file(str(EXAMPLES[0]))
            answers = {k: c.predict(image, api_name="/predict") for k, c in clients.items()}
            for c in clients.values():  # warm both paths of both servers
                for _ in range(3):
                    c.predict(image, api_name="/analyze")
            times: dict[str, dict[str, list[float]]] = {k: {"/predict": [], "/analyze": []} for k in apps}
            for _ in range(args.calls):
                for endpoint in ("/predict", "/analyze"):
                    for name, client in clients.items():
                        t = time.perf_counter()
                        client.predict(image, api_name=endpoint)
                        times[name][endpoint].append((time.perf_counter() - t) * 1000)
        finally:
            for app in apps.values():
                app.stop()
    result = {
        "baseline": str(args.baseline), "calls": args.calls,
        "same_answer": {k: v for k, v in answers["A_baseline"].items() if k not in ("compute_ms", "model_version")}
        == {k: v for k, v in answers["B_this"].items() if k not in ("compute_ms", "model_version")},
        "latency": {k: {e: _stats(v) for e, v in by.items()} for k, by in times.items()},
        "ratio_B_over_A_median": {e: round(statistics.median(times["B_this"][e])
                                           / statistics.median(times["A_baseline"][e]), 3)
                                  for e in ("/predict", "/analyze")},
        "machine": machine(),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
