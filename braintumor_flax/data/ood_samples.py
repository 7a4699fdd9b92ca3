"""Images that are not brain MRI slices, for measuring the out-of-distribution check (and for its tests).

Generated ones need nothing but numpy and PIL; `packaged_photos()` adds the few real photographs that
installed packages ship (matplotlib's and gradio's sample images), when they are there.
"""

from __future__ import annotations

import importlib.util
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LOREM = ("Patient information leaflet. Magnetic resonance imaging uses a strong magnetic field and radio waves "
         "to create detailed images of the organs and tissues within the body. Please remove all metal objects "
         "before the examination. The scan usually takes between 15 and 90 minutes. Invoice number 2024-118, "
         "total due within 30 days. Table 1: results by group, mean (SD), p-value.")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


def noise(rng: np.random.Generator, size: int = 256, *, grey: bool = False) -> np.ndarray:
    shape = (size, size, 1) if grey else (size, size, 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    return np.repeat(arr, 3, axis=2) if grey else arr


def gaussian_blobs(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Smooth greyscale 'clouds' (low-pass noise): grey like an MRI, but no anatomy."""
    small = rng.normal(128, 60, (size // 16, size // 16)).clip(0, 255).astype(np.uint8)
    big = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))
    return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


def colour_gradient(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    img = c0 * (1 - x)[..., None] + c1 * x[..., None]
    img = img * (1 - y)[..., None] * 0.7 + c2 * y[..., None] * 0.3 + img * y[..., None] * 0.3
    return img.clip(0, 255).astype(np.uint8)


def grey_gradient(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    g = (np.cos(angle) * x + np.sin(angle) * y + 0.75) / 1.5
    return np.repeat((g.clip(0, 1) * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def document(rng: np.random.Generator, width: int = 420, height: int = 594, *, dark_mode: bool = False) -> np.ndarray:
    """A rendered text page (A4 proportions): black on white, or white on black ('dark mode')."""
    bg, fg = ((20, 20, 20), (235, 235, 235)) if dark_mode else ((255, 255, 255), (0, 0, 0))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    font = _font(int(rng.integers(11, 16)))
    draw.text((30, 20), "REPORT", fill=fg, font=_font(28))
    y = 70
    words = LOREM.split()
    while y < height - 40:
        rng.shuffle(words)
        for line in textwrap.wrap(" ".join(words), width=int(width / 7.5))[:6]:
            draw.text((30, y), line, fill=fg, font=font)
            y += 18
        y += 12
        if rng.random() < 0.3:  # a table
            for r in range(4):
                draw.rectangle([30, y + r * 16, width - 30, y + (r + 1) * 16], outline=fg)
            y += 80
    return np.asarray(img)


def photo_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A synthetic 'outdoor photo': sky gradient, sun, hills, textured grass, blurred like a lens would."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    sky = np.stack([100 + 80 * y, 150 + 60 * y, 230 - 20 * y], axis=-1)
    img = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy = rng.uniform(0.2, 0.8) * size, rng.uniform(0.1, 0.3) * size
    draw.ellipse([cx - 18, cy - 18, cx + 18, cy + 18], fill=(255, 230, 120))
    for i in range(3):
        base = size * (0.55 + 0.12 * i)
        pts = [(0, size)] + [(t, base + 20 * np.sin(t / size * (3 + i) + rng.uniform(0, 6))) for t in
                             range(0, size + 8, 8)] + [(size, size)]
        draw.polygon(pts, fill=(int(40 + 30 * i), int(110 + 40 * i), int(40 + 10 * i)))
    arr = np.asarray(img).astype(np.float32)
    arr[int(size * 0.6):] += rng.normal(0, 18, arr[int(size * 0.6):].shape)  # grass texture
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(out)


def radiograph_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A crude chest-X-ray look-alike: bright body, two dark lung fields, rib arcs, spine, grey surround."""
    img = Image.new("L", (size, size), int(rng.integers(40, 90)))
    draw = ImageDraw.Draw(img)
    draw.ellipse([size * 0.08, size * 0.05, size * 0.92, size * 1.15], fill=200)
    for side in (0.18, 0.55):
        draw.ellipse([size * side, size * 0.18, size * (side + 0.27), size * 0.85], fill=70)
    for k in range(8):
        yy = size * (0.22 + 0.07 * k)
        draw.arc([size * 0.12, yy - 20, size * 0.88, yy + 30], 200, 340, fill=170, width=4)
    draw.rectangle([size * 0.47, 0, size * 0.53, size], fill=215)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(3))).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape)
    return np.repeat(arr.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def checkerboard(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    cells = int(rng.integers(4, 16))
    y, x = np.mgrid[0:size, 0:size] * cells // size
    board = ((x + y) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def to_grey(rgb: np.ndarray) -> np.ndarray:
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    return np.repeat(grey[:, :, None], 3, axis=2)


GENERATORS = {
    "noise_rgb": lambda r: noise(r),
    "noise_grey": lambda r: noise(r, grey=True),
    "blobs_grey": gaussian_blobs,
    "gradient_colour": colour_gradient,
    "gradient_grey": grey_gradient,
    "document": document,
    "document_dark": lambda r: document(r, dark_mode=True),
    "photo_like": photo_like,
    "photo_like_grey": lambda r: to_grey(photo_like(r)),
    "radiograph_like": radiograph_like,
    "checkerboard": checkerboard,
}


def synthetic(n_per_kind: int = 10, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(kind, uint8 RGB image) for every generator, `n_per_kind` each, reproducibly."""
    rng = np.random.default_rng(seed)
    for kind, make in GENERATORS.items():
        for _ in range(n_per_kind):
            yield kind, make(rng)


def packaged_photos() -> Iterator[tuple[str, np.ndarray]]:
    """Real photographs shipped inside installed packages (colour and greyscale versions)."""
    candidates: list[Path] = []
    for package, relative in (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                              ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
                              ("gradio", "test_data/cheetah1.jpg"), ("gradio", "test_data/cheetah2.jpg"),
                              ("gradio", "test_data/cheetah1-copy.jpg")):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / relative
            if path.is_file():
                candidates.append(path)
    for path in candidates:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        yield f"photo:{path.name}", rgb
        yield f"photo_grey:{path.name}", to_grey(rgb)
