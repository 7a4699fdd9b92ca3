"""Raw logits of one or more checkpoints on the evaluation splits, through `models.forward`, cached on disk.

Cached by (checkpoint weight files, exact pixels), so a rerun or the peer benchmark recomputes nothing.
Blocks 1-4 are ~90 % of the compute at 128 px; with the faithful recipe they hold the ImageNet weights in
every model, so each distinct set of lower blocks runs once per image for all checkpoints that share it
(main + ablation), and its output is cached too: a new checkpoint that shares them costs only its heads.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from braintumor_flax.data.splits import Split
from braintumor_flax.hub import BrainTumorPipeline, checkpoint_folder
from braintumor_flax.models.forward import Forward
from braintumor_flax.models.params import lower_blocks_digest

PREDICTION_CACHE_VERSION = 1
WEIGHT_FILES = ("shared.safetensors", "view/model.safetensors", "tumor/model.safetensors",
                "view/config.json", "tumor/config.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def checkpoint_files_digest(folder: str | Path) -> str:
    """sha256 of the weight and model-config files only: writing temperatures/metrics back keeps the key."""
    folder = Path(folder)
    h = hashlib.sha256(f"predictions-v{PREDICTION_CACHE_VERSION}\n".encode())
    for name in WEIGHT_FILES:
        path = folder / name
        h.update(f"{name}:{path.stat().st_size if path.is_file() else -1}\n".encode())
        if path.is_file():
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):  # noqa: B023 - f is the loop's own file
                    h.update(chunk)
    return h.hexdigest()


def images_digest(images: np.ndarray) -> str:
    """Hash of the exact model inputs, so a change in decoding or resizing never reuses stale logits."""
    h = hashlib.sha256(f"{images.shape}|{images.dtype}\n".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded pipeline with where it came from and the hash its cached predictions are keyed by."""

    pipeline: BrainTumorPipeline
    folder: Path
    fingerprint: str


def load_checkpoint(source: str | Path) -> Checkpoint:
    """A local checkpoint folder, or a Hub repo id (downloaded once by huggingface_hub)."""
    folder = checkpoint_folder(source)
    return Checkpoint(BrainTumorPipeline.load_folder(folder), folder, checkpoint_files_digest(folder))


@dataclass
class Logits:
    view: np.ndarray | None  # [N, 3] raw logits, None when not computed (ablation without view branch)
    tumor: np.ndarray  # [N, 4]


def _cache_path(cache: Path, model_key: str, images_key: str, with_view: bool) -> Path:
    return cache / f"{model_key[:20]}_{images_key[:20]}_{'vt' if with_view else 't'}.npz"


def _load_cached(path: Path) -> Logits | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return Logits(z["view"] if "view" in z.files else None, z["tumor"])
    except (OSError, ValueError, KeyError):  # a half-written or foreign file: recompute
        return None


def _save_atomic(path: Path, save: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename: a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    save(tmp)
    tmp.replace(path)


def _load_lower(path: Path | None, n: int) -> np.ndarray | None:
    """Cached lower-block outputs (memory-mapped), or None when absent or of the wrong length."""
    if path is None or not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if len(arr) == n else None


def _progress(label: str) -> Callable[[int, int], None]:
    t0 = time.perf_counter()
    last = [t0]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 15:
            last[0] = now
            rate = (now - t0) / max(done, 1)
            log(f"  {label}: {done}/{total} images, {rate:.3f} s/image, ETA {rate * (total - done):.0f} s")

    return show


Entry = tuple[str, Checkpoint, bool]  # (name, checkpoint, with view logits)


def predict_splits(
    entries: Sequence[Entry],
    splits: dict[str, Split],
    *,
    jobs: Sequence[tuple[str, Sequence[Entry]]] | None = None,
    batch_size: int = 16,
    cache: Path | None = None,
) -> dict[str, dict[str, Logits]]:
    """{entry name: {split name: Logits}}. `jobs` narrows which entries run on which split (default: all on
    all). Logits found in the cache are read; the rest are computed, the lower blocks once per distinct set."""
    out: dict[str, dict[str, Logits]] = {name: {} for name, _, _ in entries}
    forwards: dict[str, Forward] = {}

    def forward_of(name: str, ckpt: Checkpoint) -> Forward:
        if name not in forwards:
            forwards[name] = Forward.from_pipeline(ckpt.pipeline, batch_size=batch_size)
        return forwards[name]

    for split_name, job_entries in (jobs if jobs is not None else [(name, entries) for name in splits]):
        split = splits[split_name]
        key = images_digest(split.images)
        todo = []
        for name, ckpt, with_view in job_entries:
            path = _cache_path(cache, ckpt.fingerprint, key, with_view) if cache else None
            hit = _load_cached(path) if path else None
            if hit is not None and len(hit.tumor) == len(split):
                out[name][split_name] = hit
            else:
                todo.append((name, ckpt, with_view, path))
        if not todo:
            log(f"  {split_name}: {len(split)} images, logits from cache")
            continue
        lowers: dict[str, np.ndarray] = {}  # lower-blocks digest -> their output on this split
        log(f"  {split_name}: {len(split)} images × {len(todo)} checkpoint(s)")
        for name, ckpt, with_view, path in todo:
            forward = forward_of(name, ckpt)
            if ckpt.pipeline.shares_lower_blocks:
                digest = lower_blocks_digest(ckpt.pipeline.view_model)
                if digest not in lowers:
                    lower_path = cache / f"lower_{digest[:20]}_{key[:20]}.npy" if cache else None
                    cached = _load_lower(lower_path, len(split))
                    if cached is None:
                        cached = forward.lower(split.images, progress=_progress(f"{split_name} lower blocks"))
                        if lower_path is not None:
                            _save_atomic(lower_path, lambda p, a=cached: np.save(p, a.astype(np.float32)))
                    else:
                        log(f"  {split_name}: lower-block outputs from cache")
                    lowers[digest] = cached
                result = forward(lower=lowers[digest], want_view=with_view)
            else:  # the models' lower blocks differ: nothing to share, run from pixels
                result = forward(split.images, want_view=with_view, progress=_progress(split_name))
            logits = Logits(result.view_logits if with_view else None, result.tumor_logits)
            out[name][split_name] = logits
            if path is not None:
                arrays = {"tumor": logits.tumor} if logits.view is None else {"view": logits.view,
                                                                               "tumor": logits.tumor}
                _save_atomic(path, lambda p, a=arrays: np.savez(p, **a))
    return out
