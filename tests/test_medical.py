"""DICOM / NIfTI reading on real files: the examples pydicom and nibabel ship in their own packages, and
DICOM / NIfTI written here from the shared BRISC slices with true orientation elements (the header plane
must equal the file name's plane, and the pixels must come back exactly as the picture shows them).
No model: these run in seconds."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from braintumor_flax.data.medical import MedicalFormatError, read_dicom_slice, read_volume, sniff
from braintumor_flax.data.medical import limits as medical_limits
from braintumor_flax.data.medical.privacy import IDENTIFYING_KEYWORDS
from braintumor_flax.data.medical.volume import PLANE_AXIS
from braintumor_flax.data.medical.writers import (
    displayed,
    identifying_elements,
    searchable,
    write_dicom_multiframe,
    write_dicom_series,
    write_nifti,
)
from braintumor_flax.labels import PLANES, normalize_plane

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PER_PLANE = 8  # BRISC test slices per plane and format written here (the benchmark script does all of them)


def brisc_slices(data_dir: Path, plane_code: str, n: int, size: tuple[int, int] = (256, 256)) -> list[tuple[str,
                                                                                                            np.ndarray]]:
    """(file name, uint8 grey) of the first n BRISC test slices of one plane and one size."""
    out = []
    for path in sorted((data_dir / "brisc2025" / "classification_task" / "test").glob(f"*/*_{plane_code}_t1.jpg")):
        with Image.open(path) as im:
            if im.size == size:
                out.append((path.name, np.asarray(im.convert("L"))))
        if len(out) == n:
            break
    return out


def _plane_of(name: str) -> str:
    return normalize_plane(name.split("_")[4])


# --- files shipped inside pydicom and nibabel ------------------------------------------------------


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"])
def test_pydicom_mr_small_in_every_transfer_syntax_reads_as_the_uncompressed_file(name):
    reference = read_volume(get_testdata_file("MR_small.dcm"))
    volume = read_volume(get_testdata_file(name))
    assert sniff(get_testdata_file(name)) == "dicom"
    np.testing.assert_array_equal(volume.data, reference.data)
    assert volume.acquired_plane == "axial"  # its Image Orientation (Patient) is 1\0\0\0\1\0
    assert volume.window_source == "DICOM Window Center / Width"


def test_pydicom_ct_rescale_slope_intercept_is_applied():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    volume = read_volume(get_testdata_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) != 0
    assert volume.data.min() == expected.min() and volume.data.max() == expected.max()
    assert volume.window_source.startswith("percentile")  # CT_small states no window


@pytest.mark.parametrize("name, pattern", [
    ("test-SR.dcm", "holds no image"),  # a structured report: no pixel data
    ("rtplan.dcm", "holds no image"),
    ("MR_truncated.dcm", "corrupt or truncated"),
    ("examples_palette.dcm", "PALETTE COLOR is not supported"),
    ("rtdose.dcm", "same slice position"),  # a multi-frame dose grid whose frames share a position
])
def test_pydicom_files_we_cannot_use_get_clear_messages(name, pattern):
    with pytest.raises(MedicalFormatError, match=pattern):
        read_volume(get_testdata_file(name))


def test_nibabel_example_files_read_with_their_orientation():
    anatomical = read_volume(NIBABEL_DATA / "anatomical.nii")
    img = nib.load(NIBABEL_DATA / "anatomical.nii")
    assert anatomical.acquired_plane == {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal"}.get(
        nib.aff2axcodes(img.affine)[2], "sagittal")
    assert sorted(anatomical.shape) == sorted(img.shape[:3])
    gz = read_volume(NIBABEL_DATA / "standard.nii.gz")
    assert gz.source["format"] == "NIfTI-1 (gzip)"
    two = read_volume(NIBABEL_DATA / "example_nifti2.nii.gz")
    assert two.source["format"].startswith("NIfTI-2")


def test_nibabel_4d_file_volume_choice_and_clear_errors():
    path = NIBABEL_DATA / "example4d.nii.gz"
    first, second = read_volume(path), read_volume(path, volume_index=1)
    assert first.source["n_volumes"] == 2 and first.source["volume_index"] == 0
    assert not np.array_equal(first.data, second.data)
    with pytest.raises(MedicalFormatError, match=r"volume 5 asked for, but the file holds 2 volume"):
        read_volume(path, volume_index=5)
    with pytest.raises(MedicalFormatError, match="6-D NIfTI"):
        read_volume(NIBABEL_DATA / "row_major.dconn.nii")


# --- files written from the BRISC slices ------------------------------------------------------------


@pytest.mark.parametrize("plane_code", ["ax", "co", "sa"])
def test_brisc_single_slice_dicom_header_plane_and_pixels(real_data_dir, tmp_path, plane_code):
    slices = brisc_slices(real_data_dir, plane_code, PER_PLANE)
    assert len(slices) == PER_PLANE
    syntaxes = [None, RLELossless, JPEG2000Lossless]
    for i, (name, grey) in enumerate(slices):
        plane = _plane_of(name)
        path = write_dicom_series(tmp_path / f"{plane}{i}", [grey], plane, monochrome1=i % 2 == 1,
                                  transfer_syntax=syntaxes[i % 3])[0]
        rgb, header_plane, info = read_dicom_slice(path)
        assert header_plane == plane, name
        # Rescale, window and (every other file) MONOCHROME1 inversion undo exactly what the writer did.
        np.testing.assert_array_equal(rgb[..., 0], displayed(grey, plane), err_msg=name)
        assert rgb.shape == (*grey.shape, 3) and rgb.dtype == np.uint8
        assert info["inverted"] is (i % 2 == 1)


@pytest.mark.parametrize("plane_code", ["ax", "co", "sa"])
def test_brisc_nifti_volume_header_plane_and_every_cut_the_right_way_up(real_data_dir, tmp_path, plane_code):
    slices = brisc_slices(real_data_dir, plane_code, PER_PLANE)
    plane = _plane_of(slices[0][0])
    path = write_nifti(tmp_path / "scan.nii.gz", [g for _, g in slices], plane)
    volume = read_volume(path)
    assert volume.acquired_plane == plane
    assert volume.n_slices(plane) == PER_PLANE
    for k, (name, grey) in enumerate(slices):
        np.testing.assert_array_equal(volume.slice_rgb(plane, k)[..., 0], displayed(grey, plane), err_msg=name)
    # The two other cuts exist, are upright (superior / anterior at the top) and use the volume's window.
    for other in set(PLANES) - {plane}:
        assert volume.n_slices(other) == volume.shape[PLANE_AXIS[other]]
        assert volume.slice_rgb(other, volume.n_slices(other) // 2).dtype == np.uint8
    assert volume.window_source == "NIfTI cal_min / cal_max"


def test_brisc_header_plane_is_right_for_every_generated_file(real_data_dir, tmp_path):
    """The issue's target: header plane correct on 100 % of the generated files (3 formats x 3 planes)."""
    total = correct = 0
    for code in ("ax", "co", "sa"):
        slices = brisc_slices(real_data_dir, code, 4)
        plane = _plane_of(slices[0][0])
        pictures = [g for _, g in slices]
        files = [write_nifti(tmp_path / f"{code}.nii", pictures, plane, scaled=False),
                 write_dicom_multiframe(tmp_path / f"{code}.mf", pictures, plane),
                 *write_dicom_series(tmp_path / code, pictures, plane)]
        for f in files:
            total += 1
            correct += read_volume(f).acquired_plane == plane
    assert (correct, total) == (18, 18)


