"""The served app, measured through the real `gradio_client` against `python app.py` on localhost.

1. Cold start: process start → first /predict answer, with an empty XLA compilation cache and again with
   the cache the first start left behind (a restarted Space / local run).
2. Latency: one image, sequential calls: /analyze (labels + Grad-CAM image + summary) and /predict (JSON),
   with `Client(url, ssl_verify=<one shared TLS context>)` (what the README recommends) and with a default
   `Client(url)`. gradio_client hands `ssl_verify` to a fresh httpx client for each of its HTTP requests, and a
   default one loads the CA bundle into a new TLS context every time, even for http:// URLs: measured here as
   `tls_context_ms`, paid about four times per call, on the client's CPU (the same 2 cores in this benchmark).
3. Load: 8 concurrent clients x 25 /predict requests over the example slices: every answer must equal the
   sequential answer for that image (and, with a trained checkpoint, the label in its file name); errors
   counted.
4. Memory: server RSS after the first 50 requests vs after 500.

    python benchmarks/bench_app.py [--model checkpoints] [--out results/bench_app.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import httpx
import psutil
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_ticks, machine, write_json  # noqa: E402

from braintumor_flax.labels import normalize_tumor  # noqa: E402

EXAMPLES = sorted((ROOT / "examples").glob("brisc2025_*.jpg"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`python app.py` in a subprocess with its own port, Gradio temp dir and (optionally) XLA cache."""

    def __init__(self, model: str, xla_cache: Path, work: Path, root: Path = ROOT):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "BRAINTUMOR_FLAX_MODEL": model, "GRADIO_SERVER_PORT": str(self.port),
               "GRADIO_TEMP_DIR": str(work / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
               "BRAINTUMOR_FLAX_CACHE": str(xla_cache), "PYTHONUNBUFFERED": "1"}
        self.log = (work / f"app_{self.port}.log").open("wb")
        self.started = time.perf_counter()
        # cwd = the checkout: its app.py puts its own package first on sys.path (a baseline checkout runs its code).
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def first_answer(self, timeout: float = 600) -> tuple[float, dict]:
        """Seconds from process start until a /predict call succeeds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "config", timeout=1).status_code == 200:
                    client = Client(self.url, verbose=False)
                    answer = client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
                    return time.perf_counter() - self.started, answer
            except (httpx.HTTPError, ValueError, ConnectionError):
                pass
            time.sleep(0.1)
        raise TimeoutError("app did not answer")

    def rss_mb(self) -> float:
        proc = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _latencies(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
            "min_ms": round(ms[0], 1), "n": len(ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--latency-calls", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=25)
    ap.add_argument("--total-requests", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_app.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_app_"))
    xla_cache = work / "cache"
    result: dict = {"model": args.model}
    loadavg_start = [round(v, 2) for v in os.getloadavg()]  # is the machine quiet?
    ticks_start = cpu_ticks()
    try:
        # 1. cold starts: empty compilation cache, then the cache the first run wrote
        app = App(args.model, xla_cache, work)
        cold, _ = app.first_answer()
        app.stop()
        app = App(args.model, xla_cache, work)
        warm_cache, _ = app.first_answer()
        result["cold_start_s"] = {"empty_xla_cache": round(cold, 1), "with_xla_cache": round(warm_cache, 1),
                                  "target": "<= 20"}
        # One TLS context for every request of this client: verification stays on, the per-request rebuild goes.
        tls = ssl.create_default_context(cafile=certifi.where())
        client = Client(app.url, verbose=False, download_files=str(work / "downloads"), ssl_verify=tls)
        default_client = Client(app.url, verbose=False, download_files=str(work / "downloads_default"))
        served = 1

        # Reference answer per example (sequential), and what the file name says.
        reference = {}
        for ex in EXAMPLES:
            r = client.predict(handle_file(str(ex)), api_name="/predict")
            reference[ex.name] = (r["plane"]["label"], r["tumor"]["label"])
            served += 1
        truth = {ex.name: normalize_tumor(ex.stem.split("_")[3]) for ex in EXAMPLES}

        # 2. latency, one image at a time
        image = handle_file(str(EXAMPLES[0]))
        latency = {}
        for name, c in (("shared_tls_context", client), ("default_client", default_client)):
            analyze = _latencies(lambda c=c: c.predict(image, api_name="/analyze"), args.latency_calls)
            predict = _latencies(lambda c=c: c.predict(image, api_name="/predict"), args.latency_calls)
            served += 2 * args.latency_calls
            latency[name] = {"analyze_with_gradcam": {**_stats(analyze), "target_median_ms": 400},
                             "predict_json": _stats(predict)}
        tls_ms = _latencies(lambda: httpx.create_ssl_context(), 20)
        result["latency_one_image"] = {**latency["shared_tls_context"], "default_client": latency["default_client"],
                                       "tls_context_ms": _stats(tls_ms)}

        # 4a. fill up to 50 requests, then record RSS
        while served < 50:
            client.predict(image, api_name="/predict")
            served += 1
        rss_50 = app.rss_mb()

        # 3. concurrency: each client its own connection, examples in rotation
        def run_client(k: int) -> tuple[int, int, list[float]]:
            c = Client(app.url, verbose=False)
            wrong = errors = 0
            times = []
            for i in range(args.requests_per_client):
                ex = EXAMPLES[(k + i) % len(EXAMPLES)]
                t = time.perf_counter()
                try:
                    r = c.predict(handle_file(str(ex)), api_name="/predict")
                    wrong += (r["plane"]["label"], r["tumor"]["label"]) != reference[ex.name]
                except Exception:  # every failure is counted, not raised
                    errors += 1
                times.append((time.perf_counter() - t) * 1000)
            return wrong, errors, times

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = list(pool.map(run_client, range(args.clients)))
        wall = time.perf_counter() - t0
        n_conc = args.clients * args.requests_per_client
        served += n_conc
        result["concurrency"] = {
            "clients": args.clients, "requests": n_conc,
            "wrong_answers": sum(o[0] for o in outcomes), "errors": sum(o[1] for o in outcomes),
            "throughput_per_s": round(n_conc / wall, 2),
            "latency_under_load": _stats([t for o in outcomes for t in o[2]]),
            "reference_matches_file_label": sum(reference[k][1] == truth[k] for k in truth),
            "examples": len(truth),
        }

        # 4b. continue to 500 requests (sequential, alternating endpoints), then RSS again
        while served < args.total_requests:
            ex = EXAMPLES[served % len(EXAMPLES)]
            client.predict(handle_file(str(ex)), api_name="/analyze" if served % 2 else "/predict")
            served += 1
        rss_500 = app.rss_mb()
        result["memory"] = {"rss_mb_after_50": round(rss_50, 1), f"rss_mb_after_{served}": round(rss_500, 1),
                            "growth_ratio": round(rss_500 / rss_50, 3), "target_growth": "<= 1.10"}
        app.stop()
    finally:
        with contextlib.suppress(Exception):  # already stopped on the normal path
            app.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"] = machine(loadavg_start, ticks_start)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
