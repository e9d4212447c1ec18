"""``tvrerank serve --shards URL,URL``: one search API over shard servers (``retrieve/sharded.py``).

    GET /api/info                           the shards and the gallery they split
    GET /api/search?q=&top=10&rerank=true   the JSON of one server of the whole gallery

The page, the frames and the explain view are the shards' own (every shard holds the whole cache:
``GET /api/videos/...`` of any shard answers for any video); ``/api/rerank`` of external candidates
goes to the shard that holds them. Errors are JSON ``{"error": ...}``: a shard's 4xx is passed on
(a bad query), a shard that does not answer or fails is 502.
"""

from __future__ import annotations

from fastapi import FastAPI, Query, Request
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tvrerank.retrieve.sharded import ShardedRetriever, ShardRefused, ShardUnavailable
from tvrerank.serve.app import error, handle_request_errors


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

    handle_request_errors(app)

    @app.get("/api/info")
    def info():
        return sharded.info()

    @app.get("/api/search")  # a plain function: FastAPI runs it in a worker thread while it waits on the shards
    def search(q: str | None = None, top: int = Query(10, ge=1, le=100), rerank: bool = True):
        return sharded.search(q, top=top, rerank=rerank)

    return app
