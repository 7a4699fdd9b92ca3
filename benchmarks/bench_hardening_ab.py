"""Before/after issue #13 in one run: main 0d244ca's app and this tree's app, both served at once on
localhost and called through the real `gradio_client`, interleaved request by request.

* /predict latency (median over interleaved calls on the example slices): after / before.
* The answers: every example's JSON (minus compute_ms) must be identical.
* Peak RSS rise of one request (VmHWM reset via /proc/PID/clear_refs) for a normal slice and for the
  issue's long thin PNGs; what a fuzzed TIFF gets back.

    python benchmarks/bench_hardening_ab.py [--before 0d244ca] [--rounds 40]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import certifi
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import machine, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

import fuzz_inputs  # noqa: E402
from bench_soak import EXAMPLES, Server, _png, _status, _strip_volatile  # noqa: E402


def _checkout(commit: str, dest: Path) -> Path:
    """app.py + the package + examples of `commit`, unpacked (the venv's editable install is not used:
    the script's folder comes first on sys.path)."""
    blob = subprocess.run(["git", "archive", commit, "app.py", "braintumor_flax", "examples"], cwd=ROOT,
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="0d244ca")
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hardening_ab.json"))
    args = ap.parse_args(argv)
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="bench_ab_"))
    (work / "old").mkdir()
    (work / "new").mkdir()
    tree = _checkout(args.before, work / "tree")
    servers = {"before": Server(work / "old", args.model, tree), "after": Server(work / "new", args.model)}
    result: dict = {"before": args.before, "after": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                                   capture_output=True, text=True).stdout.strip()}
    try:
        for s in servers.values():
            s.wait()
        time.sleep(20)  # background batch compile
        tls = ssl.create_default_context(cafile=certifi.where())
        clients = {k: Client(s.url, verbose=False, ssl_verify=tls, download_files=False) for k, s in servers.items()}
        answers = {k: [_strip_volatile(c.predict(handle_file(str(e)), api_name="/predict")) for e in EXAMPLES]
                   for k, c in clients.items()}
        same = sum(a == b for a, b in zip(answers["before"], answers["after"], strict=True))
        result["answers_identical"] = f"{same} of {len(EXAMPLES)}"
        latency: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.rounds):
            order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
            for k in order:
                t = time.perf_counter()
                clients[k].predict(handle_file(str(EXAMPLES[i % len(EXAMPLES)])), api_name="/predict")
                latency[k].append((time.perf_counter() - t) * 1000)
        med = {k: statistics.median(v) for k, v in latency.items()}
        result["predict_latency"] = {"before_median_ms": round(med["before"], 1),
                                     "after_median_ms": round(med["after"], 1),
                                     "after_over_before": round(med["after"] / med["before"], 3),
                                     "calls_each": args.rounds}
        inputs = work / "inputs"
        inputs.mkdir()
        cases = {"slice_512px": EXAMPLES[0]}
        for w, h in ((20_000, 1), (3000, 600)):
            p = inputs / f"line_{w}x{h}.png"
            p.write_bytes(_png(w, h))
            cases[f"png_{w}x{h}_{p.stat().st_size}_bytes"] = p
        fuzzed = inputs / "fuzzed.tiff"
        fuzzed.write_bytes(fuzz_inputs.case_bytes(*fuzz_inputs.ESCAPED_BEFORE["TypeError"]))
        cases["fuzzed_tiff"] = fuzzed
        memory: dict[str, dict] = {}
        for name, path in cases.items():
            memory[name] = {}
            for k, s in servers.items():
                pid = s.process.pid
                time.sleep(0.5)
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                before = _status(pid)["VmRSS"]
                try:
                    r = clients[k].predict(handle_file(str(path)), api_name="/predict")
                    answer = {"ood": r["ood"], "plane": r["plane"]["label"], "tumor": r["tumor"]["label"],
                              "reasons": r["ood_details"]["reasons"]}
                except Exception as exc:  # noqa: BLE001 - the message is the result
                    answer = {"error": str(exc)[:300]}
                memory[name][k] = {"peak_rss_rise_mb": _status(pid)["VmHWM"] - before, "answer": answer}
        result["per_request"] = memory
        result["server_rss_end_mb"] = {k: _status(s.process.pid)["VmRSS"] for k, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"] = machine(loadavg_start)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
