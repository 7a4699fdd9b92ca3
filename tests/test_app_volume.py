"""DICOM / NIfTI through the real app (`python app.py`, real checkpoint) and the real gradio_client:
/predict with a single-slice DICOM, /predict_volume and the volume tab's event, bad medical input, and
the privacy check: a DICOM full of identifying elements, every output and the server log searched."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from test_app import EXAMPLES, _check_answer, _labels_from_name, client, server  # noqa: F401 - fixtures

from braintumor_flax.data.masks import rle_decode
from braintumor_flax.data.medical.writers import (
    identifying_elements,
    searchable,
    write_dicom_multiframe,
    write_dicom_series,
    write_nifti,
)
from braintumor_flax.labels import PLANES, TUMOR_CLASSES

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

pytestmark = pytest.mark.slow


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Medical files written from the examples: one single-slice DICOM per example, a NIfTI volume and a
    multi-frame DICOM of the same-plane examples, a DICOM full of identifying elements."""
    tmp = tmp_path_factory.mktemp("medical")
    out: dict[str, Path] = {}
    for example in EXAMPLES:
        _, plane = _labels_from_name(example)
        out[example.name] = write_dicom_series(tmp / example.stem, [_grey(example)], plane,
                                               names=[example.stem])[0]  # no .dcm suffix
    coronal = [_grey(e) for e in EXAMPLES if "_co_" in e.name and _grey(e).shape == (256, 256)]
    out["volume.nii.gz"] = write_nifti(tmp / "volume.nii.gz", coronal * 3, "coronal")
    out["multiframe"] = write_dicom_multiframe(tmp / "multiframe", coronal * 2, "coronal")
    axial = [_grey(e) for e in EXAMPLES if "_ax_" in e.name]
    axial = [g for g in axial if g.shape == axial[0].shape]  # one series: equal image sizes
    phi = identifying_elements()
    series = write_dicom_series(tmp / "phi", axial * 2, "axial", extra=phi)
    out["phi_slice"] = series[0]
    with zipfile.ZipFile(tmp / "phi_series.zip", "w") as zf:
        for f in series:
            zf.write(f, f.name)
    out["phi_series.zip"] = tmp / "phi_series.zip"
    return out


def test_predict_reads_a_single_slice_dicom_by_content_with_its_header_plane(client, files):  # noqa: F811
    for example in EXAMPLES:
        tumour, plane = _labels_from_name(example)
        r = client.predict(handle_file(str(files[example.name])), api_name="/predict")
        _check_answer(r)
        assert r["header_plane"] == plane
        # Same pixels as the picture (sagittal mirrored to anterior-left): the same clear answer.
        assert (r["tumor"]["label"], r["plane"]["label"]) == (tumour, plane), r
        assert r["plane_warning"] is None


def test_predict_volume_nifti_per_slice_json_and_summary(client, files):  # noqa: F811
    r = client.predict(handle_file(str(files["volume.nii.gz"])), "as acquired", 0, api_name="/predict_volume")
    assert r["file"] == "volume.nii.gz" and r["plane"] == "coronal"
    assert r["volume"]["format"] == "NIfTI-1 (gzip)" and r["volume"]["acquired_plane"] == "coronal"
    n = r["volume"]["n_slices"]
    assert len(r["slices"]) == n == r["summary"]["n_slices"] and n >= 3
    for i, s in enumerate(r["slices"]):
        assert s["slice"] == i + 1 and s["header_plane"] == "coronal"
        assert set(s["tumor"]["probabilities"]) == set(TUMOR_CLASSES)
    summary = r["summary"]
    assert summary["header_plane"] == "coronal" and summary["model_plane"] in PLANES
    assert summary["label"] in TUMOR_CLASSES and "mean probability" in summary["aggregation"]
    # Cut along another axis: the other plane's slice count, and that plane as header plane.
    r2 = client.predict(handle_file(str(files["volume.nii.gz"])), "axial", 0, api_name="/predict_volume")
    assert r2["plane"] == "axial" and len(r2["slices"]) == r2["volume"]["shape_ras"][2] == 256
    assert all(s["header_plane"] == "axial" for s in r2["slices"])


