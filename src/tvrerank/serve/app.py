"""The search page's HTTP side: FastAPI routes over a ``SearchService``.

    GET /                                   the page (static/index.html; no build step, nothing from a CDN)
    GET /static/{app.js,style.css}          its script and style (only these names are served)
    GET /api/info                           the gallery, encoder and re-ranker being served
    GET /api/search?q=&top=10&rerank=true   one line of `retrieve --json`
    POST /api/rerank {"q": ..., "video_ids": [...]}
                                            another first stage's candidates (at most K ids) re-ranked:
                                            the JSON of /api/search (optional "stage1": their scores, "top")
    GET /api/videos/{video_id}              id, path, status, captions, duration
    GET /api/videos/{video_id}/frames       the sampled frames as one JPEG strip (a placeholder if unreadable)
    GET /api/explain?q=&video_id=           kept patches, video selector picks, attention (rerank/explain.py);
                                            on a detail world's cache also detail_patches, the known answer

Errors are JSON ``{"error": message}``: 400 for a bad query or parameter, 404 for an unknown video
or path, 503 with ``Retry-After`` when the server is busy, 500 (logged, with no detail) for a bug.
No route reads a file named by a request: videos are looked up by id in the gallery cache.
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, Field
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tvrerank.errors import TvrerankError
from tvrerank.serve.service import Busy, QueryError, SearchService, UnknownVideo

log = logging.getLogger(__name__)

STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def static_file(name: str) -> str:
    return resources.files("tvrerank.serve").joinpath("static", name).read_text(encoding="utf-8")


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class RerankRequest(BaseModel):
    """The body of POST /api/rerank."""

    q: str | None = None
    video_ids: list[str]
    stage1: list[float] | None = None  # the caller's first-stage scores, one per id (default: computed)
    top: int | None = Field(None, ge=1)


def handle_request_errors(app: FastAPI) -> None:
    """The JSON errors every tvrerank API answers with: a bad parameter 400 naming it, an unknown path
    404, anything unexpected 500 (logged with its traceback, never sent)."""

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
                             for e in exc.errors())
        return error(400, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, "not found" if exc.status_code == 404 else str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("error answering %s", request.url.path)
        return error(500, "internal error; the server log has the details")


def create_app(service: SearchService, *, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app over ``service``. ``allowed_hosts``: the Host header values served (others get 400),
    which stops a web page from reaching a loopback server through DNS rebinding; None: any."""
    app = FastAPI(title="tvrerank", docs_url=None, redoc_url=None)  # the interactive docs load from a CDN
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    page = static_file("index.html")
    assets = {name: static_file(name) for name in STATIC_TYPES}
    no_store = {"Cache-Control": "no-store"}

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return error(503, str(exc), **{"Retry-After": str(exc.retry_after)})

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError):
        return error(400, str(exc))

    @app.exception_handler(UnknownVideo)
    async def unknown_video(request: Request, exc: UnknownVideo):
        return error(404, str(exc))

    @app.exception_handler(TvrerankError)
    async def user_error(request: Request, exc: TvrerankError):
        return error(400, str(exc))

    handle_request_errors(app)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=no_store)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in assets:
            return error(404, "not found")
        return Response(assets[name], media_type=STATIC_TYPES[name], headers=no_store)

    @app.get("/api/info")
    async def info():
        return service.info()

    @app.get("/api/search")
    async def search(q: str | None = None, top: int = Query(10, ge=1, le=100), rerank: bool = True):
        return await service.model_gate.run(lambda: service.search(q, top=top, rerank=rerank))

    @app.post("/api/rerank")
    async def rerank(body: RerankRequest):
        return await service.model_gate.run(
            lambda: service.rerank(body.q, body.video_ids, stage1=body.stage1, top=body.top))

    @app.get("/api/explain")
    async def explain(video_id: str, q: str | None = None):
        return await service.model_gate.run(service.explain, q, video_id)

    # the frames route comes first: a video id may contain "/" (its path converter takes the rest)
    @app.get("/api/videos/{video_id:path}/frames")
    async def frames(video_id: str, request: Request):
        row = service.row(video_id)  # 404 before taking a decoding slot
        # the browser revalidates; the tag changes with the gallery, so another gallery's strips never show
        tag = f'"{service.gallery_tag}-{row}"'
        if request.headers.get("if-none-match") == tag and service.strips.get(video_id) is not None:
            return Response(status_code=304, headers={"ETag": tag})
        image, note = await service.decode_gate.run(service.frames, video_id)
        if note:  # a placeholder is not kept anywhere: the file may come back; header values are one latin-1 line
            headers = {"Cache-Control": "no-store",
                       "X-Tvrerank-Placeholder": "".join(c if " " <= c <= "~" else "?" for c in note)[:200]}
        else:
            headers = {"Cache-Control": "no-cache", "ETag": tag}
        return Response(image, media_type="image/jpeg", headers=headers)

    @app.get("/api/videos/{video_id:path}")
    async def video(video_id: str):
        service.row(video_id)
        return await service.decode_gate.run(service.video, video_id)

    return app
