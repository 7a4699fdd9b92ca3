"""Request-level guards around Gradio 6.31 (what the endpoint functions cannot see themselves).

* URL inputs: a client may send {"path": "https://..."} instead of an upload; Gradio would download it
  server-side (no size limit) before our code runs. `refuse_url_inputs` makes the input components
  refuse it with a clear message.
* Upload size: Gradio limits each file (`max_file_size`) but one upload request may carry 1,000 files.
  `UploadSizeLimit` (ASGI middleware) caps the whole request body.
* Fairness: the queue's 64 places are shared; `limit_per_client` caps the places (waiting + running)
  one client may hold, so one client cannot starve the others.
* Polling: Gradio's queue looks for work every 1 ms and for progress every 10 ms. On a 2-core machine those
  wake-ups compete with XLA's two compute threads; `relax_queue_polling` makes them 20 ms and 100 ms (a
  request may wait up to 20 ms longer to start).
* Temporary files: Gradio deletes uploads by age (`delete_cache`); `TempSweeper` also bounds their total
  size, deleting the oldest first (never files younger than a minute: they belong to running requests).
* Time: `REQUEST_TIME_LIMIT_S` is enforced between the images of a batch (`batch.decode_items`); one image's
  decode is bounded by the pixel limit instead (threads cannot be interrupted).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_UPLOAD_REQUEST_BYTES = 256 * 1024 * 1024  # one /upload request, all files together (= the zip budget)
MAX_EVENTS_PER_CLIENT = 8  # queue places (waiting + running) one client may hold, of QUEUE_MAX_SIZE = 64
REQUEST_TIME_LIMIT_S = 120.0  # a batch stops decoding new images after this; the rest get rows saying so
TEMP_MAX_BYTES = 2 * 1024**3  # uploads + outputs kept on disk, all together
TEMP_MIN_AGE_S = 60.0  # the sweeper never deletes younger files (a request may be using them)
TEMP_SWEEP_EVERY_S = 30.0

URL_REFUSED = ("a URL was sent instead of a file; this server does not download URLs — upload the image "
               "(or .zip) itself")
CLIENT_BUSY = (f"this client already has {MAX_EVENTS_PER_CLIENT} requests queued or running; wait for them "
               "to finish before sending more")


def _is_url(value: Any) -> bool:
    text = str(value).strip().lower()
    return text.startswith(("http://", "https://", "//")) or "://" in text[:16]


def refuse_url_inputs(blocks: Iterable[Any]) -> None:
    """Make these input components refuse URL "uploads" (Gradio's only server-side download path for them)."""
    import gradio as gr

    for block in blocks:
        original = block.async_move_resource_to_block_cache

        async def local_only(url_or_file_path: str | Path | None, _original: Callable[..., Awaitable[Any]] = original):
            if url_or_file_path is not None and _is_url(url_or_file_path):
                raise gr.Error(URL_REFUSED, title="URL inputs are not accepted", print_exception=False)
            return await _original(url_or_file_path)

        # An instance attribute: only these components change, not Gradio's classes (outputs still work).
        block.async_move_resource_to_block_cache = local_only


def client_key(request: Any) -> str:
    """Who is asking: the peer address, or (behind the Hugging Face proxy, or when told to trust one) the
    first X-Forwarded-For address. Not trusted by default: anyone could send that header."""
    headers = getattr(request, "headers", None) or {}
    trust = os.environ.get("BRAINTUMOR_FLAX_TRUST_FORWARDED") == "1" or bool(os.environ.get("SPACE_ID"))
    forwarded = headers.get("x-forwarded-for", "") if trust else ""
    if forwarded.strip():
        return forwarded.split(",")[0].strip()
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def limit_per_client(queue: Any, max_events: int = MAX_EVENTS_PER_CLIENT) -> None:
    """Wrap Gradio's `Queue.push`: refuse a client's event while it holds `max_events` places.

    Counted from the queue itself (waiting events + running jobs), so nothing has to be released.
    The refusal is Gradio's own "queue full" answer (HTTP 503) with our message.
    """
    original = queue.push

    def held_by(key: str) -> int:
        waiting = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
        running = [e for job in queue.active_jobs if job for e in job]
        return sum(1 for e in (*waiting, *running) if client_key(e.request) == key)

    async def push(body: Any, request: Any, username: str | None):
        if held_by(client_key(request)) >= max_events:
            return False, CLIENT_BUSY, "queue_full"
        return await original(body, request, username)

    queue.push = push


QUEUE_POLL_S = 0.02  # Gradio 6.31: 0.001
PROGRESS_POLL_S = 0.1  # Gradio 6.31: 0.01


def relax_queue_polling(queue: Any, poll_s: float = QUEUE_POLL_S, progress_poll_s: float = PROGRESS_POLL_S) -> None:
    """Lengthen the queue's idle polling intervals. They are attributes of Gradio's `Queue`, checked here, so a
    Gradio that renames them fails loudly in the tests instead of silently polling every millisecond."""
    for name, value in (("sleep_when_free", poll_s), ("progress_update_sleep_when_free", progress_poll_s)):
        if not hasattr(queue, name):
            raise AttributeError(f"Gradio's Queue has no {name!r}: check relax_queue_polling against this Gradio")
        setattr(queue, name, value)


class UploadSizeLimit:
    """ASGI middleware: an upload request whose body exceeds `max_bytes` is refused with HTTP 413.

    Refused from Content-Length before reading; a chunked body is counted as it streams and cut off.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_UPLOAD_REQUEST_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not scope.get("path", "").rstrip(
                "/").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    return {"type": "http.disconnect"}  # the parser stops; nothing more is stored
            return message

        await self.app(scope, counted_receive, send)

    async def _refuse(self, send: Callable) -> None:
        body = (f"upload refused: one request may carry at most {self.max_bytes / 2**20:.0f} MB in all "
                "(send the files in several requests)").encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class TempSweeper(threading.Thread):
    """Keeps the total size of `folder` under `max_bytes`, deleting the oldest files (>= `min_age_s` old)."""

    def __init__(self, folder: str | Path, *, max_bytes: int = TEMP_MAX_BYTES, min_age_s: float = TEMP_MIN_AGE_S,
                 every_s: float = TEMP_SWEEP_EVERY_S):
        super().__init__(name="temp-sweeper", daemon=True)
        self.folder = Path(folder)
        self.max_bytes, self.min_age_s, self.every_s = max_bytes, min_age_s, every_s
        self._stop = threading.Event()

    def sweep(self) -> int:
        """One pass; returns the bytes deleted."""
        files = []
        for path in self.folder.rglob("*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        freed = 0
        now = time.time()
        for mtime, size, path in sorted(files):
            if total - freed <= self.max_bytes or now - mtime < self.min_age_s:
                break
            try:
                path.unlink()
                freed += size
            except OSError:
                continue
        if freed:
            log.info("temp sweeper: deleted %.1f MB of old uploads (cap %.0f MB)", freed / 2**20,
                     self.max_bytes / 2**20)
        return freed

    def run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive an odd file system error
                log.exception("temp sweeper failed")

    def stop(self) -> None:
        self._stop.set()
