"""decode_image / to_model_input on generated edge cases and a few real files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from braintumor_flax.data.imageio import ImageDecodeError, decode_image, to_model_input


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit greyscale) and has no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gradient(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 7 % 256, y * 9 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)


def check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (h, w, 3) and arr.flags.c_contiguous


# ---- colour modes --------------------------------------------------------------------------


def test_rgb_png_roundtrip_exact():
    rgb = gradient()
    out = decode_image(encode(Image.fromarray(rgb), "PNG"))
    check_rgb(out, 24, 32)
    np.testing.assert_array_equal(out, rgb)


def test_greyscale_becomes_three_equal_channels():
    grey = gradient()[..., 0]
    out = decode_image(encode(Image.fromarray(grey, "L"), "PNG"))
    check_rgb(out, 24, 32)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: black
    rgba[1, 0] = (200, 100, 50, 128)  # half: about half intensity
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (200, 100, 50)
    assert tuple(out[0, 1]) == (0, 0, 0)
    np.testing.assert_allclose(out[1, 0], (100, 50, 25), atol=1)


def test_la_mode_is_composited_on_black():
    la = Image.merge("LA", [Image.new("L", (3, 3), 180), Image.new("L", (3, 3), 0)])
    assert decode_image(encode(la, "PNG")).max() == 0


def test_palette_with_transparency():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.putpixel((1, 1), 1)
    data = encode(im, "PNG", transparency=0)  # index 0 (red) is transparent
    out = decode_image(data)
    check_rgb(out, 4, 4)
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_palette_without_transparency():
    im = Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = decode_image(encode(im, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))


def test_16bit_png_scaled_by_actual_range():
    a = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 200 + 1000)  # 1000..3200: clipping would saturate
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    check_rgb(out, 3, 4)
    assert out.min() == 0 and out.max() == 255
    expected = np.rint((a - 1000) * 255.0 / 2200).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_32bit_int_and_float_images():
    a = np.linspace(-5, 5, 20, dtype=np.float32).reshape(4, 5)
    out = decode_image(encode(Image.fromarray(a, "F"), "TIFF"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # order preserved
    i32 = Image.fromarray(np.full((3, 3), 70000, np.int32), "I")
    assert decode_image(i32).max() == 0  # constant image: no range to stretch


def test_cmyk_jpeg():
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink = white
    data = encode(im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    check_rgb(out, 8, 8)
    assert out.min() > 240


def test_one_bit_image():
    im = Image.new("1", (5, 3), 0)
    im.putpixel((2, 1), 1)
    out = decode_image(encode(im, "PNG"))
    check_rgb(out, 3, 5)
    assert tuple(out[1, 2]) == (255, 255, 255) and out.sum() == 3 * 255


def test_one_by_one_image():
    out = decode_image(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"))
    assert out.shape == (1, 1, 3) and tuple(out[0, 0]) == (9, 8, 7)
    assert to_model_input(out, 4).shape == (4, 4, 3)


def test_exif_orientation_is_applied():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[0, 0] = 255  # mark the top-left corner (JPEG blurs it a little)
    rgb[0:3, 0:3] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data)
    check_rgb(out, 20, 10)
    assert out[:3, -3:].mean() > 200  # top-left moved to top-right
    assert out[:3, :3].mean() < 50


def test_pil_image_path_and_str_sources(tmp_path):
    rgb = gradient()
    p = tmp_path / "x.png"
    Image.fromarray(rgb).save(p)
    for src in (p, str(p), Image.open(p)):
        np.testing.assert_array_equal(decode_image(src), rgb)


# ---- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty file"),
        (b"this is not an image at all" * 10, "not a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),  # signature then garbage
    ],
)
def test_garbage_bytes_raise(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment):
        decode_image(data)


def test_truncated_jpeg_is_reported():
    data = encode(Image.fromarray(gradient(64, 64)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_pixel_data_is_reported():
    data = bytearray(encode(Image.fromarray(gradient(32, 32)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10: idat + 40] = b"\xff" * 30
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "nope.jpg")


def test_empty_file_on_disk(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(p)


def test_huge_declared_dimensions_rejected_from_header():
    # 10^10 pixels: PIL's own bomb check fires in Image.open; must surface as ImageDecodeError.
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png_header(100_000, 100_000))


def test_our_pixel_limit_applies_below_pils():
    # 7000 x 7000 = 49M: under PIL's limits, over our 40M default. No pixel data is needed to reject it.
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png_header(7000, 7000))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(encode(Image.new("L", (20, 20)), "PNG"), max_pixels=399)
    assert decode_image(encode(Image.new("L", (20, 20)), "PNG"), max_pixels=400).shape == (20, 20, 3)


def test_zero_size_header_rejected():
    with pytest.raises(ImageDecodeError):
        decode_image(png_header(0, 10))


def test_multiframe_gif_rejected():
    frames = [Image.new("L", (8, 8), v) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError, match="has 3 frames; upload a single 2-D slice"):
        decode_image(buf.getvalue())


def test_multipage_tiff_rejected():
    frames = [Image.new("L", (8, 8), v) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError, match="has 2 frames"):
        decode_image(buf.getvalue())


def test_single_frame_gif_accepted():
    out = decode_image(encode(Image.new("L", (6, 4), 77), "GIF"))
    check_rgb(out, 4, 6)
    assert (out == 77).all()


def test_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)


# ---- to_model_input ------------------------------------------------------------------------


def test_to_model_input_pads_centred_then_resizes():
    rgb = np.full((10, 20, 3), 255, np.uint8)  # wide: padded top and bottom
    out = to_model_input(rgb, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[:5] == 0).all() and (out[15:] == 0).all() and (out[5:15] == 255).all()
    small = to_model_input(rgb, 8)
    assert small.shape == (8, 8, 3)
    assert small[0].max() == 0 and small[4].min() == 255  # black band at the top, white in the middle
    np.testing.assert_array_equal(small, small[::-1])  # centred: symmetric rows


def test_to_model_input_deterministic_and_matches_pil():
    rgb = gradient(37, 37)
    a, b = to_model_input(rgb, 16), to_model_input(rgb.copy(), 16)
    np.testing.assert_array_equal(a, b)
    ref = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(to_model_input(rgb, 37), rgb)


def test_to_model_input_accepts_greyscale_and_rejects_bad_dtype():
    grey = gradient()[..., 0]
    out = to_model_input(grey, 12)
    assert out.shape == (12, 12, 3) and (out[..., 0] == out[..., 2]).all()
    with pytest.raises(ValueError):
        to_model_input(grey.astype(np.float32), 12)


def test_real_files_decode(real_data_dir):
    for p in [next((real_data_dir / "brisc2025/classification_task/test/glioma").glob("*.jpg")),
              next((real_data_dir / "kaggle-brain-tumor-mri/Testing/notumor").glob("*.jpg"))]:
        out = decode_image(p)
        assert out.ndim == 3 and out.shape[2] == 3 and max(out.shape[:2]) <= 256 and out.max() > 0


# ---- bounded memory, bit-identical --------------------------------------------------------


def _reference_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """The pre-hardening implementation: pad to the full square, then one PIL resize."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = rgb
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))