def test_brisc_multiframe_sorted_by_position_and_thick_slices_not_squashed(real_data_dir, tmp_path):
    slices = [g for _, g in brisc_slices(real_data_dir, "ax", 5)]
    path = write_dicom_multiframe(tmp_path / "mf", slices, "axial", slice_spacing=5.0)  # frames stored reversed
    volume = read_volume(path)
    assert volume.acquired_plane == "axial" and volume.spacing == pytest.approx((1.0, 1.0, 5.0))
    for k, grey in enumerate(slices):  # axial index 0 = most inferior = the first slice written
        np.testing.assert_array_equal(volume.slice_rgb("axial", k)[..., 0], grey)
    coronal = volume.slice_rgb("coronal", 128)
    assert coronal.shape[:2] == (25, 256)  # 5 slices x 5 mm shown 25 px tall, not 5
    # A displayed pixel's area: 1 mm² in the axial cut; in the resampled coronal cut, the cut's physical
    # extent (25 mm x 256 mm) over its displayed pixels — and each cut states the spacing between its slices.
    assert volume.pixel_area_mm2("axial") == pytest.approx(1.0)
    assert volume.pixel_area_mm2("coronal") * coronal.shape[0] * coronal.shape[1] == pytest.approx(25 * 256)
    assert volume.info("axial")["slice_thickness_mm"] == 5.0 and volume.info("coronal")["slice_thickness_mm"] == 1.0


