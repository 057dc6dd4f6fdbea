"""The web app: JSON endpoints over a CLIP model and a search index, and the indexed folder's images.

FastAPI because the page is one static HTML/JS file talking to four small JSON endpoints: nothing is fetched from
outside (no CDN, no fonts, no telemetry, unlike Gradio's defaults), and the server is a plain ASGI app that tests
can start on 127.0.0.1.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import torch.nn.functional as F
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image

from utils.data.images import decoded

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD = 10 * 2**20
# A few compressed bytes can hold a huge picture: 12,500 x 12,500 pixels in a 150 KB PNG took 4 s and 0.5 GB to
# decode. Checked from the header, before any pixel is decoded.
MAX_PIXELS = 50_000_000


def safe_file(folder: Path, relative: str) -> Path | None:
    """`relative` inside `folder` as a real file, or None: no absolute paths, no `..`, no symlinks leading out."""
    if not relative or relative.startswith(("/", "\\")) or ".." in Path(relative.replace("\\", "/")).parts:
        return None
    root = folder.resolve()
    path = (root / relative).resolve()  # follows symlinks: one pointing out of the folder lands outside root
    if root not in path.parents or not path.is_file():
        return None
    return path


def _too_many_pixels(name: str, pixels: int, size: str = "") -> HTTPException:
    return HTTPException(413, f"{name} is {size}{pixels / 1e6:.0f} Mpx; the limit is {MAX_PIXELS / 1e6:.0f} Mpx: "
                              "scale it down and upload it again")


async def _image(upload: UploadFile, model) -> Image.Image:
    name = upload.filename or "the upload"
    data = await upload.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"the image is larger than {MAX_UPLOAD // 2**20} MB")
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
            return decoded(image, model.decode_sides)  # a JPEG at the scale the model needs
        except Exception:  # a header that reads but pixels that do not
            raise HTTPException(400, f"{name} is not an image this page can read") from None


def _check_k(k: int) -> int:
    if k < 1:
        raise HTTPException(400, f"k is the number of results to return: a whole number, 1 or more, got {k}")
    return k


def create_app(model, index=None, folder: str | Path | None = None, templates: str = "") -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    folder = Path(folder) if folder else None

    @app.exception_handler(HTTPException)
    async def message(_request, error: HTTPException):
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        # FastAPI's own answer is a 422 with a nested list; scripts get the same {"error": ...} as from the rest.
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                             for e in error.errors())
        return JSONResponse({"error": problems}, status_code=400)

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html")

    @app.post("/api/classify")
    async def classify(image: UploadFile = File(...), texts: str = Form(...), kind: str = Form("labels")):
        names = [t.strip() for t in texts.splitlines() if t.strip()]
        if not names:
            raise HTTPException(400, "type at least one label or caption, one per line")
        picture = await _image(image, model)
        if kind == "labels":
            probs = model.classify(picture, model.class_embeddings(names, templates))[0]
        else:
            probs = model.detect_image(picture, names)[0]
        return {"names": names, "probs": [float(p) for p in probs]}

    def _results(vector, k: int) -> dict:
        if index is None:
            raise HTTPException(400, "no folder is indexed: start with --dir_origin_path")
        return {"results": [{"path": p, "score": s} for p, s in index.query(vector, k)]}  # k above the size: all

    @app.get("/api/search")
    def search_text(q: str, k: int = Query(12)):
        k = _check_k(k)
        if not q.strip():
            raise HTTPException(400, "type something to search for")
        return _results(F.normalize(model.detect_image_for_eval(texts=[q])[1].float(), dim=-1)[0].cpu(), k)

    @app.post("/api/search_image")
    async def search_image(image: UploadFile = File(...), k: int = Form(12)):
        k = _check_k(k)
        picture = await _image(image, model)
        return _results(F.normalize(model.detect_image_for_eval(images=[picture])[0].float(), dim=-1)[0].cpu(), k)

    @app.get("/images/{relative:path}")
    def image_file(relative: str):
        path = safe_file(folder, relative) if folder else None
        if path is None:
            raise HTTPException(404, "no such image in the indexed folder")
        return FileResponse(path)

    return app


def serve(model, config: dict) -> None:
    """predict.py mode="web": serve the page on 127.0.0.1:port, searching the index in index_dir when it was built
    by mode "index", else dir_origin_path (indexed there first, when it exists)."""
    import uvicorn

    from utils.predict.index import is_built_index
    from utils.predict.search import open_index

    index = folder = None
    if Path(config["dir_origin_path"]).is_dir() or is_built_index(config["index_dir"]):
        index, folder, line = open_index(model, config)
        print(line)
    else:
        print(f"dir_origin_path {config['dir_origin_path']} is not a folder: the search tab stays empty")
    print(f"open http://127.0.0.1:{config['port']}/  (Ctrl-C stops the server)")
    uvicorn.run(create_app(model, index, folder, config["templates"]), host="127.0.0.1",
                port=config["port"], log_level="warning")
