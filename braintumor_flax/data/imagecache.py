"""On-disk cache of decoded, resized images keyed by file content (sha1 of bytes) + image size.

Layout under cache_dir("images", "v<version>_s<size>"):
  manifest.json  {"entries": {sha1: {...}}, "stat": {path: [size, mtime_ns, sha1, hashed_at_ns]}}
  chunk-*.npy    uint8 [n, S, S, 3] arrays, memory-mapped on load
Failures are cached too (decoding is deterministic), so a second run decodes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braintumor_flax.data.dedup import perceptual_hash, pixel_hash
from braintumor_flax.data.imageio import ImageDecodeError, decode_image, to_model_input
from braintumor_flax.paths import cache_dir

CACHE_VERSION = 1  # bump when decoding/resizing changes, so stale pixels are never reused
CHUNK_ROWS = 1024
# A file modified within this window of being hashed may change without its mtime moving
# (coarse kernel timestamps), so such a stat memo is not trusted ("racy git" rule).
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Decoded:
    """Cache entry for one file: either a stored image (chunk/row) or an error."""

    sha1: str
    chunk: str | None = None
    row: int = -1
    pixel_hash: str = ""
    phash: int = 0
    height: int = 0
    width: int = 0
    error: str | None = None


def file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def decode_file(path: str, sha1: str, size: int) -> tuple[np.ndarray | None, dict]:
    """Worker: decode + hash + resize one file. Never raises for a bad image."""
    try:
        data = Path(path).read_bytes()
        if hashlib.sha1(data).hexdigest() != sha1:
            return None, {"error": "file changed while being read"}
        rgb = decode_image(data)
        meta = {"pixel_hash": pixel_hash(rgb), "phash": perceptual_hash(rgb),
                "height": int(rgb.shape[0]), "width": int(rgb.shape[1])}
        return to_model_input(rgb, size), meta
    except ImageDecodeError as exc:
        return None, {"error": str(exc).replace(f"<{len(data)} bytes>: ", "")}
    except OSError as exc:
        return None, {"error": f"cannot read file ({exc})"}


def _decode_star(args: tuple[str, str, int]) -> tuple[np.ndarray | None, dict]:
    return decode_file(*args)


class ImageCache:
    def __init__(self, image_size: int, root: Path | None = None):
        self.image_size = image_size
        self.dir = Path(root) if root is not None else cache_dir("images", f"v{CACHE_VERSION}_s{image_size}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        self.entries: dict[str, dict] = {}
        self.stat_memo: dict[str, list] = {}
        self._dirty = False
        self._read_manifest()

    # ---- manifest -------------------------------------------------------------------------
    def _read_manifest(self) -> None:
        try:
            doc = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return
        self.entries.update(doc.get("entries", {}))
        self.stat_memo.update(doc.get("stat", {}))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # non-POSIX: last writer wins, entries are only re-decoded
            yield
            return
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _save_manifest(self) -> None:
        with self._locked():
            mine_e, mine_s = dict(self.entries), dict(self.stat_memo)
            self._read_manifest()  # merge what concurrent runs wrote meanwhile
            self.entries.update(mine_e)
            self.stat_memo.update(mine_s)
            tmp = self.manifest_path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "image_size": self.image_size,
                                       "entries": self.entries, "stat": self.stat_memo}))
            os.replace(tmp, self.manifest_path)
            self._dirty = False

    # ---- hashing --------------------------------------------------------------------------
    def content_hash(self, path: Path) -> str:
        """sha1 of the file bytes, skipping the read when size+mtime match a non-racy memo."""
        key = os.path.abspath(path)  # not resolve(): realpath per file is slow
        st = path.stat()
        memo = self.stat_memo.get(key)
        if memo and memo[0] == st.st_size and memo[1] == st.st_mtime_ns and st.st_mtime_ns < memo[3] - _RACY_NS:
            return memo[2]
        sha1 = file_sha1(path)
        self.stat_memo[key] = [st.st_size, st.st_mtime_ns, sha1, time.time_ns()]
        self._dirty = True
        return sha1

    # ---- decoding -------------------------------------------------------------------------
    def lookup(self, paths: Sequence[Path], *, workers: int = 2,
               progress: Callable[[int, int], None] | None = None) -> tuple[list[Decoded], dict]:
        """Entries for `paths` (decoding only cache misses); returns (entries, stats)."""
        t0 = time.perf_counter()
        hashes: list[str | None] = []
        unreadable: dict[int, str] = {}
        for i, p in enumerate(paths):
            try:
                hashes.append(self.content_hash(Path(p)))
            except OSError as exc:
                hashes.append(None)
                unreadable[i] = f"cannot read file ({exc})"
        t_hash = time.perf_counter() - t0
        chunks = {p.name for p in self.dir.glob("chunk-*.npy")}
        stale = [h for h, e in self.entries.items() if e.get("chunk") and e["chunk"] not in chunks]
        for h in stale:  # chunk file deleted behind our back: decode again
            del self.entries[h]
        missing = sorted({h: i for i, h in enumerate(hashes) if h is not None and h not in self.entries}.items())
        todo = [(str(paths[i]), h, self.image_size) for h, i in missing]
        self._decode_missing(todo, workers, progress)
        out = []
        for i, h in enumerate(hashes):
            if h is None:
                out.append(Decoded(sha1="", error=unreadable[i]))
            else:
                out.append(Decoded(sha1=h, **self.entries[h]))
        stats = {"files": len(paths), "decoded": len(todo), "cache_hits": len(paths) - len(todo) - len(unreadable),
                 "hash_seconds": round(t_hash, 3), "decode_seconds": round(time.perf_counter() - t0 - t_hash, 3)}
        return out, stats

    def _decode_missing(self, todo: list[tuple[str, str, int]], workers: int,
                        progress: Callable[[int, int], None] | None) -> None:
        if not todo:
            if self._dirty:
                self._save_manifest()  # persist refreshed stat memos
            return
        pending: list[tuple[str, np.ndarray | None, dict]] = []
        if workers > 1 and len(todo) >= 64:
            # spawn, not fork: the caller may have JAX (multithreaded) loaded.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                results = pool.map(_decode_star, todo, chunksize=16)
                for n, ((_, sha1, _), (arr, meta)) in enumerate(zip(todo, results, strict=True), 1):
                    pending.append((sha1, arr, meta))
                    if len(pending) >= CHUNK_ROWS:
                        self._flush(pending)
                    if progress:
                        progress(n, len(todo))
        else:
            for n, args in enumerate(todo, 1):
                arr, meta = decode_file(*args)
                pending.append((args[1], arr, meta))
                if len(pending) >= CHUNK_ROWS:
                    self._flush(pending)
                if progress:
                    progress(n, len(todo))
        self._flush(pending)

    def _flush(self, pending: list[tuple[str, np.ndarray | None, dict]]) -> None:
        """Write one chunk of decoded images and record them (and failures) in the manifest."""
        good = [(sha1, arr, meta) for sha1, arr, meta in pending if arr is not None]
        if good:
            name = f"chunk-{uuid.uuid4().hex}.npy"
            tmp = self.dir / (name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack([arr for _, arr, _ in good]))
            os.replace(tmp, self.dir / name)
            for row, (sha1, _, meta) in enumerate(good):
                self.entries[sha1] = {"chunk": name, "row": row, **meta}
        for sha1, arr, meta in pending:
            if arr is None:
                self.entries[sha1] = {"error": meta["error"]}
        pending.clear()
        self._save_manifest()

    def load(self, entries: Sequence[Decoded]) -> np.ndarray:
        """Stack the cached images of `entries` (all must be successful) into [N, S, S, 3]."""
        s = self.image_size
        out = np.empty((len(entries), s, s, 3), np.uint8)
        by_chunk: dict[str, list[tuple[int, int]]] = {}
        for k, e in enumerate(entries):
            if e.chunk is None:
                raise ValueError(f"entry {e.sha1} has no image ({e.error})")
            by_chunk.setdefault(e.chunk, []).append((k, e.row))
        for chunk, pairs in by_chunk.items():
            arr = np.load(self.dir / chunk, mmap_mode="r")
            dst, rows = (np.array(x) for x in zip(*pairs, strict=True))
            order = np.argsort(rows)  # sequential reads from the memmap
            out[dst[order]] = arr[rows[order]]
        return out
