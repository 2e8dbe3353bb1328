"""The API's errors: one JSON shape for every status, naming the field and the problem where there is one.

`{"status": 422, "error": "contract", "message": "...", "problems": [{"field": "inputs.question",
"problem": "..."}]}`. Handlers raise `ApiError` (or let a contract, catalog or Redis error through:
`install` maps each to its status here, in one table).
"""

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from contracts.errors import ContractError, FieldProblem, SpecError, UnknownPipelineError, UnknownVersionError
from routing.errors import BrokerUnavailableError


class Problem(BaseModel):
    field: str
    problem: str


class ErrorBody(BaseModel):
    status: int
    error: str = Field(description="contract, not-found, unauthorized, forbidden, conflict, too-large, "
                                   "rate-limited, backlog, unavailable, bad-request")
    message: str
    problems: list[Problem] = Field(default_factory=list)


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, problems: list[FieldProblem] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.problems = problems or []
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = ErrorBody(status=self.status, error=self.error, message=self.message,
                         problems=[Problem(field=p.field, problem=p.problem) for p in self.problems])
        return JSONResponse(body.model_dump(mode="json"), status_code=self.status, headers=self.headers)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not-found", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def too_many(message: str, retry_after: int, error: str = "rate-limited") -> ApiError:
    return ApiError(429, error, message, headers={"Retry-After": str(max(retry_after, 1))})


REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError, BrokerUnavailableError)
STATUS_ERRORS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "bad-request",
                 409: "conflict", 413: "too-large", 422: "contract", 429: "rate-limited", 503: "unavailable"}

# contract and catalog errors: (status, error) by class, most specific first
MAPPED: list[tuple[type[Exception], int, str]] = [
    (UnknownVersionError, 404, "not-found"),
    (UnknownPipelineError, 404, "not-found"),
    (ContractError, 422, "contract"),
    (SpecError, 422, "contract"),
]


def _problems_of_validation(error: RequestValidationError) -> list[FieldProblem]:
    found = []
    for item in error.errors():
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path", "header")]
        found.append(FieldProblem(".".join(loc) or "body", str(item.get("msg", "invalid"))))
    return found


def install(app: FastAPI) -> None:
    """Every error the API answers with, as one JSON shape."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = _problems_of_validation(error)
        summary = "; ".join(f"{p.field}: {p.problem}" for p in problems)
        return ApiError(422, "contract", f"invalid request: {summary}", problems).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        return ApiError(error.status_code, STATUS_ERRORS.get(error.status_code, "bad-request"), str(error.detail),
                        headers=headers).response()

    for cls, status, kind in MAPPED:
        _mapped(app, cls, status, kind)

    for cls in REDIS_DOWN:
        @app.exception_handler(cls)
        async def _down(request: Request, error: Any) -> JSONResponse:
            return ApiError(503, "unavailable", f"Redis (broker or result backend) is unreachable: "
                                                f"{type(error).__name__}: {error}",
                            headers={"Retry-After": "5"}).response()


def _mapped(app: FastAPI, cls: type[Exception], status: int, kind: str) -> None:
    @app.exception_handler(cls)
    async def _handler(request: Request, error: Any) -> JSONResponse:
        problems = list(error.problems) if isinstance(error, ContractError) else []
        return ApiError(status, kind, str(error), problems).response()
