"""The local page: endpoints over a real server on 127.0.0.1, path safety, upload limits, and a real browser."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip import CLIP
from nets import build_model, get_config
from utils.predict.search import SearchIndex, encode_paths
from utils.web import app as web

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red.png": (210, 20, 20), "green.png": (20, 190, 30), "blue.png": (20, 30, 210), "sub/yellow.png": (230, 220, 30)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    tmp = tmp_path_factory.mktemp("web")
    torch.manual_seed(5)
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), tmp / "tiny.pth")
    model = CLIP(model_path=str(tmp / "tiny.pth"), phi="auto", cuda=False)
    folder = tmp / "photos"
    for name, colour in COLOURS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), colour).save(folder / name)
    (tmp / "secret.txt").write_text("outside the indexed folder")
    Image.new("RGB", (8, 8)).save(tmp / "outside.png")
    (folder / "link.png").symlink_to(tmp / "outside.png")
    index = SearchIndex(tmp / "index", "test")
    index.update(folder, encode_paths(model))
    port = _free_port()
    config = uvicorn.Config(web.create_app(model, index, folder, "a photo of a {c}."), host="127.0.0.1", port=port,
                            log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(100):
        if instance.started:
            break
        time.sleep(0.1)
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "index": index, "folder": folder, "tmp": tmp}
    instance.should_exit = True
    thread.join(timeout=10)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_images_are_served_from_the_indexed_folder_only(server):
    url = server["url"]
    assert _get(f"{url}/images/red.png")[1] == (server["folder"] / "red.png").read_bytes()
    assert _get(f"{url}/images/sub/yellow.png")[0] == 200
    for attempt in ("../secret.txt", "%2e%2e/secret.txt", "sub/%2e%2e/%2e%2e/secret.txt", "%2Fetc%2Fpasswd",
                    "/etc/passwd", "link.png", "..%5Csecret.txt", "missing.png", ""):
        status, body = _get(f"{url}/images/{attempt}")
        assert status == 404 and b"outside" not in body and b"root:" not in body, attempt
    assert web.safe_file(server["folder"], "../secret.txt") is None
    assert web.safe_file(server["folder"], str(server["tmp"] / "secret.txt")) is None
    assert web.safe_file(server["folder"], "link.png") is None  # a symlink out of the folder
    assert web.safe_file(server["folder"], "sub/yellow.png") == (server["folder"] / "sub/yellow.png").resolve()


def test_search_and_classify_endpoints_match_the_library(server, monkeypatch):
    url, model, index = server["url"], server["model"], server["index"]
    status, body = _post(f"{url}/api/classify", {"texts": "red thing\nblue thing", "kind": "labels"},
                         {"image": ("red.png", (server["folder"] / "red.png").read_bytes())})
    assert status == 200 and body["names"] == ["red thing", "blue thing"]
    expected = model.classify(Image.open(server["folder"] / "red.png"),
                              model.class_embeddings(["red thing", "blue thing"], "a photo of a {c}."))[0]
    assert body["probs"] == pytest.approx(expected.tolist(), abs=1e-5)
    status, body = _post(f"{url}/api/classify", {"texts": "a", "kind": "captions"},
                         {"image": ("notes.txt", b"hello, not a picture")})
    assert status == 400 and "notes.txt is not an image" in body["error"]
    monkeypatch.setattr(web, "MAX_UPLOAD", 1000)
    status, body = _post(f"{url}/api/classify", {"texts": "a"}, {"image": ("big.png", b"x" * 2000)})
    assert status == 413 and "larger than" in body["error"]
    monkeypatch.undo()
    status, body = _post(f"{url}/api/classify", {"texts": "  \n"}, {"image": ("red.png", b"x")})
    assert status == 400 and "at least one label" in body["error"]

    status, raw = _get(f"{url}/api/search?q=a%20yellow%20square&k=3")
    results = json.loads(raw)["results"]
    import torch.nn.functional as F
    vector = F.normalize(model.detect_image_for_eval(texts=["a yellow square"])[1].float(), dim=-1)[0]
    assert [r["path"] for r in results] == [p for p, _ in index.query(vector, 3)]
    status, body = _post(f"{url}/api/search_image", {"k": "2"},
                         {"image": ("g.png", (server["folder"] / "green.png").read_bytes())})
    assert status == 200 and body["results"][0]["path"] == "green.png"
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                     "--disable-gpu"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_a_real_browser_searches_and_classifies(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "classify-file").send_keys(str(server["folder"] / "blue.png"))
        browser.find_element(By.ID, "classify-texts").clear()
        browser.find_element(By.ID, "classify-texts").send_keys("blue thing\nred thing\ngreen thing")
        browser.find_element(By.ID, "classify-go").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#bars .bar-row")) == 3)
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .bar-name")]
        assert sorted(names) == ["blue thing", "green thing", "red thing"]
        browser.save_screenshot(str(tmp_path / "classify.png"))

        browser.find_element(By.ID, "tab-search").click()
        browser.find_element(By.ID, "search-text").send_keys("a yellow square")
        browser.find_element(By.ID, "search-go").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#thumbs figure img")))
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                                 for i in b.find_elements(By.CSS_SELECTOR, "#thumbs img")))
        shown = [e.get_attribute("alt") for e in browser.find_elements(By.CSS_SELECTOR, "#thumbs img")]
        import torch.nn.functional as F
        vector = F.normalize(server["model"].detect_image_for_eval(texts=["a yellow square"])[1].float(), dim=-1)[0]
        assert shown == [p for p, _ in server["index"].query(vector, 12)]
        assert len(shown) == 4 and "link.png" not in shown  # the symlink out of the folder is not indexed
        browser.save_screenshot(str(tmp_path / "search.png"))
        assert (tmp_path / "search.png").stat().st_size > 0
    finally:
        browser.quit()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: what a huge upload looks like before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_k_and_the_pixel_count_are_checked_with_a_message(server):
    url = server["url"]
    for k in ("-5", "0"):
        status, raw = _get(f"{url}/api/search?q=red&k={k}")
        assert status == 400 and f"got {k}" in json.loads(raw)["error"], (k, raw)
    status, raw = _get(f"{url}/api/search?q=red&k=many")
    assert status == 400 and json.loads(raw)["error"].startswith("k:")
    status, body = _post(f"{url}/api/search_image", {"k": "-1"}, {"image": ("g.png", _png_header(8, 8))})
    assert status == 400 and "got -1" in body["error"]
    status, raw = _get(f"{url}/api/search?q=red&k=1000")  # above the index's size: all of it, as before
    assert status == 200 and len(json.loads(raw)["results"]) == len(server["index"].paths)
    # 156 Mpx is under PIL's refusal (179 Mpx); 400 Mpx is past it, where PIL names the pixels but not the sides.
    for (width, height), shown in (((12_500, 12_500), "12500 x 12500 = 156 Mpx"), ((20_000, 20_000), "400 Mpx")):
        status, body = _post(f"{url}/api/classify", {"texts": "a"}, {"image": ("huge.png", _png_header(width, height))})
        assert status == 413 and f"huge.png is {shown}; the limit is 50 Mpx" in body["error"], body