def _zip(path: Path, files: list[Path], extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        members = [(f"series/{f.name}", f.read_bytes()) for f in files] + list((extra or {}).items())
        random.Random(0).shuffle(members)  # archive order must not matter
        for name, data in members:
            zf.writestr(name, data)
    return path


def test_brisc_series_zip_sorted_by_position_ignoring_other_files(real_data_dir, tmp_path):
    slices = [g for _, g in brisc_slices(real_data_dir, "co", 6)]
    files = write_dicom_series(tmp_path / "s", slices, "coronal", slice_spacing=3.0)
    sr = Path(get_testdata_file("test-SR.dcm")).read_bytes()
    path = _zip(tmp_path / "series.zip", files, {"README.txt": b"exported", "report.dcm": sr})
    volume = read_volume(path)
    assert volume.acquired_plane == "coronal"
    assert volume.source["files_skipped"] == 2
    # Coronal slices written along +y (posterior); canonical index 0 is the most posterior = the last written.
    for k in range(6):
        np.testing.assert_array_equal(volume.slice_rgb("coronal", k)[..., 0], slices[5 - k])


def test_series_zip_errors(real_data_dir, tmp_path):
    slices = [g for _, g in brisc_slices(real_data_dir, "ax", 5)]
    a = write_dicom_series(tmp_path / "a", slices[:3], "axial")
    b = write_dicom_series(tmp_path / "b", slices[3:], "axial", names=["B1", "B2"])
    with pytest.raises(MedicalFormatError, match=r"holds 2 image series \(3, 2 images\)"):
        read_volume(_zip(tmp_path / "two.zip", a + b))
    gaps = write_dicom_series(tmp_path / "g", slices, "axial", gaps=[1, 1, 3, 1])  # a slice is missing
    with pytest.raises(MedicalFormatError, match="inconsistent slice spacing: gaps from 1.00 to 3.00 mm"):
        read_volume(_zip(tmp_path / "gaps.zip", gaps))
    dup = write_dicom_series(tmp_path / "d", slices[:3], "axial", gaps=[1, 0])
    with pytest.raises(MedicalFormatError, match="same slice position"):
        read_volume(_zip(tmp_path / "dup.zip", dup))
    with pytest.raises(MedicalFormatError, match="no DICOM image"):
        read_volume(_zip(tmp_path / "none.zip", [], {"a.txt": b"hello"}))


# --- limits and bad input ---------------------------------------------------------------------------


def _small_dicom(tmp_path: Path, **changes) -> Path:
    path = write_dicom_series(tmp_path / "small", [np.full((8, 8), 100, np.uint8)], "axial")[0]
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = tmp_path / "changed"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_sizes_are_refused_from_the_header_before_decoding(tmp_path):
    with pytest.raises(MedicalFormatError, match=r"too large: 1 frame\(s\) of 60000 x 60000"):
        read_volume(_small_dicom(tmp_path, Rows=60000, Columns=60000))  # the pixel data is only 128 bytes
    with pytest.raises(MedicalFormatError, match=r"5,000 slices; the limit is 1,024"):
        read_volume(_small_dicom(tmp_path, Rows=1, Columns=1, NumberOfFrames=5000))
    # A NIfTI header claiming 2000^3 voxels, with almost no data: refused by the limit, not by a failed read.
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    hdr.set_data_shape((2000, 2000, 2000))
    raw[:348] = hdr.binaryblock
    bomb = tmp_path / "bomb.nii"
    bomb.write_bytes(bytes(raw))
    with pytest.raises(MedicalFormatError, match=r"2000 x 2000 x 2000 = 8,000,000,000 voxels"):
        read_volume(bomb)
    assert medical_limits.MAX_VOXELS < 8_000_000_000


def test_unsupported_compression_and_corrupt_files(tmp_path):
    mpeg = _small_dicom(tmp_path)
    ds = pydicom.dcmread(mpeg)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264: no decoder exists here
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg4", enforce_file_format=True)
    with pytest.raises(MedicalFormatError, match=r"compressed as MPEG-4 AVC/H.264.*cannot decode"):
        read_volume(tmp_path / "mpeg4")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(128) + b"DICM" + bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8)))
    with pytest.raises(MedicalFormatError, match="not a readable DICOM file"):
        read_volume(garbage)
    text = tmp_path / "notes.nii"
    text.write_text("not a volume")
    with pytest.raises(MedicalFormatError, match="not a DICOM file, a .zip of a DICOM series or a NIfTI"):
        read_volume(text)
    with pytest.raises(MedicalFormatError, match="burnt into the image"):
        read_volume(_small_dicom(tmp_path, BurnedInAnnotation="YES"))


