"""The web page and JSON API of `cbir serve` (FastAPI).

    GET  /                          the page: upload or pick an image, see the top-k thumbnails
    GET  /api/info                  what the index holds
    POST /api/search                multipart form: file (an image), k  -> ranked results
    GET  /api/search?id=ID&k=K      the same for an image already in the index
    GET  /api/images?offset=&limit= indexed images to pick from
    GET  /api/images/{id}/thumbnail a PNG thumbnail of an indexed image

Errors come back as JSON {"error": "..."} with 400 (bad argument), 404 (no such image),
413 (upload too large) or 422 (the upload is not a readable image).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from importlib import resources
from typing import Any

try:  # module level: FastAPI resolves the endpoint annotations (strings here) in these globals
    from fastapi import FastAPI, File, Form, Query, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
except ImportError:  # pragma: no cover - reported by create_app
    FastAPI = None  # type: ignore[assignment,misc]

from cbir_engine.errors import CbirError, ImageDecodeError
from cbir_engine.store.collection import Collection, Hit
from cbir_engine.store.images import thumbnail_png

MAX_UPLOAD_BYTES = 32 * 2**20
MAX_K = 100
THUMB_SIDE = 160


def _page() -> str:
    return resources.files("cbir_engine.serve").joinpath("static/index.html").read_text("utf-8")


def create_app(collection: Collection, default_k: int = 10) -> Any:
    """A FastAPI app serving `collection` (opened read-only by the caller)."""
    if FastAPI is None:
        raise CbirError("`cbir serve` needs the web extras: pip install 'cbir-engine[app]'")

    app = FastAPI(title="cbir-engine", docs_url="/api/docs", redoc_url=None)
    lock = threading.Lock()  # one search at a time: the engine and the SQLite handle are shared
    page = _page().replace("{{DEFAULT_K}}", str(int(default_k)))

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": message}, status_code=status)

    def hits_json(hits: list[Hit]) -> list[dict[str, Any]]:
        return [{"rank": h.rank, "id": h.id, "distance": h.distance, "label": h.label,
                 "name": os.path.basename(h.path), "thumbnail": f"/api/images/{h.id}/thumbnail"}
                for h in hits]

    def check_k(k: int) -> str | None:
        return None if 1 <= k <= MAX_K else f"k must be between 1 and {MAX_K}, got {k}"

    @functools.lru_cache(maxsize=4096)
    def thumbnail(image_id: int) -> bytes:
        # Failures raise, and lru_cache keeps only successes: a file fixed later is shown again.
        with lock:
            row = collection.row(image_id)
        if row is None:
            raise KeyError(image_id)
        return thumbnail_png(row.path, THUMB_SIDE)

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> Any:
        return HTMLResponse(page)

    @app.get("/api/info")
    def info() -> Any:
        with lock:
            return {**collection.info(), "default_k": default_k, "max_k": MAX_K,
                    "max_upload_bytes": MAX_UPLOAD_BYTES}

    @app.post("/api/search")
    def search_upload(file: UploadFile = File(...), k: int = Form(default_k)) -> Any:  # noqa: B008
        if (msg := check_k(k)) is not None:
            return error(400, msg)
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        name = file.filename or "upload"
        if len(data) > MAX_UPLOAD_BYTES:
            return error(413, f"{name}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        t0 = time.perf_counter()
        try:
            with lock:
                collection.refresh()
                hits = collection.search_image(data, k, name=name)
        except ImageDecodeError as e:
            return error(422, f"{e} — upload a JPEG, PNG, GIF, BMP, TIFF or WebP image")
        return {"query": name, "k": k, "ms": round((time.perf_counter() - t0) * 1e3, 2),
                "results": hits_json(hits)}

    @app.get("/api/search")
    def search_by_id(id: int = Query(...), k: int = Query(default_k)) -> Any:  # noqa: A002, B008
        if (msg := check_k(k)) is not None:
            return error(400, msg)
        t0 = time.perf_counter()
        try:
            with lock:
                collection.refresh()
                row = collection.row(id)
                hits = collection.search_id(id, k)
        except KeyError:
            return error(404, f"no image with id {id} in the index")
        name = os.path.basename(row.path) if row else str(id)
        return {"query": name, "query_id": id, "k": k, "ms": round((time.perf_counter() - t0) * 1e3, 2),
                "results": hits_json(hits)}

    @app.get("/api/images")
    def images(offset: int = 0, limit: int = 24) -> Any:
        if offset < 0 or not 1 <= limit <= 500:
            return error(400, "offset must be >= 0 and limit between 1 and 500")
        with lock:
            collection.refresh()
            rows = collection.list_rows(offset, limit)
            total = len(collection)
        return {"total": total, "offset": offset,
                "images": [{"id": r.id, "label": r.label, "name": os.path.basename(r.path),
                            "thumbnail": f"/api/images/{r.id}/thumbnail"} for r in rows]}

    @app.get("/api/images/{image_id}/thumbnail")
    def image_thumbnail(image_id: int) -> Any:
        try:
            png = thumbnail(image_id)
        except KeyError:
            return error(404, f"no image with id {image_id} in the index")
        except ImageDecodeError:
            return error(422, f"image {image_id} can no longer be read from disk")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(collection: Collection, host: str = "127.0.0.1", port: int = 8000, default_k: int = 10) -> None:
    """Runs the app with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise CbirError("`cbir serve` needs the web extras: pip install 'cbir-engine[app]'") from e
    uvicorn.run(create_app(collection, default_k), host=host, port=port, log_level="warning")
