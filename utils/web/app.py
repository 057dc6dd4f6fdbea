"""The web app: JSON endpoints over a CLIP model and a search index, and the indexed folder's images.

FastAPI because the page is one static HTML/JS file talking to four small JSON endpoints: nothing is fetched from
outside (no CDN, no fonts, no telemetry, unlike Gradio's defaults), and the server is a plain ASGI app that tests
can start on 127.0.0.1.

It runs on a user's machine next to their files, so it is built as a service: it answers only requests addressed
to its loopback name (a page on another site cannot read the folder through DNS rebinding), serves only the
pictures, refuses big uploads before they are stored, and runs the model off the event loop behind a bounded
queue, so the page and its pictures keep answering while a heavy request runs.
"""
from __future__ import annotations

import asyncio
import io
import math
import re
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.nn.functional as F
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from utils.data.images import IMAGE_SUFFIXES
from utils.errors import UserError
from utils.prompts import INDEPENDENT
from utils.tokenizer import truncated

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD = 10 * 2**20
# Room for the form's other fields (labels, k) and the multipart framing around the image.
MAX_FORM = 2**20
# A few compressed bytes can hold a huge picture: 12,500 x 12,500 pixels in a 150 KB PNG took 4 s and 0.5 GB to
# decode. Checked from the header, before any pixel is decoded.
MAX_PIXELS = 50_000_000
# 400 labels with the 80 ImageNet templates are 32,000 captions to encode: seconds of model time for one click.
MAX_LABELS = 200
# Model requests waiting or running at once; one more is answered 503 with a Retry-After hint.
QUEUE_SIZE = 16
KINDS = ("labels", "captions")
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def safe_file(folder: Path, relative: str) -> Path | None:
    """`relative` inside `folder` as a real picture file, or None: no absolute paths, no `..`, no symlinks leading
    out, no hidden files or folders (`.env`, `.git/`), nothing but the image types the index reads."""
    if not relative or relative.startswith(("/", "\\")) or "\x00" in relative:
        return None
    parts = Path(relative.replace("\\", "/")).parts
    if ".." in parts or any(part.startswith(".") for part in parts) or Path(relative).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    root = folder.resolve()
    try:
        path = (root / relative).resolve()  # follows symlinks: one pointing out of the folder lands outside root
        if root not in path.parents or not path.is_file():
            return None
    except (OSError, ValueError):  # a name the file system cannot hold
        return None
    return path


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one shape of every error this app answers."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _too_many_pixels(name: str, pixels: int, size: str = "") -> HTTPException:
    return HTTPException(413, f"{name} is {size}{pixels / 1e6:.0f} Mpx; the limit is {MAX_PIXELS / 1e6:.0f} Mpx: "
                              "scale it down and upload it again")


def _too_large() -> str:
    return f"the upload is larger than {MAX_UPLOAD // 2**20} MB: scale the image down and upload it again"


async def _upload(upload: UploadFile) -> tuple[str, bytes]:
    """(the upload's name, its bytes), refused above MAX_UPLOAD."""
    data = await upload.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, _too_large())
    return upload.filename or "the upload", data


def _picture(name: str, data: bytes, model) -> Image.Image:
    """The uploaded picture decoded at the scale the model needs; runs in the model queue (decoding is work)."""
    try:
        # Reads the header only. PIL's bomb warning (above 89 Mpx) says less than the refusal below, which
        # every picture it warns about gets.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # past PIL's own limit, which names the pixels but not the sides
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_many_pixels(name, int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    except Exception:  # PIL raises many types for non-images
        raise HTTPException(400, f"{name} is not an image this page can read") from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _too_many_pixels(name, width * height, f"{width} x {height} = ")
        try:
            return model.open_image(image)  # a JPEG at the scale the model needs
        except Exception:  # a header that reads but pixels that do not
            raise HTTPException(400, f"{name} is not an image this page can read") from None


def image_vector(model, picture: Image.Image):
    """A picture's unit feature vector (CPU): what search by example compares with the index."""
    return F.normalize(model.detect_image_for_eval(images=[picture])[0].float(), dim=-1)[0].cpu()


def text_vector(model, text: str):
    """A text's unit feature vector (CPU): what search by text compares with the index."""
    return F.normalize(model.detect_image_for_eval(texts=[text])[1].float(), dim=-1)[0].cpu()


def _cut_note(model, texts: list[str], what: str) -> str:
    """A line saying which texts the text tower sees only the start of, or ""."""
    cut = [t for t in texts if truncated(model.tokenizer, t)]
    if not cut:
        return ""
    room = model.tokenizer.context_length
    if len(texts) == 1:
        return f"the {what} is longer than the text tower's {room} tokens: only its start was used"
    return f"{len(cut)} of the {len(texts)} {what}s are longer than the text tower's {room} tokens: only their start was used"


def _check_k(k: int) -> int:
    if k < 1:
        raise HTTPException(400, f"k is the number of results to return: a whole number, 1 or more, got {k}")
    return k


class ModelQueue:
    """Model work on one thread, off the event loop, at most `size` requests waiting or running.

    One thread because the model already uses every core (or the GPU) for one request; two at once would only
    share them. The count is changed on the event loop only, so it needs no lock."""

    def __init__(self, size: int):
        self.size, self.pending, self.seconds = size, 0, 1.0  # seconds: a running mean of one job's time
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="clip-model")

    def _timed(self, job, args):
        start = time.perf_counter()
        try:
            return job(*args)
        finally:
            self.seconds = 0.7 * self.seconds + 0.3 * (time.perf_counter() - start)

    async def run(self, job, *args):
        if self.pending >= self.size:
            wait = max(1, math.ceil(self.seconds * self.pending))
            raise HTTPException(503, f"the model is busy with {self.pending} requests (at most {self.size} wait); "
                                     f"try again in {wait} s", headers={"Retry-After": str(wait)})
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._timed, job, args)
        finally:
            self.pending -= 1