def test_oblique_orientation_is_reported_and_nearest_plane_kept(tmp_path):
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    tilted = read_volume(_small_dicom(tmp_path, ImageOrientationPatient=[1, 0, 0, 0, c, s]))
    assert tilted.acquired_plane == "axial" and not tilted.is_oblique
    c, s = np.cos(np.radians(45)), np.sin(np.radians(45))
    oblique = read_volume(_small_dicom(tmp_path, ImageOrientationPatient=[1, 0, 0, 0, c, s]))
    assert oblique.is_oblique


def test_reader_outputs_carry_no_patient_data(real_data_dir, tmp_path):
    phi = identifying_elements()
    grey = brisc_slices(real_data_dir, "ax", 1)[0][1]
    path = write_dicom_series(tmp_path / "p", [grey], "axial", extra=phi)[0]
    assert all(k in pydicom.dcmread(path) for k in IDENTIFYING_KEYWORDS if k in phi)
    _, _, info = read_dicom_slice(path)
    text = json.dumps(info)
    for value in searchable(phi):
        assert value not in text
    # An error about a file full of identifying data quotes none of it either.
    broken = pydicom.dcmread(path)
    broken.PixelData = broken.PixelData[:50]
    broken.save_as(tmp_path / "broken", enforce_file_format=True)
    with pytest.raises(MedicalFormatError) as info_exc:
        read_volume(tmp_path / "broken")
    assert "ZZPHI" not in str(info_exc.value) and "DOE" not in str(info_exc.value)


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_every_cut_is_shown_the_right_way_up(tmp_path, fmt):
    """Axial slices 0..2 (inferior → superior) of 8 x 8 with the patient's right (image left) and anterior
    (image top) halves marked: the coronal and sagittal cuts must show superior at the top, the patient's right
    on the left (coronal) and anterior on the left (sagittal)."""
    pictures = []
    for k in range(3):
        pic = np.full((8, 8), 40 * (k + 1), np.uint8)
        pic[:4, :4] += 100  # top-left quarter: anterior and the patient's right
        pictures.append(pic)
    if fmt == "nifti":
        volume = read_volume(write_nifti(tmp_path / "v.nii", pictures, "axial", scaled=False))
    else:
        volume = read_volume(_zip(tmp_path / "v.zip", write_dicom_series(tmp_path / "s", pictures, "axial")))
    assert volume.shape == (8, 8, 3)
    coronal = volume.cut("coronal", 0)  # the most posterior coronal row: no anterior mark, right-left split
    sagittal = volume.cut("sagittal", 7)  # the patient's rightmost column
    for cut in (coronal, sagittal):
        assert cut.shape == (3, 8)
        assert cut[0, 6] > cut[1, 6] > cut[2, 6]  # superior (the last slice, brightest) at the top
    assert volume.cut("coronal", 7)[0, :4].mean() > volume.cut("coronal", 7)[0, 4:].mean()  # right on the left
    assert sagittal[0, :4].mean() > sagittal[0, 4:].mean()  # anterior on the left
    np.testing.assert_array_equal(volume.cut("axial", 2), pictures[2])  # the acquired plane as stored


def test_series_with_mixed_orientations_or_sizes_is_refused(tmp_path):
    grey = np.full((8, 8), 90, np.uint8)
    uid = "1.2.826.0.1.3680043.8.498.1"
    axial = write_dicom_series(tmp_path / "a", [grey, grey], "axial", series_uid=uid)
    coronal = write_dicom_series(tmp_path / "c", [grey], "coronal", series_uid=uid, names=["C1"])
    with pytest.raises(MedicalFormatError, match="different orientations"):
        read_volume(_zip(tmp_path / "mixed.zip", axial + coronal))
    small = write_dicom_series(tmp_path / "s", [np.full((4, 4), 90, np.uint8)], "axial", series_uid=uid,
                               names=["S1"])
    with pytest.raises(MedicalFormatError, match="differ in size"):
        read_volume(_zip(tmp_path / "sizes.zip", axial + small))