def test_multiframe_dicom_is_a_volume_not_a_slice(client, files):  # noqa: F811
    r = client.predict(handle_file(str(files["multiframe"])), api_name="/predict_volume")  # defaults apply
    assert r["volume"]["format"] == "DICOM multi-frame" and r["plane"] == "coronal"
    assert len(r["slices"]) == r["volume"]["slices_in_file"]
    with pytest.raises(Exception, match=r"holds \d+ frames \(a volume\); send it to /predict_volume"):
        client.predict(handle_file(str(files["multiframe"])), api_name="/predict")


def test_volume_view_event_gives_summary_plot_slider_and_slice(client, files):  # noqa: F811
    summary, plot, slider, image, label, line, *_ = client.predict(
        handle_file(str(files["volume.nii.gz"])), "as acquired", 0, api_name="/volume_view")
    assert "**Header plane:** coronal" in summary and "How it was aggregated" in summary
    assert plot is not None
    assert Path(image).is_file() and np.asarray(Image.open(image)).ndim == 3
    assert line.startswith("Slice ")


def test_bad_medical_input_gets_clear_messages_and_the_server_keeps_serving(server, client, tmp_path):  # noqa: F811
    garbage = tmp_path / "scan.dcm"
    garbage.write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 3)
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        for stem, example in (("a", EXAMPLES[0]), ("b", EXAMPLES[1])):
            _, plane = _labels_from_name(example)
            f = write_dicom_series(tmp_path / stem, [_grey(example)], plane)[0]
            zf.write(f, f"{stem}/{f.name}")
    cases = [
        (Path(get_testdata_file("test-SR.dcm")), r"holds no image \(it is .*SR"),
        (Path(get_testdata_file("MR_truncated.dcm")), r"corrupt or truncated"),
        (garbage, r"not a readable DICOM file"),
        (two, r"holds 2 image series"),
        (EXAMPLES[0], r"not a DICOM file, a .zip of a DICOM series or a NIfTI"),
    ]
    for path, pattern in cases:
        with pytest.raises(Exception, match=pattern) as info:
            client.predict(handle_file(str(path)), api_name="/predict_volume")
        assert str(server.root) not in str(info.value) and "/tmp" not in str(info.value)
    with pytest.raises(Exception, match="unknown plane 'oblique'"):
        client.predict(handle_file(str(EXAMPLES[0])), "oblique", 0, api_name="/predict_volume")
    with pytest.raises(Exception, match=r"holds no image"):
        client.predict(handle_file(str(get_testdata_file("test-SR.dcm"))), api_name="/predict")
    assert server.process.poll() is None
    _check_answer(client.predict(handle_file(str(EXAMPLES[1])), api_name="/predict"))


def test_no_patient_data_in_any_answer_csv_or_log(server, client, files, tmp_path):  # noqa: F811
    """The issue's privacy test: identifying elements in, none of their values in any output."""
    values = searchable(identifying_elements())
    outputs: list[str] = []
    outputs.append(json.dumps(client.predict(handle_file(str(files["phi_slice"])), api_name="/predict")))
    outputs.append(json.dumps(client.predict(handle_file(str(files["phi_series.zip"])), "as acquired", 0,
                                             api_name="/predict_volume")))
    outputs.append(json.dumps(client.predict(handle_file(str(files["phi_series.zip"])), "sagittal", 0,
                                             api_name="/predict_volume")))
    view = client.predict(handle_file(str(files["phi_series.zip"])), "as acquired", 0, api_name="/volume_view")
    outputs.append(json.dumps(view, default=str))
    batch = client.predict([handle_file(str(files["phi_slice"])), handle_file(str(files["phi_series.zip"]))],
                           api_name="/predict_batch")
    outputs.append(json.dumps(batch))
    table, counts, csv_file, line = client.predict([handle_file(str(files["phi_series.zip"]))],
                                                   api_name="/batch_view")
    outputs.append(json.dumps([table, counts, line]))
    outputs.append(Path(csv_file["value"] if isinstance(csv_file, dict) else csv_file).read_text())
    # A failing request about such a file: its message, too.
    broken = tmp_path / "broken"
    broken.write_bytes(files["phi_slice"].read_bytes()[:-20000])
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(broken)), api_name="/predict_volume")
    outputs.append(str(info.value))
    outputs.append(server.log_tail(10**7))
    assert outputs[1].count('"slice"') >= 2  # the volume really was analysed
    assert [r["ok"] for r in batch["results"]] == [True] * len(batch["results"])  # DICOM read in a batch too
    assert "analysed" in line and len(table["data"]) >= 2
    for text in outputs:
        for value in values:
            assert value not in text, f"patient data {value!r} in an output"


