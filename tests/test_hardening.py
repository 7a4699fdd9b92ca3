"""Issue #13 against the real server (`python app.py`, the real gradio_client, raw HTTP where a client
would refuse to send something): bounded shapes, decoder errors that never escape, URL inputs, upload
and per-client limits, run history. The server fixtures are test_app's."""

from __future__ import annotations

import asyncio
import http.client
import io
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import urlparse

import fuzz_inputs
import httpx
import numpy as np
import pytest
import test_app
from PIL import Image
from test_app import EXAMPLES, _check_answer

from braintumor_flax.serve import request_limits

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

server = test_app.server  # test_app's module-scoped fixtures: a real `python app.py` and its client
client = test_app.client


def _long_png(width: int, height: int) -> bytes:
    """A few hundred bytes: one grey row/column, PNG-compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _raw_call(server, endpoint: str, data: list) -> str:
    start = httpx.post(server.url + f"gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    assert start.status_code == 200, start.text
    return httpx.get(server.url + f"gradio_api/call/{endpoint}/{start.json()['event_id']}", timeout=120).text


def test_long_thin_images_are_answered_as_not_mri_with_a_plain_reason(client, tmp_path):
    for w, h in ((20_000, 1), (1, 65_000), (3000, 600)):
        path = tmp_path / f"line_{w}x{h}.png"
        path.write_bytes(_long_png(w, h))
        assert path.stat().st_size < 5000  # a few KB at most
        r = client.predict(handle_file(str(path)), api_name="/predict")
        assert r["ok"] and r["ood"] is True and r["tumor"]["label"] is None, r
        assert any("aspect ratio" in reason for reason in r["ood_details"]["reasons"]), r["ood_details"]


def test_decoder_errors_are_specific_not_generic(server, client, tmp_path):
    for name, (kind, seed, case) in fuzz_inputs.ESCAPED_BEFORE.items():
        path = tmp_path / f"fuzzed_{name}.tiff"
        path.write_bytes(fuzz_inputs.case_bytes(kind, seed, case))
        with pytest.raises(Exception, match="corrupt image structure") as info:
            client.predict(handle_file(str(path)), api_name="/predict")
        assert "verbose error reporting" not in str(info.value) and str(server.root) not in str(info.value)
    eps = tmp_path / "page.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(Exception, match="not a recognised image format"):
        client.predict(handle_file(str(eps)), api_name="/predict")
    assert server.process.poll() is None


def test_a_bad_item_never_aborts_the_batch(client, tmp_path):
    bad = tmp_path / "fuzzed.tiff"
    bad.write_bytes(fuzz_inputs.case_bytes(*fuzz_inputs.ESCAPED_BEFORE["TypeError"]))
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES[0], "..\\..\\win.jpg")
        zf.writestr(".hidden.jpg", EXAMPLES[1].read_bytes())
        zf.writestr("bad.tiff", bad.read_bytes())
    r = client.predict([handle_file(str(EXAMPLES[0])), handle_file(str(bad)), handle_file(str(archive))],
                       api_name="/predict_batch")
    rows = r["results"]
    assert [x["ok"] for x in rows] == [True, False, True, False, False], rows
    assert "corrupt image structure" in rows[1]["error"]
    assert rows[2]["file"] == "mixed.zip/../../win.jpg"
    assert rows[3]["file"] == "mixed.zip/.hidden.jpg" and "hidden file" in rows[3]["error"]
    _check_answer(rows[0])
    _check_answer(rows[2])


def test_missing_upload_names_no_server_path(server):
    upload = httpx.post(server.url + "gradio_api/upload", files={"files": ("gone.jpg", EXAMPLES[0].read_bytes(),
                                                                           "image/jpeg")}, timeout=30)
    (stored,) = upload.json()
    from pathlib import Path

    Path(stored).unlink()  # expired, or removed by the sweeper, between upload and call
    stream = _raw_call(server, "predict", [{"path": stored, "meta": {"_type": "gradio.FileData"}}])
    assert "event: error" in stream and "file not found" in stream, stream
    assert str(server.root) not in stream and str(Path(stored).parent) not in stream


def test_url_inputs_are_refused_before_any_download(server):
    # A loopback URL: without the guard Gradio would try to fetch it (its SSRF filter would then refuse
    # a private address with a different message); with it, nothing is fetched.
    for endpoint, data in (("predict", [{"path": server.url + "gradio_api/file=x.png", "meta": {"_type":
                                                                                                 "gradio.FileData"}}]),
                           ("predict_batch", [[{"path": "https://127.0.0.1/x.zip",
                                                "meta": {"_type": "gradio.FileData"}}]])):
        stream = _raw_call(server, endpoint, data)
        assert "event: error" in stream and "does not download URLs" in stream, stream
    assert server.process.poll() is None


def test_upload_request_over_the_total_limit_is_refused_unread(server):
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/gradio_api/upload")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(request_limits.MAX_UPLOAD_REQUEST_BYTES + 1))
    conn.endheaders()  # not one body byte sent: refused from the header
    resp = conn.getresponse()
    assert resp.status == 413 and b"at most 256 MB in all" in resp.read()
    conn.close()


def test_run_history_is_off(server):
    assert httpx.get(server.url + "config", timeout=10).json()["run_history"] is False


def test_one_client_cannot_hold_more_than_its_share_of_the_queue(server):
    """12 batch requests at once from one address: MAX_EVENTS_PER_CLIENT places are taken, the rest refused
    at once with a message saying why (each batch takes seconds, so none finishes while the others join)."""
    upload = httpx.post(server.url + "gradio_api/upload", files={"files": ("a.jpg", EXAMPLES[0].read_bytes(),
                                                                           "image/jpeg")}, timeout=30)
    (stored,) = upload.json()
    files = [{"path": stored, "meta": {"_type": "gradio.FileData"}}] * 12

    def join(_: int) -> httpx.Response:
        return httpx.post(server.url + "gradio_api/call/predict_batch", json={"data": [files]}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(join, range(12)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == request_limits.MAX_EVENTS_PER_CLIENT and codes.count(503) == 12 - codes.count(200)
    assert all("already has 8 requests queued or running" in r.text for r in responses if r.status_code == 503)
    for r in responses:  # every accepted request is answered in full
        if r.status_code == 200:
            stream = httpx.get(server.url + f"gradio_api/call/predict_batch/{r.json()['event_id']}", timeout=300).text
            assert "event: complete" in stream and stream.count('"ok": true') >= 12, stream[-500:]
    assert server.process.poll() is None


def test_limit_per_client_counts_waiting_and_running_events():
    def event(ip: str) -> SimpleNamespace:
        return SimpleNamespace(request=SimpleNamespace(headers={}, client=SimpleNamespace(host=ip)))

    waiting = SimpleNamespace(queue=[event("10.0.0.1")] * 2 + [event("10.0.0.2")])
    queue = SimpleNamespace(event_queue_per_concurrency_id={"model": waiting}, active_jobs=[[event("10.0.0.1")], None])

    async def push(body, request, username):
        return True, "id", "success"

    queue.push = push
    request_limits.limit_per_client(queue, max_events=3)
    greedy, polite = event("10.0.0.1").request, event("10.0.0.2").request
    assert asyncio.run(queue.push(None, greedy, None)) == (False, request_limits.CLIENT_BUSY, "queue_full")
    assert asyncio.run(queue.push(None, polite, None))[0] is True


def test_relax_queue_polling_on_gradios_own_queue():
    import gradio as gr

    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    queue = demo._queue
    assert queue.sleep_when_free < request_limits.QUEUE_POLL_S  # Gradio's default, which this changes
    request_limits.relax_queue_polling(queue)
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (
        request_limits.QUEUE_POLL_S, request_limits.PROGRESS_POLL_S)
    with pytest.raises(AttributeError, match="sleep_when_free"):
        request_limits.relax_queue_polling(SimpleNamespace())


def test_temp_sweeper_bounds_total_size_oldest_first(tmp_path):
    import os
    import time

    now = time.time()
    for i in range(5):
        p = tmp_path / f"d{i}" / "f.bin"
        p.parent.mkdir()
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - 1000 + i, now - 1000 + i))
    young = tmp_path / "young.bin"
    young.write_bytes(b"y" * 5000)
    sweeper = request_limits.TempSweeper(tmp_path, max_bytes=6000, min_age_s=60)
    assert sweeper.sweep() == 4000  # the four oldest go; the young file is never touched
    assert [(tmp_path / f"d{i}" / "f.bin").exists() for i in range(5)] == [False] * 4 + [True] and young.exists()


def test_large_decode_memory_stays_bounded_in_process():
    """Not a timing test: the bytes a long thin image needs are bounded by construction (no side² square)."""
    from braintumor_flax.data.imageio import decode_image, to_model_input

    rgb = decode_image(_long_png(65_000, 1))
    assert to_model_input(rgb, 128).shape == (128, 128, 3)
    assert Image.open(io.BytesIO(_long_png(65_000, 1))).size == (65_000, 1)
    assert np.asarray(rgb).nbytes == 65_000 * 3
