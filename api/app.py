"""The FastAPI application: routes, the one error shape, the request size limit, and /healthz."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.health import Census
from api.models import Health
from api.routes import pipelines, router
from api.services import Services

DESCRIPTION = """Submit jobs to Stagecoach pipelines, follow them, stream their events, read their results and
get called back when they end. Every error is JSON: `{status, error, message, problems: [{field, problem}]}`.
Authenticate with `Authorization: Bearer <token>` (`stagecoach tokens create NAME --scope submit,read`)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # handlers that wait (a result's long poll) hold a thread each: more than AnyIO's default 40
    anyio.to_thread.current_default_thread_limiter().total_tokens = app.state.services.api.threads
    yield


def create_app(services: Services) -> FastAPI:
    app = FastAPI(title="Stagecoach API", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.services = services
    errors.install(app)
    app.include_router(router)
    app.include_router(pipelines)
    census = Census(services.runtime)

    @app.get("/healthz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    def healthz() -> Any:
        """Redis reachable (else 503), workers consuming each queue, messages waiting per queue."""
        health = census.health()
        return health if health.redis else JSONResponse(health.model_dump(mode="json"), status_code=503)

    app.add_middleware(BodyLimit, max_bytes=services.settings.max_request_bytes)  # type: ignore[arg-type]
    return app


class BodyLimit:
    """413 for a request body above STAGECOACH_MAX_REQUEST_BYTES, before it is read into memory: by its
    Content-Length, or by counting a body sent in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise TooLarge(seen)
            return message

        try:
            await self.app(scope, counted, send)
        except TooLarge as error:
            await self._refuse(scope, receive, send, error.size)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        error = errors.ApiError(413, "too-large", f"request body of {size} bytes exceeds STAGECOACH_MAX_REQUEST_BYTES "
                                                  f"({self.max_bytes})")
        await error.response()(scope, receive, send)


class TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size