def _slice(tumour: str, *, ood: bool = False, plane: str = "axial", area: int | None = None):
    from braintumor_flax.ood import OODResult
    from braintumor_flax.serve.service import SliceResult

    tumor_probs = {c: (0.7 if c == tumour else 0.1) for c in ("glioma", "meningioma", "no_tumor", "pituitary")}
    plane_probs = {p: (0.8 if p == plane else 0.1) for p in PLANES}
    return SliceResult("s", plane_probs, tumor_probs, OODResult(ood, 2.0 if ood else 0.5, None, {}, []),
                       header_plane="axial", tumor_area_px=area)


def test_volume_summary_aggregation_rules():
    from braintumor_flax.serve.volume_analysis import VolumeAnalysis

    def summary(slices):
        return VolumeAnalysis("v", "axial", {}, slices, []).summary()

    # One tumour slice among clear ones is not enough; two are.
    one = summary([_slice("no_tumor")] * 5 + [_slice("glioma")])
    assert one["label"] == "no_tumor" and one["tumour_slices"] == "6"
    two = summary([_slice("no_tumor"), _slice("glioma"), _slice("glioma"), _slice("meningioma"),
                   _slice("no_tumor")])
    assert two["label"] == "glioma" and two["tumour_slices"] == "2–4"
    assert two["mean_probabilities"]["glioma"] == pytest.approx((0.7 + 0.7 + 0.1) / 3)
    # Slices that do not look like brain MRI do not vote, and are listed as not assessed.
    ood = summary([_slice("pituitary", ood=True)] * 3 + [_slice("no_tumor")])
    assert ood["label"] == "no_tumor" and ood["not_assessed"] == "1–3" and ood["n_assessed"] == 1
    assert summary([_slice("glioma")])["label"] == "glioma"  # a one-slice file: its only slice decides
    assert summary([_slice("glioma", ood=True)])["label"] is None
    # The header plane beside the model's, with a warning when most slices disagree.
    coronal = summary([_slice("no_tumor", plane="coronal")] * 3)
    assert coronal["model_plane"] == "coronal" and coronal["plane_agreement"] == 0
    assert "header says these are axial" in coronal["warnings"][0]
    # "No tumour" on a slice where the segmenter outlines a region: listed, and warned about.
    mixed = summary([_slice("no_tumor", area=0), _slice("no_tumor", area=80), _slice("no_tumor", area=5),
                     _slice("glioma", area=300), _slice("no_tumor", area=40, ood=True)])
    assert mixed["disagreeing_slices"] == "2–3" and "slices 2–3 the classifier sees no tumour" in mixed["warnings"][0]
    assert "disagreeing_slices" not in two


def test_volume_chunks_in_flight_answer_exactly_as_one_chunk_at_a_time(real_data_dir, tmp_path, monkeypatch):
    """analyze_volume keeps two chunks in flight (host work beside the model): same answers, same order, and
    progress that only counts up, as with one chunk at a time."""
    from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR
    from braintumor_flax.serve import volume_analysis
    from braintumor_flax.serve.service import BrainTumorService

    slices = brisc_slices(real_data_dir, "ax", 11)
    volume = read_volume(write_nifti(tmp_path / "scan.nii.gz", [g for _, g in slices], "axial"))
    service = BrainTumorService.from_pretrained(DEFAULT_CHECKPOINT_DIR, warm_up=False, batch_size=4)
    runs = {}
    for chunks in (1, 2):
        monkeypatch.setattr(volume_analysis, "IN_FLIGHT_CHUNKS", chunks)
        progress: list[tuple[int, int]] = []
        analysis = volume_analysis.analyze_volume(service, volume, progress=lambda d, n, p=progress: p.append((d, n)))
        assert progress == [(4, 11), (8, 11), (11, 11)]
        assert len(analysis.images) == 11 and all(r.overlay is not None for r in analysis.slices if not r.is_ood)
        runs[chunks] = analysis
    one, two = runs[1], runs[2]
    assert [r.name for r in two.slices] == [r.name for r in one.slices]
    assert [r.name for r in two.slices] == [f"volume [axial slice {i}/11]" for i in range(1, 12)]
    for a, b in zip(one.slices, two.slices, strict=True):
        assert a.tumor_probs == pytest.approx(b.tumor_probs, abs=1e-6)
        assert a.plane_probs == pytest.approx(b.plane_probs, abs=1e-6) and a.mask_rle == b.mask_rle
    assert two.summary() == one.summary()
