"""The real app, started as `python app.py` on a free localhost port, called through the real gradio_client
(and raw HTTP where a client would refuse to send something), with real images; then a headless Chromium.

Runs against the trained checkpoint in ./checkpoints (or $BRAINTUMOR_FLAX_MODEL when set to a folder).
"""

from __future__ import annotations

import ast
import io
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpx
import numpy as np
import pytest
from PIL import Image

from braintumor_flax.data.masks import read_mask, rle_decode
from braintumor_flax.labels import PLANES, TUMOR_CLASSES, normalize_plane, normalize_tumor
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, PROJECT_ROOT

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

EXAMPLES = sorted((PROJECT_ROOT / "examples").glob("brisc2025_*.jpg"))
STARTUP_TIMEOUT_S = 300


def _labels_from_name(path: Path) -> tuple[str, str]:
    """brisc2025_test_00001_gl_ax_t1.jpg → ("glioma", "axial")."""
    parts = path.stem.split("_")
    return normalize_tumor(parts[3]), normalize_plane(parts[4])


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen
    gradio_dir: Path  # GRADIO_TEMP_DIR: where Gradio stores uploads and outputs
    tmp_dir: Path  # TMPDIR of the server process
    root: Path  # a scratch folder holding both
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_folder() -> Path:
    env = os.environ.get("BRAINTUMOR_FLAX_MODEL")
    return Path(env) if env and Path(env).is_dir() else DEFAULT_CHECKPOINT_DIR


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[AppServer]:
    model = _model_folder()
    if not (model / "config.json").is_file():
        pytest.skip(f"no trained checkpoint at {model}: train.py writes checkpoints/ (see README)")
    root = tmp_path_factory.mktemp("app")
    (root / "gradio").mkdir()
    (root / "tmp").mkdir()
    port = _free_port()
    env = {**os.environ, "BRAINTUMOR_FLAX_MODEL": str(model), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_TEMP_DIR": str(root / "gradio"),
           "TMPDIR": str(root / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=PROJECT_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    srv = AppServer(f"http://127.0.0.1:{port}/", process, root / "gradio", root / "tmp", root, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app exited with {process.returncode} during start-up:\n{srv.log_tail()}")
            try:
                if httpx.get(srv.url + "config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app not serving after {STARTUP_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server) -> Client:
    # As the README recommends: one TLS context, instead of one built per HTTP request.
    tls = ssl.create_default_context(cafile=certifi.where())
    return Client(server.url, verbose=False, download_files=str(server.root / "client_downloads"), ssl_verify=tls)


# --- inputs ------------------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")  # uint16 → a 16-bit greyscale PNG
    return buf.getvalue()


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _multi_frame(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, regex the error message must match)."""
    real = EXAMPLES[0].read_bytes()
    cases = {
        "text.txt": (b"this is not an image\n" * 10, r"not a recognised image format"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)),
                        r"(?i)not a recognised image|corrupt|cannot read"),
        "truncated.jpg": (real[: len(real) // 3], r"(?i)corrupt or truncated"),
        "empty.png": (b"", r"empty file"),
        "huge_file.png": (b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024), r"limit is 20 MB"),
        "bomb.png": (_png_with_declared_size(40_000, 40_000), r"(?i)too large"),
        "frames.gif": (_multi_frame("GIF"), r"has 3 frames"),
        "pages.tiff": (_multi_frame("TIFF"), r"has 3 frames"),
    }
    out = {}
    for name, (data, pattern) in cases.items():
        path = tmp / name
        path.write_bytes(data)
        out[name] = (path, pattern)
    return out


def _sixteen_bit_and_cmyk(tmp: Path) -> list[Path]:
    rgb = np.asarray(Image.open(EXAMPLES[0]).convert("L"))
    png16 = tmp / "slice_16bit.png"
    png16.write_bytes(_png_bytes(rgb.astype(np.uint16) * 257))
    cmyk = tmp / "slice_cmyk.jpg"
    Image.open(EXAMPLES[0]).convert("CMYK").save(cmyk, "JPEG")
    return [png16, cmyk]


def _check_answer(r: dict, *, expect_ok: bool = True) -> None:
    assert r["ok"] is expect_ok
    assert r["model_version"].startswith("braintumor-flax")
    assert set(r["plane"]["probabilities"]) == set(PLANES)
    assert set(r["tumor"]["probabilities"]) == set(TUMOR_CLASSES)
    assert abs(sum(r["plane"]["probabilities"].values()) - 1) < 1e-3
    assert abs(sum(r["tumor"]["probabilities"].values()) - 1) < 1e-3
    assert isinstance(r["ood"], bool)
    if not r["ood"]:
        assert r["plane"]["label"] in PLANES and r["tumor"]["label"] in TUMOR_CLASSES


# --- API -----------------------------------------------------------------------------------------


def test_named_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/predict", "/predict_batch", "/analyze"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_predict_classifies_clear_brisc_test_slices(client, example):
    r = client.predict(handle_file(str(example)), api_name="/predict")
    _check_answer(r)
    tumour, plane = _labels_from_name(example)
    assert r["ood"] is False, r["ood_details"]
    assert (r["tumor"]["label"], r["plane"]["label"]) == (tumour, plane), r
    assert r["file"] == example.name


def test_predict_outlines_tumours_where_the_expert_masks_are(client):
    """The served segmenter against BRISC's expert masks of the example slices (test images, never trained on)."""
    masks_dir = PROJECT_ROOT.parent / "shared" / "data" / "brisc2025" / "segmentation_task" / "test" / "masks"
    if not masks_dir.is_dir():
        pytest.skip("shared BRISC masks not present")
    dice = []
    for example in EXAMPLES:
        r = client.predict(handle_file(str(example)), api_name="/predict")
        seg = r["segmentation"]
        predicted = rle_decode(seg["mask_rle"])
        assert predicted.shape == Image.open(example).size[::-1] and int(predicted.sum()) == seg["area_px"]
        assert seg["area_mm2"] is None  # a picture states no pixel spacing
        truth_file = masks_dir / f"{example.stem}.png"
        if truth_file.is_file():
            truth = read_mask(truth_file)
            dice.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
        else:  # the no-tumour example: at most a speck
            assert seg["area_px"] < 0.01 * predicted.size, seg["area_px"]
    assert len(dice) == 5 and np.mean(dice) > 0.6, dice


def test_analyze_returns_labels_gradcam_and_summary(client):
    plane, tumour, cam, summary = client.predict(handle_file(str(EXAMPLES[0])), api_name="/analyze")
    assert {c["label"] for c in plane["confidences"]} == {"Axial", "Coronal", "Sagittal"}
    assert len(tumour["confidences"]) == 4
    assert abs(sum(c["confidence"] for c in tumour["confidences"]) - 1) < 1e-3
    image = np.asarray(Image.open(cam))
    assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) > 64
    assert "slice" in summary and tumour["label"].lower() in summary.lower()


def test_sixteen_bit_and_cmyk_are_read_not_refused(client, tmp_path):
    for path in _sixteen_bit_and_cmyk(tmp_path):
        r = client.predict(handle_file(str(path)), api_name="/predict")
        _check_answer(r)


def test_every_bad_input_is_a_clear_error_and_the_server_keeps_serving(server, client, tmp_path):
    for name, (path, pattern) in bad_inputs(tmp_path).items():
        with pytest.raises(Exception, match=pattern) as info:
            client.predict(handle_file(str(path)), api_name="/predict")
        assert str(server.root) not in str(info.value), f"{name}: server paths leaked into the message"
    assert server.process.poll() is None
    _check_answer(client.predict(handle_file(str(EXAMPLES[1])), api_name="/predict"))


def test_batch_answers_good_files_and_reports_bad_ones_on_their_rows(client, tmp_path):
    cases = bad_inputs(tmp_path)
    archive = tmp_path / "slices.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES[2], "folder/../../" + EXAMPLES[2].name)  # a zip-slip name is only a label
        zf.writestr("notes.txt", b"not an image")
    files = [EXAMPLES[0], cases["truncated.jpg"][0], archive, cases["frames.gif"][0], EXAMPLES[1]]
    r = client.predict([handle_file(str(f)) for f in files], api_name="/predict_batch")
    rows = r["results"]
    assert [x["ok"] for x in rows] == [True, False, True, False, False, True]
    assert rows[1]["file"] == "truncated.jpg" and "truncated" in rows[1]["error"]
    assert rows[2]["file"].startswith("slices.zip/") and rows[4]["file"] == "frames.gif"
    for row in (rows[0], rows[2], rows[5]):
        _check_answer(row)
    assert r["counts"]["other"] == {"analysed": 3, "not_mri": 0, "errors": 3, "total": 6}
    assert sum(r["counts"]["tumor"].values()) == 3


def test_batch_view_table_counts_and_csv(client):
    table, counts, csv_file, line = client.predict([handle_file(str(f)) for f in EXAMPLES[:2]],
                                                   api_name="/batch_view")
    assert len(table["data"]) == 2 and "2 analysed" in line
    assert sum(row[1] for row in counts["data"][:4]) == 2
    text = Path(csv_file["value"] if isinstance(csv_file, dict) else csv_file).read_text()
    assert text.startswith("file,status,plane") and EXAMPLES[0].name in text


def test_non_mri_images_are_flagged_not_labelled(client, tmp_path):
    from braintumor_flax.data import ood_samples

    rng = np.random.default_rng(3)
    for kind, maker in (("photo", ood_samples.photo_like), ("page", ood_samples.document),
                        ("gradient", ood_samples.colour_gradient)):
        path = tmp_path / f"{kind}.png"
        Image.fromarray(maker(rng)).save(path)
        r = client.predict(handle_file(str(path)), api_name="/predict")
        assert r["ood"] is True and r["tumor"]["label"] is None, (kind, r["ood_details"])
        assert r["ood_details"]["reasons"] and "does not look like a brain MRI" in r["summary"]


def test_concurrent_clients_all_answered_correctly(server):
    def one(i: int) -> tuple[str, str]:
        c = Client(server.url, verbose=False)
        example = EXAMPLES[i % len(EXAMPLES)]
        r = c.predict(handle_file(str(example)), api_name="/predict")
        return r["tumor"]["label"], _labels_from_name(example)[0]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(got == want for got, want in answers), answers


def test_uploads_never_land_on_client_chosen_paths(server, client):
    probe = f"escape_probe_{os.getpid()}.jpg"
    payload = EXAMPLES[0].read_bytes()
    resp = httpx.post(server.url + "gradio_api/upload", files={"files": (f"../../../../{probe}", payload,
                                                                         "image/jpeg")}, timeout=30)
    assert resp.status_code == 200, resp.text
    (stored,) = resp.json()
    assert Path(stored).resolve().is_relative_to(server.gradio_dir.resolve())
    assert Path(stored).name == probe  # the directory part of the client's name was dropped
    for where in (server.root, PROJECT_ROOT, Path(tempfile.gettempdir()), Path("/")):
        assert not (where / probe).exists()
    r = client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
    assert r["file"] == EXAMPLES[0].name


def test_server_refuses_files_it_did_not_receive(server):
    """A raw call naming a server file (not an upload) is refused, and the file's content never comes back."""
    secret = server.root / "secret.png"
    shutil.copy(EXAMPLES[0], secret)
    start = httpx.post(server.url + "gradio_api/call/predict", json={
        "data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]}, timeout=30)
    assert start.status_code == 200, start.text
    stream = httpx.get(server.url + f"gradio_api/call/predict/{start.json()['event_id']}", timeout=60).text
    assert "event: error" in stream and "probabilities" not in stream
    assert server.process.poll() is None


def test_upload_over_the_size_limit_is_refused(server, tmp_path):
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(65 * 1024 * 1024)
    with big.open("rb") as f:
        resp = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=60)
    assert resp.status_code == 413 and "maximum allowed size" in resp.text
    assert server.process.poll() is None


# --- headless browser ----------------------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    browser_bin, driver_bin = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_bin
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


@pytest.mark.browser
def test_browser_upload_shows_answer_gradcam_and_notice(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url)
    file_input = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#slice-input input[type=file]"))
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed() and "not a diagnosis" in notice.text
    example = EXAMPLES[1]
    file_input.send_keys(str(example))
    _wait(browser, lambda d: "slice" in d.find_element(By.ID, "summary").text)
    tumour, plane = _labels_from_name(example)
    summary = browser.find_element(By.ID, "summary").text
    tumour_text = browser.find_element(By.ID, "tumour-label").text
    assert plane in summary.lower()
    assert {"glioma": "Glioma", "meningioma": "Meningioma", "no_tumor": "No tumour",
            "pituitary": "Pituitary tumour"}[tumour] in tumour_text.split("\n")[1]
    assert "%" in browser.find_element(By.ID, "plane-label").text
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gradcam img"))


@pytest.mark.browser
def test_browser_bad_file_shows_error_and_page_keeps_working(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.url)
    file_input = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#slice-input input[type=file]"))
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(EXAMPLES[0].read_bytes()[:2000])
    file_input.send_keys(str(bad))
    _wait(browser, lambda d: "truncated" in d.find_element(By.TAG_NAME, "body").text.lower())
    # The same page then analyses a good slice.
    browser.get(server.url)
    file_input = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#slice-input input[type=file]"))
    file_input.send_keys(str(EXAMPLES[0]))
    _wait(browser, lambda d: "slice" in d.find_element(By.ID, "summary").text)


def test_readme_api_example_runs_against_the_app(server, tmp_path, monkeypatch, capsys):
    """The README's gradio_client code, run as written (only the URL and the file names are ours)."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index("### API"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    assert 'Client("http://127.0.0.1:7860/"' in code and 'api_name="/predict_batch"' in code
    glioma, meningioma = EXAMPLES[0], next(e for e in EXAMPLES if "_me_" in e.name)
    shutil.copy(glioma, tmp_path / "slice.jpg")
    shutil.copy(meningioma, tmp_path / "a.jpg")
    with zipfile.ZipFile(tmp_path / "scans.zip", "w") as archive:
        archive.write(glioma, "one.jpg")
        archive.writestr("broken.jpg", b"not an image")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:7860/", server.url), "README.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith("Loaded as API")]
    plane, tumour = _labels_from_name(glioma)[1], _labels_from_name(glioma)[0]
    assert lines[0].startswith(f"{plane} {tumour} {{") and lines[0].endswith("False"), out  # False: not OOD
    # Counts cover the answered images: a.jpg and one.jpg, not the unreadable member.
    assert sum(ast.literal_eval(lines[1]).values()) == 2, out
    rows = dict(line.split(" ", 1) for line in lines[2:])
    assert rows["a.jpg"] == _labels_from_name(meningioma)[0], out
    assert any(name.endswith("one.jpg") and label == tumour for name, label in rows.items()), out
    assert any(name.endswith("broken.jpg") and "image" in label for name, label in rows.items()), out
