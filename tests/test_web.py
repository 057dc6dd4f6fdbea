"""The local page: endpoints over a real server on 127.0.0.1, path safety, upload limits, and a real browser."""
from __future__ import annotations

import contextlib
import http.client
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
from utils.errors import UserError
from utils.web import app as web
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red.png": (210, 20, 20), "green.png": (20, 190, 30), "blue.png": (20, 30, 210), "sub/yellow.png": (230, 220, 30)}


@contextlib.contextmanager
def _serving(app):
    """`app` served by uvicorn on a free 127.0.0.1 port in a thread, as predict.py serves it; yields the URL."""
    import uvicorn

    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(100):
        if instance.started:
            break
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
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
    with _serving(web.create_app(model, index, folder, "a photo of a {c}.")) as url:
        yield {"url": url, "model": model, "index": index, "folder": folder, "tmp": tmp}


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


# --- The page as a service on the user's machine (issue 27) ---

def _request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None
             ) -> tuple[int, "http.client.HTTPMessage", bytes]:
    """(status, headers, body) of one request with exactly these headers (Host included, when given)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                              skip_host="Host" in (headers or {}))
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


class Gate:
    """Holds model.class_embeddings until released: a classify request that stays heavy as long as a test needs."""

    def __init__(self, model, monkeypatch):
        self.entered, self.release, real = threading.Event(), threading.Event(), model.class_embeddings

        def held(*args, **kwargs):
            self.entered.set()
            assert self.release.wait(60), "the test never released the held request"
            return real(*args, **kwargs)

        monkeypatch.setattr(model, "class_embeddings", held)


def _classify_in_thread(url: str, folder: Path, texts: str = "red\nblue") -> dict:
    """Starts one classify request in a thread; the dict gets its "answer" (status, body) when it is done."""
    done: dict = {}

    def go():
        done["answer"] = _post(f"{url}/api/classify", {"texts": texts}, {"image": ("red.png", (folder / "red.png").read_bytes())})

    done["thread"] = threading.Thread(target=go, daemon=True)
    done["thread"].start()
    return done


def test_only_pictures_are_served_never_dotfiles_or_other_files(server, capfd):
    url, folder = server["url"], server["folder"]
    (folder / ".env").write_text("API_KEY=do-not-serve")
    (folder / "secret.txt").write_text("do-not-serve")
    (folder / ".git").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / ".git" / "x.png")
    Image.new("RGB", (8, 8)).save(folder / ".hidden.png")
    for attempt in (".env", "secret.txt", ".git/x.png", ".hidden.png", "%00", "red.png%00", "sub/%00.png"):
        status, _, body = _request(f"{url}/images/{attempt}")
        assert status == 404 and b"do-not-serve" not in body, attempt
        assert json.loads(body) == {"error": "no such image in the indexed folder"}, attempt
    assert _request(f"{url}/images/red.png")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_only_requests_for_the_loopback_name_are_answered(server):
    """DNS rebinding: a page on attacker.example that resolves to 127.0.0.1 sends Host: attacker.example."""
    url = server["url"]
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.attacker.example:{port}", ""):
        for path in ("/", "/images/red.png", "/api/search?q=red"):
            status, _, body = _request(url + path, headers={"Host": host})
            assert status == 400 and "answers requests for 127.0.0.1 only" in json.loads(body)["error"], (host, path)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
        assert _request(url + "/images/red.png", headers={"Host": host})[0] == 200, host


def test_every_error_is_one_json_shape_and_unknown_kinds_are_refused(server, capfd):
    url, folder = server["url"], server["folder"]
    red = ("red.png", (folder / "red.png").read_bytes())
    answers = [_request(f"{url}/no/such/page"), _request(f"{url}/api/search", method="POST", body=b""),
               _request(f"{url}/api/search"), _request(f"{url}/images/%00")]
    for status, _, body in answers:
        assert 400 <= status < 500 and set(json.loads(body)) == {"error"}, (status, body)
    status, body = _post(f"{url}/api/classify", {"texts": "red\nblue", "kind": "colours"}, {"image": red})
    assert status == 400 and body == {"error": "kind is one of labels, captions, got 'colours'"}
    assert "Traceback" not in capfd.readouterr().err


def test_labels_per_request_are_capped_with_the_cap_in_the_message(server):
    red = ("red.png", (server["folder"] / "red.png").read_bytes())
    many = "\n".join(f"label {i}" for i in range(web.MAX_LABELS + 1))
    status, body = _post(f"{server['url']}/api/classify", {"texts": many}, {"image": red})
    assert status == 400 and f"{web.MAX_LABELS + 1} labels; the limit is {web.MAX_LABELS} per request" in body["error"]
    status, body = _post(f"{server['url']}/api/classify", {"texts": "\n".join(many.splitlines()[:web.MAX_LABELS])},
                         {"image": red})
    assert status == 200 and len(body["probs"]) == web.MAX_LABELS


def _send_until_answered(url: str, head: bytes, chunks, limit_s: float = 30) -> tuple[bytes, int]:
    """Sends `head`, then `chunks` one by one until the server answers; (the answer, body bytes sent by then)."""
    import select
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=limit_s) as s:
        s.sendall(head)
        deadline = time.monotonic() + limit_s
        for chunk in chunks:
            if select.select([s], [], [], 0)[0] or time.monotonic() > deadline:
                break
            try:
                s.sendall(chunk)
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
        s.settimeout(limit_s)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            got = s.recv(65536)
            if not got:
                break
            answer += got
    return answer, sent


def test_an_oversized_upload_is_refused_before_it_is_read(server):
    """Today's server spools 150 MB to disk before the 413; refused from Content-Length, or while it streams."""
    url, mb = server["url"], 2**20
    port = url.rsplit(":", 1)[1]
    head = (f"POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            "boundary=x\r\n").encode()
    part = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    # Declared 150 MB, 64 KB sent: the answer comes without waiting for the rest.
    answer, sent = _send_until_answered(url, head + f"Content-Length: {150 * mb}\r\n\r\n".encode(),
                                        [part + bytes(65536)], limit_s=20)
    assert answer.startswith(b"HTTP/1.1 413") and b'"error":"the upload is larger than 10 MB' in answer, answer[:300]
    # No length given (chunked): refused once past the limit, long before 150 MB are sent.
    first = b"%x\r\n%s\r\n" % (len(part), part)
    chunk = b"%x\r\n%s\r\n" % (mb, bytes(mb))
    answer, sent = _send_until_answered(url, head + b"Transfer-Encoding: chunked\r\n\r\n", [first] + [chunk] * 150)
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than 10 MB" in answer, answer[:300]
    assert sent < 40 * mb


def test_cheap_endpoints_answer_while_a_heavy_request_runs_and_a_burst_gets_503(server, monkeypatch):
    folder, model = server["folder"], server["model"]
    gate = Gate(model, monkeypatch)
    try:
        with _serving(web.create_app(model, server["index"], folder, "a photo of a {c}.", queue_size=2)) as small:
            heavy = _classify_in_thread(small, folder)
            assert gate.entered.wait(30)
            from concurrent.futures import ThreadPoolExecutor

            def cheap(path: str) -> int:
                return _request(small + path)[0]

            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(cheap, ["/", "/images/red.png", "/images/sub/yellow.png", "/nope"] * 10))
            assert statuses == [200, 200, 200, 404] * 10
            assert heavy["thread"].is_alive(), "answered while the heavy request is still running"
            waiting = _classify_in_thread(small, folder)  # the queue holds two: this one waits its turn
            time.sleep(0.5)
            status, headers, body = _request(small + "/api/search?q=red")
            assert status == 503 and int(headers["Retry-After"]) >= 1
            assert "the model is busy with 2 requests (at most 2 wait); try again in" in json.loads(body)["error"]
            gate.release.set()
            for request in (heavy, waiting):
                request["thread"].join(60)
                assert request["answer"][0] == 200 and len(request["answer"][1]["probs"]) == 2
            assert _request(small + "/api/search?q=red")[0] == 200
    finally:
        gate.release.set()


