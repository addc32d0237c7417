"""`ugatit demo`: the page's function, the served app through gradio_client, bad inputs, and a real browser
(headless Chromium from Debian packages, driven by selenium)."""

import io
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from ugatit.cli import main
from ugatit.demo import DemoError, DemoModel

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "ugatit" / "examples"


@pytest.fixture(scope="module")
def model_file(generators_64):
    return generators_64


@pytest.fixture(scope="module")
def demo_model(model_file):
    return DemoModel(model_file)


@pytest.fixture(scope="module")
def page_model(demo_model):
    """The model the served page shows: the test's, or a trained one named by UGATIT_DEMO_MODEL (for the README's
    screenshot)."""
    path = os.environ.get("UGATIT_DEMO_MODEL")
    return DemoModel(path) if path else demo_model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A good photo and each kind of bad or awkward input the page must survive."""
    folder = tmp_path_factory.mktemp("photos")
    photo = Image.open(EXAMPLES / "astronaut.jpg").convert("RGB")
    photo.save(folder / "good.png")
    (folder / "notes.txt").write_text("not an image")
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 megapixels in a few kB
    Image.new("RGB", (8660, 5780), (90, 120, 200)).save(folder / "fifty.png", compress_level=1)  # 50 megapixels
    photo.convert("L").save(folder / "gray.png")
    photo.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.rotate(90, expand=True).save(folder / "exif.jpg", exif=exif)
    return folder


def _differs(a: Image.Image, b: Image.Image) -> bool:
    return (
        np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB").resize(a.size), np.int16)).mean()
        > 1
    )


# ---------------------------------------------------------------- the page's function
def test_page_function(demo_model, photos):
    assert demo_model.directions == ["A2B", "B2A"]
    assert "64 px" in demo_model.describe() and "torch, exact" in demo_model.describe()
    good = photos / "good.png"
    result = demo_model.translate(str(good), "B2A")
    assert result.translation.size == result.seen.size == result.heatmap.size == (64, 64)
    assert _differs(result.translation, result.seen) and Image.open(result.download).size == (64, 64)
    faces = demo_model.translate(str(good), "A2B", faces=True, paste_back=True)
    assert faces.translation.size == Image.open(good).size and "1 face(s)" in faces.status
    assert faces.seen.size == (64, 64)  # the aligned crop the model saw


@pytest.mark.parametrize(
    ("name", "message"),
    [("notes.txt", "not an image"), ("truncated.jpg", "truncated"), ("bomb.png", "too large")],
)
def test_page_refuses_bad_files_with_a_reason(demo_model, photos, name, message):
    with pytest.raises(DemoError, match=message):
        demo_model.translate(str(photos / name), "A2B")


def test_page_takes_the_inputs_photos_come_as(demo_model, photos):
    for name in ("gray.png", "rgba.png", "deep.png", "exif.jpg"):
        assert demo_model.translate(str(photos / name), "A2B").translation.size == (64, 64), name
    big = demo_model.translate(str(photos / "fifty.png"), "A2B")
    assert "scaled to 4096x2734" in big.status
    upright = demo_model.translate(str(photos / "exif.jpg"), "A2B", faces=True)
    assert "1 face(s)" in upright.status  # turned upright by its EXIF tag before looking for faces
    with pytest.raises(DemoError, match="no face"):
        demo_model.translate(str(EXAMPLES / "synthetic_A.jpg"), "A2B", faces=True)
    with pytest.raises(DemoError, match="choose a photo"):
        demo_model.translate(None, "A2B")
    with pytest.raises(DemoError, match="Align faces"):
        demo_model.translate(str(photos / "good.png"), "A2B", faces=False, paste_back=True)
    with pytest.raises(DemoError, match="not 'C2D'"):
        demo_model.translate(str(photos / "good.png"), "C2D")


def test_onnx_model_offers_its_one_direction(model_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from ugatit.export import export_onnx

    onnx_file = export_onnx(model_file, tmp_path / "b2a.onnx", "B2A", heatmap=True)
    model = DemoModel(onnx_file)
    assert model.directions == ["B2A"] and "ONNX Runtime" in model.describe()
    assert model.translate(str(EXAMPLES / "synthetic_B.jpg"), "B2A").translation.size == (64, 64)


def test_demo_without_gradio_says_what_to_install(model_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["demo", str(model_file), "--port", "7999"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ugatit[demo]'" in err and err.count("\n") == 1


# ---------------------------------------------------------------- the served app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_on_a_taken_port_says_so(model_file, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", str(model_file), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def served(page_model):
    pytest.importorskip("gradio")
    from ugatit.demo import serve

    port = _free_port()
    app = serve(page_model, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_served_app_translates_and_survives_bad_requests(served, page_model, photos):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    seen, translation, heatmap, download, status = client.predict(
        handle_file(str(photos / "good.png")), "A2B", False, False, api_name="/translate"
    )
    size = (page_model.config.img_size,) * 2
    assert Image.open(download).size == size and _differs(Image.open(download), Image.open(seen).resize(size))
    assert Image.open(download).format == "PNG" and status == "translated A2B"
    shown = Image.open(translation)  # the page shows small results enlarged, pixels kept square
    assert (
        shown.size[0] >= 256
        and shown.resize(size, Image.Resampling.NEAREST).tobytes() == Image.open(download).tobytes()
    )
    for name, message in [("notes.txt", "not an image"), ("truncated.jpg", "truncated"), ("bomb.png", "too large")]:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(photos / name)), "A2B", False, False, api_name="/translate")
    for name in ("gray.png", "rgba.png", "deep.png", "exif.jpg", "fifty.png"):
        *_, out, _ = client.predict(handle_file(str(photos / name)), "B2A", False, False, api_name="/translate")
        assert Image.open(out).size == size, name
    # still serving after all of them, faces included; a photo-sized result is shown as it is downloaded
    _, translation, _, download, status = client.predict(
        handle_file(str(photos / "good.png")), "B2A", True, True, api_name="/translate"
    )
    assert status == "1 face(s) found; translated B2A"
    shown, downloaded = Image.open(translation), Image.open(download)
    assert shown.size == downloaded.size == Image.open(photos / "good.png").size
    assert shown.tobytes() == downloaded.tobytes()


# ---------------------------------------------------------------- a real browser
def _chromium():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium not found: install the Debian packages chromium and chromium-driver")
    pytest.importorskip("selenium", reason="selenium is part of ugatit[dev]")
    return chromium, driver


def test_real_browser(served, page_model, tmp_path):
    chromium, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250",
                 "--disable-gpu"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)  # never downloads a driver
    try:
        browser.get(served)
        wait = WebDriverWait(browser, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        photo = EXAMPLES / "synthetic_A.jpg"
        upload.send_keys(str(photo))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo img")))
        browser.find_element(By.ID, "translate").click()
        image = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#translation img")))
        wait.until(lambda b: "translated" in b.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value"))
        with urllib.request.urlopen(image.get_attribute("src")) as response:
            translation = Image.open(io.BytesIO(response.read()))
        assert min(translation.size) >= 256 and _differs(translation, Image.open(photo))
        assert page_model.config.describe() in browser.find_element(By.ID, "model").text
        time.sleep(0.5)  # let the images settle before the screenshot
        shot = Path(os.environ.get("UGATIT_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
        # no request left this machine: every URL the page loaded is on the demo's own host (or inline)
        hosts = set()
        for entry in browser.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                url = urlparse(message["params"]["request"]["url"])
                if url.scheme in ("http", "https", "ws", "wss"):
                    hosts.add(url.hostname)
        assert hosts == {"127.0.0.1"}, hosts
    finally:
        browser.quit()


def test_page_takes_a_data_url(demo_model, photos):
    """What an API client may send instead of a file: the image inline, as a base64 data: URL."""
    import base64

    data = base64.b64encode((photos / "good.png").read_bytes()).decode()
    result = demo_model.translate({"url": f"data:image/png;base64,{data}"}, "A2B")
    assert result.translation.size == (64, 64)
    with pytest.raises(DemoError, match="base64"):
        demo_model.translate({"url": "data:image/png;base64,@@@"}, "A2B")