def test_readme_volume_example_runs_against_the_app(server, files, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The README's DICOM / NIfTI gradio_client code, run as written (only the URL and file names are ours)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### DICOM, NIfTI and volumes"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    assert 'api_name="/predict_volume"' in code
    (tmp_path / "scan.nii.gz").write_bytes(files["volume.nii.gz"].read_bytes())
    coronal = next(e for e in EXAMPLES if "_co_" in e.name)
    (tmp_path / "IM0001").write_bytes(files[coronal.name].read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:7860/", server.url), "README.md", "exec"), {})  # noqa: S102
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("Loaded as API")]
    n = len(lines) - 2  # the summary line, one line per slice, the /predict line
    assert n >= 3 and lines[1].startswith("1 ") and lines[n].startswith(f"{n} ")
    assert " coronal " in f" {lines[0]} "  # header plane of the volume
    assert lines[-1].split()[:2] == ["coronal", "coronal"] and lines[-1].endswith("None")


def test_a_header_that_disagrees_with_the_model_is_a_warning(client, tmp_path):  # noqa: F811
    """A sagittal slice whose DICOM header claims axial: the answer keeps both and warns."""
    sagittal = next(e for e in EXAMPLES if "_sa_" in e.name)
    lying = write_dicom_series(tmp_path / "lie", [_grey(sagittal)], "axial")[0]
    r = client.predict(handle_file(str(lying)), api_name="/predict")
    assert r["header_plane"] == "axial" and r["plane"]["label"] == "sagittal"
    assert r["plane_warning"] == "the file's header says axial, the model sees sagittal"
    *_, summary = client.predict(handle_file(str(lying)), api_name="/analyze")
    assert "⚠️ The file's header says axial." in summary
    rv = client.predict(handle_file(str(lying)), api_name="/predict_volume")
    assert rv["summary"]["header_plane"] == "axial" and rv["summary"]["model_plane"] == "sagittal"
    assert any("header says these are axial" in w for w in rv["summary"]["warnings"])


def test_dicom_tumour_area_in_mm2_from_its_pixel_spacing(client, tmp_path):  # noqa: F811
    example = next(e for e in EXAMPLES if "_me_" in e.name)
    grey = _grey(example)
    path = write_dicom_series(tmp_path / "half_mm", [grey], _labels_from_name(example)[1], pixel_spacing=0.5)[0]
    seg = client.predict(handle_file(str(path)), api_name="/predict")["segmentation"]
    mask = rle_decode(seg["mask_rle"])
    assert mask.shape == grey.shape and int(mask.sum()) == seg["area_px"] > 0
    assert seg["area_mm2"] == pytest.approx(0.25 * seg["area_px"], abs=1e-3)  # 0.5 mm x 0.5 mm pixels


def test_volume_tumour_volume_is_the_sum_of_slice_areas_times_spacing(client, files):  # noqa: F811
    r = client.predict(handle_file(str(files["volume.nii.gz"])), "as acquired", 0, api_name="/predict_volume")
    summary = r["summary"]
    thickness = r["volume"]["slice_thickness_mm"]
    areas = [s["segmentation"]["area_mm2"] for s in r["slices"] if s["ok"] and not s["ood"]]
    assert areas and summary["tumour_volume_ml"] == pytest.approx(sum(areas) * thickness / 1000, abs=2e-3)
    assert str(thickness) in summary["tumour_volume_method"]