def test_a_port_in_use_is_one_line_before_any_url(server, capsys):
    port = int(server["url"].rsplit(":", 1)[1])
    config = {"port": port, "dir_origin_path": str(server["tmp"] / "none"), "index_dir": str(server["tmp"] / "none"),
              "templates": "", "batch_size": 4, "rebuild_index": False}
    with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use .*choose another with --port N"):
        web.serve(server["model"], config)
    assert "http://" not in capsys.readouterr().out


def test_a_query_longer_than_the_text_context_says_it_was_cut(server):
    url, room = server["url"], server["model"].tokenizer.context_length
    status, raw = _get(f"{url}/api/search?q=" + "word%20" * (room - 2))  # SOT + words + EOT fill it exactly
    assert status == 200 and json.loads(raw)["note"] == ""
    status, raw = _get(f"{url}/api/search?q=" + "word%20" * (room - 1))
    assert json.loads(raw)["note"] == f"the query is longer than the text tower's {room} tokens: only its start was used"
    red = ("red.png", (server["folder"] / "red.png").read_bytes())
    status, body = _post(f"{url}/api/classify", {"texts": "red\n" + "word " * room, "kind": "captions"}, {"image": red})
    assert body["note"] == f"1 of the 2 captions are longer than the text tower's {room} tokens: only their start was used"


@pytest.mark.slow
def test_a_real_browser_keeps_the_page_answering_while_a_heavy_request_runs(server, monkeypatch):
    """Concurrent requests as the page makes them: a classify held in the model, then pictures and the page
    fetched at once from the same tab, then a search whose query is too long."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    gate = Gate(server["model"], monkeypatch)
    try:
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "classify-file").send_keys(str(server["folder"] / "blue.png"))
        browser.find_element(By.ID, "classify-go").click()
        assert gate.entered.wait(30)
        answers = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const paths = [];
            for (let i = 0; i < 12; i++) { paths.push("/", "/images/red.png", "/images/sub/yellow.png"); }
            Promise.all(paths.map((p) => fetch(p).then((r) => r.status))).then(done, (e) => done(String(e)));
        """)
        assert answers == [200] * 36
        assert browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row") == []  # the held one is still running
        gate.release.set()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#bars .bar-row")) == 3)

        room = server["model"].tokenizer.context_length
        browser.find_element(By.ID, "tab-search").click()
        browser.find_element(By.ID, "search-text").send_keys("word " * room)
        browser.find_element(By.ID, "search-go").click()
        wait.until(lambda b: b.find_element(By.ID, "note").text)
        assert browser.find_element(By.ID, "note").text.startswith("the query is longer than the text tower's")
        assert browser.find_elements(By.CSS_SELECTOR, "#thumbs figure img")
    finally:
        gate.release.set()
        browser.quit()
