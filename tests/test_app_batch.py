"""Batch input handling without a server: zip archives read in memory, bomb limits, names, CSV safety."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from braintumor_flax.data.imageio import decode_image
from braintumor_flax.serve import uploads as batch


def _jpeg(value: int = 80, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _zip(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_members_read_in_memory_and_never_extracted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(_zip({
        "scans/a.jpg": _jpeg(),
        "../../escape.jpg": _jpeg(),  # zip-slip name: a label only
        "/abs/b.jpg": _jpeg(),
        "scans/": b"",
        "__MACOSX/scans/._a.jpg": b"junk",
        ".hidden.jpg": _jpeg(),
        "inner.zip": _zip({"x.jpg": _jpeg()}),
    }))
    before = set(tmp_path.rglob("*"))
    items = batch.collect([("upload.zip", archive)])
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not (tmp_path.parent.parent / "escape.jpg").exists()
    names = [i.name for i in items]
    assert names == ["upload.zip/scans/a.jpg", "upload.zip/../../escape.jpg", "upload.zip//abs/b.jpg",
                     "upload.zip/.hidden.jpg", "upload.zip/inner.zip"]
    assert [i.error is None for i in items] == [True, True, True, False, False]
    assert "hidden file" in items[3].error and not items[3].counted  # a row, not silently dropped
    assert "inside archives" in items[4].error
    decoded = batch.decode_items(items, decode_image)
    assert [isinstance(v, np.ndarray) for _, v in decoded] == [True, True, True, False, False]


def test_zip_bomb_stopped_by_member_and_total_limits(monkeypatch):
    monkeypatch.setattr(batch, "MAX_ZIP_MEMBER_BYTES", 1 << 20)
    monkeypatch.setattr(batch, "MAX_ZIP_TOTAL_BYTES", 3 << 20)
    zeros = bytes(5 << 20)  # 5 MB of zeros compresses to ~5 KB
    items = batch.collect([("bomb.zip", _zip({"big.png": zeros}))])
    assert len(items) == 1 and "uncompressed" in items[0].error
    many = {f"m{i}.bin": bytes(900 << 10) for i in range(6)}  # 6 x 0.9 MB > 3 MB total budget
    items = batch.collect([("many.zip", _zip(many))])
    assert sum(i.error is None for i in items) == 3
    assert "remaining members skipped" in items[-1].error


def test_lying_zip_header_is_bounded(monkeypatch):
    monkeypatch.setattr(batch, "MAX_ZIP_MEMBER_BYTES", 1 << 20)
    data = bytearray(_zip({"a.png": bytes(4 << 20)}))
    # Understate the uncompressed size in both headers: reading must still stop, with an error row.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = data.find(sig)
        data[pos + offset:pos + offset + 4] = (1000).to_bytes(4, "little")
    items = batch.collect([("liar.zip", bytes(data))])
    assert len(items) == 1
    decoded = batch.decode_items(items, decode_image)
    assert isinstance(decoded[0][1], str)  # an error message, not a 4 MB image


def test_too_many_images_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(batch, "MAX_BATCH_IMAGES", 5)
    with pytest.raises(batch.BatchError, match="at most 5 images"):
        batch.collect([("a.zip", _zip({f"{i}.jpg": b"x" for i in range(6)}))])


def test_corrupt_zip_and_unreadable_upload_are_rows():
    items = batch.collect([("broken.zip", b"PK\x03\x04" + b"\x00" * 50), ("gone.jpg", Path("/nonexistent/x.jpg"))])
    assert [i.name for i in items] == ["broken.zip", "gone.jpg"]
    assert "zip" in items[0].error and "cannot read" in items[1].error


def test_display_name_and_strip_source():
    assert batch.display_name("a\x00b\nc.jpg") == "a?b?c.jpg"
    assert len(batch.display_name("x" * 500)) == 120
    assert batch._strip_source("/tmp/gradio/abc/x.jpg: empty file (0 bytes)") == "empty file (0 bytes)"
    assert batch._strip_source("<12 bytes>: not a recognised image format") == "not a recognised image format"


def _result(name, *, error=None, ood=False):
    probs_p = {"axial": 0.7, "coronal": 0.2, "sagittal": 0.1}
    probs_t = {"glioma": 0.1, "meningioma": 0.6, "no_tumor": 0.2, "pituitary": 0.1}
    ood_result = SimpleNamespace(flag=ood, score=2.0 if ood else 0.1, reasons=["colour"] if ood else [])
    return SimpleNamespace(name=name, ok=error is None, error=error, is_ood=ood, ood=ood_result,
                           plane="axial", tumor="meningioma", plane_probs=probs_p, tumor_probs=probs_t,
                           tumor_area_px=None if ood else 120)


def test_counts_and_csv_defuse_formulas(tmp_path):
    results = [_result("=HYPERLINK(\"x\").jpg"), _result("b.jpg", ood=True), _result("c.jpg", error="corrupt")]
    c = batch.counts(results)
    assert c["tumor"]["meningioma"] == 1 and c["plane"]["axial"] == 1
    assert c["other"] == {"analysed": 1, "not_mri": 1, "errors": 1, "total": 3}
    path = batch.write_csv(results, tmp_path)
    assert path.parent.parent == tmp_path and path.name == "braintumor_predictions.csv"
    rows = list(csv.reader(path.open()))
    assert rows[0] == batch.CSV_HEADERS
    assert rows[1][0].startswith("'=")  # not a live formula in a spreadsheet
    assert rows[2][1] == "not_mri" and rows[2][2] == "" and rows[3][-1] == "corrupt"
    area = batch.CSV_HEADERS.index("tumour_area_px")
    assert (rows[1][area], rows[2][area]) == ("120", "")  # no area for what does not look like a brain slice
    assert len(batch.table_rows(results)) == 3


def test_zip_with_too_many_entries_is_refused_from_its_end_record(monkeypatch):
    monkeypatch.setattr(batch, "MAX_ZIP_ENTRIES", 50)
    parsed = []
    real = zipfile.ZipFile._RealGetContents
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: (parsed.append(1), real(self))[1])
    many = _zip({f"{i}.jpg": b"x" for i in range(51)}, compression=zipfile.ZIP_STORED)
    items = batch.collect([("many.zip", many)])
    assert len(items) == 1 and "lists 51 entries; at most 50" in items[0].error
    assert parsed == []  # the directory was never parsed
    # An end record that understates the count is caught by the directory's size and by the parsed count.
    data = bytearray(many)
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = (10).to_bytes(2, "little") * 2
    items = batch.collect([("liar.zip", bytes(data))])
    assert len(items) == 1 and "more than 50 entries" in items[0].error
    monkeypatch.setattr(batch, "MAX_ZIP_DIRECTORY_BYTES", 1000)
    items = batch.collect([("liar.zip", bytes(data))])
    assert len(items) == 1 and "directory is" in items[0].error


def test_windows_and_dotted_member_names_get_rows():
    items = batch.collect([("w.zip", _zip({"..\\..\\x.jpg": _jpeg(), ".DS_Store": b"\x00\x01", "a/.b.jpg": _jpeg(),
                                           "__MACOSX/a/._x.jpg": b"junk"}))])
    assert [(i.name, i.error is None) for i in items] == [
        ("w.zip/../../x.jpg", True), ("w.zip/.DS_Store", False), ("w.zip/a/.b.jpg", False)]
    assert all("hidden file" in i.error for i in items[1:])


def test_hidden_rows_do_not_count_towards_the_image_limit(monkeypatch):
    monkeypatch.setattr(batch, "MAX_BATCH_IMAGES", 2)
    items = batch.collect([("a.zip", _zip({"1.jpg": _jpeg(), "2.jpg": _jpeg(), ".x": b"", ".y": b""}))])
    assert len(items) == 4


def test_one_bad_item_never_aborts_the_batch():
    items = [batch.BatchItem("a", data=_jpeg()), batch.BatchItem("b", data=b"boom"), batch.BatchItem("c", data=_jpeg())]

    def decode(source):
        if source == b"boom":
            raise KeyError("an unexpected decoder bug")
        return decode_image(source)

    out = batch.decode_items(items, decode)
    assert [isinstance(v, np.ndarray) for _, v in out] == [True, False, True]
    assert "unexpected internal error" in out[1][1] and "KeyError" not in out[1][1]


def test_shape_reasons_and_request_budget():
    from braintumor_flax.data import limits

    assert limits.shape_reasons(512, 512) == [] and limits.shape_reasons(256, 130) == []
    elongated = limits.shape_reasons(1, 20_000)[0]  # (also tiny: a second reason)
    assert "20000 x 1 px" in elongated and "aspect ratio of 20,000.0:1" in elongated
    assert limits.shape_reasons(300, 1000)[0].endswith("(at most 3:1 here)")
    assert any("only 40 x 40 px" in r for r in limits.shape_reasons(40, 40))
    budget = limits.RequestBudget(1000)
    with budget.admit(20, 30):
        pass
    with pytest.raises(limits.BudgetError, match="decoding budget"), budget.admit(20, 30):
        pass
    assert budget.left == 400


def test_batch_budget_refuses_images_on_their_rows(monkeypatch):
    from braintumor_flax.data import limits

    budget = limits.RequestBudget(32 * 32 * 2)
    items = [batch.BatchItem(str(i), data=_jpeg()) for i in range(3)]
    out = batch.decode_items(items, lambda s: decode_image(s, admit=budget.admit))
    assert [isinstance(v, np.ndarray) for _, v in out] == [True, True, False]
    assert "decoding budget" in out[2][1]


def test_batch_past_its_time_limit_reports_the_rest_on_their_rows():
    import time

    items = [batch.BatchItem(str(i), data=_jpeg()) for i in range(3)]
    calls = []

    def slow_decode(source):
        calls.append(1)
        return decode_image(source)

    out = batch.decode_items(items, slow_decode, deadline=time.monotonic() - 1)
    assert calls == [] and all("time limit" in v for _, v in out)
    assert all(isinstance(v, np.ndarray) for _, v in batch.decode_items(items[:1], decode_image,
                                                                       deadline=time.monotonic() + 60))
