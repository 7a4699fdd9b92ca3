"""The files of a long run (training/long_run.py), each written so that a kill at any moment leaves a good one.

* `state.npz`: one file, the state's arrays and a JSON header (as bytes). It is written under a temporary name,
  flushed and fsynced, then `os.replace`d over the previous state and the folder fsynced: a reader finds the old
  state or the new one, never half of one; only the last good state is kept (a full VGG16 state is ~0.3 GB).
* `progress.json`: written the same way.
* `run.lock`: an `flock` the training process holds for its lifetime. The kernel drops it when the process dies,
  SIGKILL included, so a stale pid file never blocks a restart and two copies can never train one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import jax
import numpy as np

META_KEY = "meta_json"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` so that it is replaced whole or not at all."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer killed mid-way
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def save_state(path: Path, tree: Any, meta: dict[str, Any]) -> None:
    """Every leaf of `tree` as a plain array (no pickles; the structure comes from the code) and `meta` as JSON."""
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_meta(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(data[META_KEY].tobytes())


def load_state(path: Path, like: Any) -> tuple[Any, dict[str, Any]]:
    """(the tree shaped as `like`, meta) from `save_state`'s file; refuses a state of another shape."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data[META_KEY].tobytes())
        leaves = [data[f"leaf_{i:05d}"] for i in range(len(data.files) - 1)]
    expected = jax.tree.leaves(like)
    if len(leaves) != len(expected) or any(np.shape(a) != np.shape(b) for a, b in zip(leaves, expected, strict=True)):
        raise ValueError(f"{path}: the saved state does not fit this model (other recipe or code)")
    return jax.tree.unflatten(jax.tree.structure(like), leaves), meta


class RunLock:
    """An exclusive, non-blocking flock on `path`; the holder's pid is written into it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def holder(self) -> int | None:
        """The pid written by the process that holds (or last held) the lock."""
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().strip())
        return None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (tried, and released at once)."""
        if self._fd is not None:
            return False
        if not self.acquire():
            return True
        self.release()
        return False