class Guard:
    """ASGI middleware in front of everything: the Host check and the upload limit.

    The body is read here, counted as it arrives and refused at once past the limit (or from Content-Length),
    so an oversized upload is never spooled to disk by the form parser behind it."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if name.lower() not in self.hosts:
            return await _error(400, f"this page answers requests for {self.hosts[0]} only, not for host "
                                     f"{host or '(none)'}: open it at http://{self.hosts[0]}:<port>/ (other sites "
                                     "cannot read it through their own names)")(scope, receive, send)
        limit = MAX_UPLOAD + MAX_FORM
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length and (not length.isdigit() or int(length) > limit):
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # waits for the disconnect, as Starlette expects after the body
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope, receive, send):
        await _error(413, _too_large(), {"Connection": "close"})(scope, receive, send)


def create_app(model, index=None, folder: str | Path | None = None, templates: str = "",
               queue_size: int = QUEUE_SIZE, host: str = "127.0.0.1") -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    folder = Path(folder) if folder else None
    queue = ModelQueue(queue_size)
    app.add_middleware(Guard, hosts=tuple(dict.fromkeys((host, *LOOPBACK_NAMES))))

    @app.exception_handler(StarletteHTTPException)  # Starlette's own 404 and 405 too
    async def message(_request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        # FastAPI's own answer is a 422 with a nested list; scripts get the same {"error": ...} as from the rest.
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in error.errors())
        return _error(400, problems)

    @app.exception_handler(UserError)
    async def user_error(_request, error: UserError):
        return _error(400, str(error))

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    @app.post("/api/classify")
    async def classify(image: UploadFile = File(...), texts: str = Form(...), kind: str = Form("labels")):
        if kind not in KINDS:
            raise HTTPException(400, f"kind is one of {', '.join(KINDS)}, got {kind!r}")
        names = [t.strip() for t in texts.splitlines() if t.strip()]
        if not names:
            raise HTTPException(400, "type at least one label or caption, one per line")
        if len(names) > MAX_LABELS:
            raise HTTPException(400, f"{len(names)} {kind}; the limit is {MAX_LABELS} per request: "
                                     "classify against fewer at a time")
        name, data = await _upload(image)

        def job():
            picture = _picture(name, data, model)
            if kind == "labels":
                probs = model.classify(picture, model.class_embeddings(names, templates))[0]
            else:
                probs = model.detect_image(picture, names)[0]
            note = " ".join(n for n in (_cut_note(model, names, kind[:-1]), INDEPENDENT if model.independent else "") if n)
            return {"names": names, "probs": [float(p) for p in probs], "independent": model.independent,
                    "note": note}

        return await queue.run(job)

    def _results(vector, k: int) -> dict:
        return {"results": [{"path": p, "score": s} for p, s in index.query(vector, k)]}  # k above the size: all

    def _need_index() -> None:
        if index is None:
            raise HTTPException(400, "no folder is indexed: start with --dir_origin_path")

    @app.get("/api/search")
    async def search_text(q: str, k: int = Query(12)):
        k = _check_k(k)
        if not q.strip():
            raise HTTPException(400, "type something to search for")
        _need_index()
        return await queue.run(lambda: {**_results(text_vector(model, q), k), "note": _cut_note(model, [q], "query")})

    @app.post("/api/search_image")
    async def search_image(image: UploadFile = File(...), k: int = Form(12)):
        k = _check_k(k)
        _need_index()
        name, data = await _upload(image)
        return await queue.run(lambda: {**_results(image_vector(model, _picture(name, data, model)), k), "note": ""})

    @app.get("/images/{relative:path}")
    def image_file(relative: str):
        path = safe_file(folder, relative) if folder else None
        if path is None:
            raise HTTPException(404, "no such image in the indexed folder")
        return FileResponse(path)

    return app


def listen(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A socket listening on host:port, or a UserError saying the port is taken: bound before anything is
    printed, so no URL of another program's page is ever shown."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"port {port} on {host} is in use ({e.strerror}): stop the program using it (another "
                        "page already running?) or choose another with --port N") from None
    sock.listen(2048)
    return sock


def serve(model, config: dict) -> None:
    """predict.py mode="web": serve the page on 127.0.0.1:port, searching the index in index_dir when it was built
    by mode "index", else dir_origin_path (indexed there first, when it exists)."""
    import uvicorn

    from utils.predict.index import is_built_index
    from utils.predict.search import open_index

    sock = listen(config["port"])
    index = folder = None
    if Path(config["dir_origin_path"]).is_dir() or is_built_index(config["index_dir"]):
        index, folder, line = open_index(model, config)
        print(line)
    else:
        print(f"dir_origin_path {config['dir_origin_path']} is not a folder: the search tab stays empty")
    print(f"open http://127.0.0.1:{config['port']}/  (Ctrl-C stops the server)")
    app = create_app(model, index, folder, config["templates"])
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