def test_to_model_input_is_bit_identical_to_pad_then_resize(monkeypatch):
    from braintumor_flax.data import resize

    monkeypatch.setattr(resize, "STRIP_BYTES", 4096)  # many strips even for small images
    rng = np.random.default_rng(7)
    shapes = [(int(rng.integers(1, 400)), int(rng.integers(1, 400))) for _ in range(60)]
    shapes += [(1, 3000), (3000, 1), (128, 300), (300, 128), (128, 128), (77, 77), (130, 256), (256, 130)]
    for h, w in shapes:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for size in (128, 64):
            np.testing.assert_array_equal(to_model_input(rgb, size), _reference_model_input(rgb, size), f"{h}x{w}")


def test_long_thin_image_costs_little():
    # 300 x 60,000: the old pad-to-square step allocated 60,000² x 3 bytes (10.8 GB) here.
    out = to_model_input(np.full((300, 60_000, 3), 255, np.uint8), 128)
    assert out.shape == (128, 128, 3) and out[:60].max() == 0 and out[70:].max() == 0
    assert out[63:65, 1:-1].min() > 50  # the band (300 / 469 of a row) split over the two middle rows


def test_conversion_in_strips_gives_the_same_bytes(monkeypatch):
    from braintumor_flax.data import imageio

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
    images = [Image.fromarray(base), Image.fromarray(base[..., 0]), Image.fromarray(np.dstack([base, base[..., :1]])),
              Image.fromarray(base).convert("CMYK"), Image.fromarray(base[..., 0].astype(np.uint16) * 250 + 3),
              Image.fromarray(rng.normal(size=(61, 47)).astype(np.float32)),
              Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)]
    whole = [decode_image(encode(im, "TIFF")) for im in images]
    monkeypatch.setattr(imageio, "STRIP_PIXELS", 100)  # 2 rows per strip
    for im, expected in zip(images, whole, strict=True):
        np.testing.assert_array_equal(decode_image(encode(im, "TIFF")), expected, im.mode)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(orientation):
    from PIL import ImageOps

    rgb = np.random.default_rng(orientation).integers(0, 256, (9, 14, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(rgb), "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data), expected)


def test_longer_side_limit_from_the_header():
    with pytest.raises(ImageDecodeError, match="longer side may be at most 1,000 px"):
        decode_image(png_header(1001, 1), max_side=1000)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX", "EPS"])
def test_formats_outside_the_allowlist_are_refused(fmt):
    if fmt == "EPS":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # never handed to Ghostscript
    else:
        data = encode(Image.new("RGB", (8, 8), (1, 2, 3)), fmt)
    with pytest.raises(ImageDecodeError, match="not a recognised image format .accepted: JPEG, PNG"):
        decode_image(data)


def test_missing_file_message_names_no_folder(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(tmp_path / "sub" / "nope.jpg")
    assert str(tmp_path) not in str(info.value) and info.value.reason.startswith("file not found")
    assert str(info.value).startswith("nope.jpg: ")


def test_any_pillow_exception_becomes_a_decode_error(monkeypatch):
    # Crafted TIFFs make Pillow raise TypeError / KeyError / SyntaxError in odd places; simulate each stage.
    data = encode(Image.new("L", (8, 8), 5), "TIFF")
    for stage, exc in (("load", TypeError("bad tag")), ("load", KeyError(273)), ("convert", AssertionError())):
        def boom(self, *args, _exc=exc, **kwargs):
            raise _exc
        with monkeypatch.context() as m:
            m.setattr(Image.Image if stage == "convert" else type(Image.open(io.BytesIO(data))), stage, boom)
            with pytest.raises(ImageDecodeError, match=type(exc).__name__):
                decode_image(data)


def test_admit_sees_the_header_before_decoding():
    import contextlib

    seen = []

    def admit(w, h):
        seen.append((w, h))
        raise ImageDecodeError("budget spent", "budget spent")

    with pytest.raises(ImageDecodeError, match="budget spent"):
        decode_image(png_header(300, 200), admit=admit)  # no pixel data at all: load() was never reached
    assert seen == [(300, 200)]
    assert decode_image(encode(Image.new("L", (3, 2)), "PNG"), admit=lambda w, h: contextlib.nullcontext()).shape \
        == (2, 3, 3)


def test_tall_thin_images_use_exact_sparse_weights(monkeypatch):
    from braintumor_flax.data import resize

    rng = np.random.default_rng(11)
    for _ in range(40):  # rows padded to > 4x their width: the sparse pass, byte for byte Pillow's
        w = int(rng.integers(1, 30))
        h = int(rng.integers(4 * w + 1, 4 * w + 900))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for size in (128, 37, 600):  # down- and upsampling
            np.testing.assert_array_equal(to_model_input(rgb, size), _reference_model_input(rgb, size), f"{h}x{w}")
    # CPU bounded by the real pixels: PIL never resamples anything wider than the model input here.
    sizes = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: (sizes.append(self.size), real(self, *a, **k))[1])
    assert to_model_input(np.full((65_000, 1, 3), 9, np.uint8), 128).shape == (128, 128, 3)
    assert sizes == [(128, 65_000)]  # only the vertical pass, on the 128-px-wide intermediate
    assert resize.SPARSE_ASPECT == 4
