"""Soak: the real server (`python app.py`) under an address-space cap, 8 clients x 10 minutes through the
real `gradio_client`, sending valid slices, batches, zips and every bad kind of issue #13.

Phases:
1. Sequential references: every valid request once (/predict per slice, /predict_batch per batch / zip).
2. Memory per request, sequential: for each kind, reset the server's peak RSS (/proc/PID/clear_refs),
   send it, read VmHWM: the rise over the RSS just before.
3. Soak: N clients (distinct X-Forwarded-For, which the server is told to trust) pick kinds at random
   (seeded); every answer is classified: valid and equal to its reference, refused/flagged with the
   expected specific message, generic error, or anything else. The server's RSS is sampled every 0.25 s.
4. Fairness: one greedy client joins 64 slow batch requests at once while a polite one sends /predict:
   places the greedy client got, and the polite client's latency against its idle latency.

    python benchmarks/bench_soak.py [--clients 8] [--minutes 10] [--headroom-gb 1.5]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import httpx
import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

import fuzz_inputs  # noqa: E402

EXAMPLES = sorted((ROOT / "examples").glob("brisc2025_*.jpg"))
GENERIC = "verbose error reporting"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak"):
            out[key] = int(value.split()[0]) // 1024  # MB
    return out


def _png(width: int, height: int, value: int = 128) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _zip(path: Path, members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _multi_frame(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def make_inputs(work: Path) -> dict[str, dict]:
    """kind → {"files": [...], "endpoint", "expect": regex for a refusal / flag, or "valid"}."""
    d = work / "inputs"
    d.mkdir()
    kinds: dict[str, dict] = {}

    def file(name: str, data: bytes) -> Path:
        p = d / name
        p.write_bytes(data)
        return p

    for i, ex in enumerate(EXAMPLES):
        kinds[f"valid_{i}"] = {"endpoint": "/predict", "files": [ex], "expect": "valid"}
    kinds["valid_batch"] = {"endpoint": "/predict_batch", "files": EXAMPLES[:6], "expect": "valid"}
    kinds["valid_zip"] = {"endpoint": "/predict_batch", "expect": "valid",
                          "files": [_zip(d / "slices.zip", [(f"s/{e.name}", e.read_bytes()) for e in EXAMPLES])]}
    real = EXAMPLES[0].read_bytes()
    bad = {
        "text": (b"this is not an image\n" * 10, r"not a recognised image format"),
        "corrupt_jpeg": (b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)),
                         r"(?i)not a recognised|corrupt|cannot read|cannot decode"),
        "truncated_jpeg": (real[: len(real) // 3], r"corrupt or truncated"),
        "empty_png": (b"", r"empty file"),
        "huge_file_png": (b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024), r"limit is 20 MB"),
        "frames_gif": (_multi_frame("GIF"), r"has 3 frames"),
        "pages_tiff": (_multi_frame("TIFF"), r"has 3 frames"),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", r"not a recognised image format"),
    }
    # A header declaring 40,000 x 40,000 (1.6 Gpx) over a tiny IDAT.
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    bomb = bytearray(_png(1, 1))
    bomb[16:29] = ihdr
    bomb[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    bad["bomb_png"] = (bytes(bomb), r"too large")
    for name, (kind, seed, case) in fuzz_inputs.ESCAPED_BEFORE.items():
        bad[f"fuzzed_tiff_{name}"] = (fuzz_inputs.case_bytes(kind, seed, case), r"corrupt image structure")
    ext = {"text": "txt", "eps": "eps"}
    for name, (data, pattern) in bad.items():
        suffix = ext.get(name, name.rsplit("_", 1)[-1] if name.rsplit("_", 1)[-1] in ("jpeg", "png", "gif",
                                                                                      "tiff") else "tiff")
        kinds[name] = {"endpoint": "/predict", "files": [file(f"{name}.{suffix}", data)], "expect": pattern}
    for w, h in ((20_000, 1), (1, 65_000)):
        kinds[f"line_{w}x{h}"] = {"endpoint": "/predict", "files": [file(f"line_{w}x{h}.png", _png(w, h))],
                                  "expect": "ood:aspect ratio"}
    kinds["tiny_20px"] = {"endpoint": "/predict", "expect": "ood:only 20 x 20 px",
                          "files": [file("tiny.png", _png(20, 20))]}
    kinds["largest_rgba_png"] = {"endpoint": "/predict", "expect": "any",  # 4096 x 4096 RGBA: the costliest allowed
                                 "files": [file("big_rgba.png", _encode_big_rgba())]}
    kinds["missing_upload"] = {"endpoint": "raw:predict", "files": [], "expect": r"file not found"}
    kinds["url_input"] = {"endpoint": "raw:predict", "files": [], "expect": r"does not download URLs"}
    # Archives
    entries = _zip(d / "entries.zip", [(f"{i}.jpg", b"") for i in range(50_000)], zipfile.ZIP_STORED)
    kinds["zip_50k_entries"] = {"endpoint": "/predict_batch", "files": [entries], "expect": "rows:lists 50,000 entries"}
    kinds["zip_dotted_names"] = {"endpoint": "/predict_batch", "expect": "rows:hidden file",
                                 "files": [_zip(d / "dotted.zip", [("..\\..\\x.jpg", real), (".hidden.jpg", real)])]}
    black40 = _png(8000, 5000, 0)  # 40 Mpx, ~40 KB
    kinds["zip_200_black_40mpx"] = {"endpoint": "/predict_batch", "expect": "rows:too large",
                                    "files": [_zip(d / "black40.zip", [(f"{i}.png", black40) for i in range(200)])]}
    black16 = _png(4096, 4096, 0)
    kinds["zip_20_black_16mpx"] = {"endpoint": "/predict_batch", "expect": "rows:decoding budget",
                                   "files": [_zip(d / "black16.zip", [(f"{i}.png", black16) for i in range(20)])]}
    kinds["zip_201_images"] = {"endpoint": "/predict_batch", "expect": r"at most 200 images",
                               "files": [_zip(d / "many.zip", [(f"{i}.jpg", real) for i in range(201)])]}
    kinds["batch_with_bad_items"] = {"endpoint": "/predict_batch", "expect": "rows:corrupt image structure",
                                     "files": [EXAMPLES[0], kinds["fuzzed_tiff_TypeError"]["files"][0], EXAMPLES[1]]}
    return kinds


def _encode_big_rgba() -> bytes:
    y, x = np.mgrid[0:4096, 0:4096]
    rgba = np.dstack([(x % 256), (y % 256), ((x + y) % 256), np.full_like(x, 255)]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in ("compute_ms",)}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


class Server:
    def __init__(self, work: Path, model: str, tree: Path = ROOT):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.gradio_dir = work / "gradio"
        env = {**os.environ, "BRAINTUMOR_FLAX_MODEL": model, "GRADIO_SERVER_PORT": str(self.port),
               "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_TEMP_DIR": str(self.gradio_dir),
               "TMPDIR": str(work / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
               "BRAINTUMOR_FLAX_TRUST_FORWARDED": "1"}
        (work / "tmp").mkdir(exist_ok=True)
        self.log_path = work / "server.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=tree, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server not up")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Caller:
    """One client identity: a gradio_client Client + raw HTTP, with its own X-Forwarded-For."""

    def __init__(self, server: Server, ident: str, tls: ssl.SSLContext):
        self.server = server
        self.headers = {"X-Forwarded-For": ident}
        self.client = Client(server.url, verbose=False, headers=self.headers, ssl_verify=tls,
                             download_files=False)

    def raw(self, endpoint: str, data: list) -> str:
        start = httpx.post(self.server.url + f"gradio_api/call/{endpoint}", json={"data": data},
                           headers=self.headers, timeout=60)
        if start.status_code != 200:
            return f"HTTP {start.status_code}: {start.text}"
        return httpx.get(self.server.url + f"gradio_api/call/{endpoint}/{start.json()['event_id']}",
                         headers=self.headers, timeout=300).text

    def call(self, kind: str, spec: dict):
        """→ ("answer", json) or ("error", message)."""
        endpoint = spec["endpoint"]
        try:
            if endpoint == "raw:predict":
                if kind == "missing_upload":
                    up = httpx.post(self.server.url + "gradio_api/upload", headers=self.headers, timeout=30,
                                    files={"files": ("gone.jpg", EXAMPLES[0].read_bytes(), "image/jpeg")}).json()
                    # Gradio stores uploads by content hash: clients sending the same bytes share one file,
                    # so another client may have deleted it already (the request is still a missing file).
                    Path(up[0]).unlink(missing_ok=True)
                    payload = {"path": up[0], "meta": {"_type": "gradio.FileData"}}
                else:
                    payload = {"path": "https://127.0.0.1/x.png", "meta": {"_type": "gradio.FileData"}}
                text = self.raw("predict", [payload])
                return ("error", text) if "event: error" in text or text.startswith("HTTP") else ("answer", text)
            if endpoint == "/predict":
                return "answer", self.client.predict(handle_file(str(spec["files"][0])), api_name="/predict")
            return "answer", self.client.predict([handle_file(str(f)) for f in spec["files"]],
                                                 api_name="/predict_batch")
        except Exception as exc:  # noqa: BLE001 - classified below
            return "error", f"{type(exc).__name__}: {exc}"


def classify(kind: str, spec: dict, outcome: tuple[str, object], refs: dict) -> str:
    status, value = outcome
    expect = spec["expect"]
    if status == "error":
        text = str(value)
        if GENERIC in text:
            return "generic_error"
        if expect not in ("valid", "any") and not expect.startswith(("ood:", "rows:")) and re.search(expect, text):
            return "refused_specific"
        return "unexpected_error"
    if expect == "valid":
        return "valid_equal" if _strip_volatile(value) == refs.get(kind) else "valid_mismatch"
    if expect == "any":
        return "answered"
    if expect.startswith("ood:"):
        ok = isinstance(value, dict) and value.get("ood") is True and any(
            expect[4:] in r for r in value["ood_details"]["reasons"])
        return "flagged_specific" if ok else "unexpected_answer"
    if expect.startswith("rows:"):
        rows = value.get("results", []) if isinstance(value, dict) else []
        ok = any((not r["ok"]) and expect[5:] in r.get("error", "") for r in rows)
        return "refused_specific" if ok else "unexpected_answer"
    return "unexpected_answer"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--headroom-gb", type=float, default=1.5, help="address space allowed above the idle server's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args(argv)
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    kinds = make_inputs(work)
    server = Server(work, args.model)
    result: dict = {"clients": args.clients, "minutes": args.minutes}
    try:
        server.wait()
        time.sleep(20)  # the batch program compiles in the background right after start
        pid = server.process.pid
        idle = _status(pid)
        cap_mb = idle["VmSize"] + int(args.headroom_gb * 1024)
        subprocess.run(["prlimit", f"--pid={pid}", f"--as={cap_mb * 2**20}"], check=True)
        result["memory_cap"] = {"kind": "RLIMIT_AS (prlimit on the running server)", "idle_vmsize_mb": idle["VmSize"],
                                "cap_mb": cap_mb, "idle_rss_mb": idle["VmRSS"]}
        tls = ssl.create_default_context(cafile=certifi.where())
        ref_caller = Caller(server, "reference", tls)
        refs = {}
        for kind, spec in kinds.items():
            if spec["expect"] == "valid":
                status, value = ref_caller.call(kind, spec)
                assert status == "answer", (kind, value)
                refs[kind] = _strip_volatile(value)

        # Phase 2: memory per request (sequential).
        per_request = {}
        for kind, spec in kinds.items():
            time.sleep(0.3)
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = _status(pid)["VmRSS"]
            outcome = ref_caller.call(kind, spec)
            peak = _status(pid)["VmHWM"]
            per_request[kind] = {"rss_before_mb": before, "peak_rise_mb": peak - before,
                                 "outcome": classify(kind, spec, outcome, refs)}
        # An upload request over the total cap, refused from its header (no body sent).
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.putrequest("POST", "/gradio_api/upload")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(257 * 2**20))
        conn.endheaders()
        resp = conn.getresponse()
        per_request["upload_257mb_total"] = {"outcome": "refused_specific" if resp.status == 413 else
                                             f"HTTP {resp.status}"}
        conn.close()
        result["per_request"] = per_request
        batch_kinds = [k for k, s in kinds.items() if s["endpoint"] == "/predict_batch"]
        single = {k: v for k, v in per_request.items() if k not in batch_kinds and "peak_rise_mb" in v}
        result["max_single_request_rise_mb"] = max(v["peak_rise_mb"] for v in single.values())
        result["max_batch_request_rise_mb"] = max(per_request[k]["peak_rise_mb"] for k in batch_kinds)

        # Phase 3: soak.
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                try:
                    samples.append(_status(pid)["VmRSS"])
                except (OSError, KeyError):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        valid = [k for k, s in kinds.items() if s["expect"] == "valid"]
        bad = [k for k in kinds if k not in valid]
        deadline = time.monotonic() + args.minutes * 60
        outcomes: Counter = Counter()
        per_kind: dict[str, Counter] = {}
        failures: list[dict] = []
        lock = threading.Lock()

        def client_loop(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            caller = Caller(server, f"soak-client-{i}", tls)
            while time.monotonic() < deadline:
                kind = rng.choice(valid) if rng.random() < 0.5 else rng.choice(bad)
                outcome = caller.call(kind, kinds[kind])
                verdict = classify(kind, kinds[kind], outcome, refs)
                with lock:
                    outcomes[verdict] += 1
                    per_kind.setdefault(kind, Counter())[verdict] += 1
                    if verdict in ("generic_error", "unexpected_error", "unexpected_answer", "valid_mismatch") \
                            and len(failures) < 30:
                        failures.append({"kind": kind, "verdict": verdict, "detail": str(outcome[1])[:400]})

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_loop, range(args.clients)))
        soak_s = time.monotonic() - t0
        stop.set()
        sampler.join()
        alive = server.process.poll() is None
        end = _status(pid) if alive else {}
        result["soak"] = {
            "seconds": round(soak_s, 1), "requests": sum(outcomes.values()), "outcomes": dict(outcomes),
            "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
            "failures": failures,
            "server_alive": alive, "server_restarts": 0 if alive else 1,
            "server_peak_rss_mb": max(end.get("VmHWM", 0), max(samples, default=0)),
            "server_rss_end_mb": end.get("VmRSS"), "rss_samples": len(samples),
        }
        bad_total = sum(n for k, c in per_kind.items() if k in bad for n in c.values())
        bad_specific = sum(c.get("refused_specific", 0) + c.get("flagged_specific", 0) + c.get("answered", 0)
                           for k, c in per_kind.items() if k in bad)
        result["soak"]["bad_inputs"] = {"sent": bad_total, "refused_or_flagged_specifically": bad_specific}

        # Phase 4: fairness.
        greedy = Caller(server, "greedy", tls)
        polite = Caller(server, "polite", tls)
        idle_ms = []
        for _ in range(5):
            t = time.perf_counter()
            polite.client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
            idle_ms.append((time.perf_counter() - t) * 1000)
        up = httpx.post(server.url + "gradio_api/upload", headers=greedy.headers, timeout=30,
                        files={"files": ("a.jpg", EXAMPLES[0].read_bytes(), "image/jpeg")}).json()
        payload = [[{"path": up[0], "meta": {"_type": "gradio.FileData"}}] * 24]

        def join(_: int) -> int:
            return httpx.post(server.url + "gradio_api/call/predict_batch", json={"data": payload},
                              headers=greedy.headers, timeout=60).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(join, range(64)))
        busy_ms = []
        for _ in range(5):
            t = time.perf_counter()
            polite.client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
            busy_ms.append((time.perf_counter() - t) * 1000)
        result["fairness"] = {
            "greedy_joins": len(codes), "greedy_accepted": codes.count(200), "greedy_refused_503": codes.count(503),
            "polite_idle_median_ms": round(statistics.median(idle_ms), 1),
            "polite_under_flood_median_ms": round(statistics.median(busy_ms), 1),
            "ratio": round(statistics.median(busy_ms) / statistics.median(idle_ms), 2),
            "note": "without the per-client cap the greedy client's 64 joins would fill the whole queue "
                    "(max_size 64) and the polite client's request would be refused (queue full)",
        }
        result["server_alive_at_end"] = server.process.poll() is None
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # inputs (a 21 MB file, zips) and the server's uploads
    result["machine"] = machine(loadavg_start)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
