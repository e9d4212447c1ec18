"""``tvrerank serve --shards URL,URL``: one search API over shard servers (``retrieve/sharded.py``).

    GET /api/info                           the shards and the gallery they split
    GET /api/search?q=&top=10&rerank=true   the JSON of one server of the whole gallery

The page, the frames and the explain view are the shards' own (every shard holds the whole cache:
``GET /api/videos/...`` of any shard answers for any video); ``/api/rerank`` of external candidates
goes to the shard that holds them. Errors are JSON ``{"error": ...}``: a shard's 4xx is passed on
(a bad query), a shard that does not answer or fails is 502.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tvrerank.retrieve.sharded import ShardedRetriever, ShardRefused, ShardUnavailable
from tvrerank.serve.app import error

log = logging.getLogger(__name__)


def create_front_app(sharded: ShardedRetriever, *, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The API over ``sharded``; ``allowed_hosts`` as in ``serve.app.create_app``."""
    app = FastAPI(title="tvrerank shards", docs_url=None, redoc_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(ShardRefused)
    async def refused(request: Request, exc: ShardRefused):
        return error(exc.status, str(exc))

    @app.exception_handler(ShardUnavailable)
    async def unavailable(request: Request, exc: ShardUnavailable):
        return error(502, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        return error(400, "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, "not found" if exc.status_code == 404 else str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("error answering %s", request.url.path)
        return error(500, "internal error; the server log has the details")

    @app.get("/api/info")
    def info():
        return sharded.info()

    @app.get("/api/search")  # a plain function: FastAPI runs it in a worker thread while it waits on the shards
    def search(q: str | None = None, top: int = Query(10, ge=1, le=100), rerank: bool = True):
        return sharded.search(q, top=top, rerank=rerank)

    return app
