"""The handlers' dependencies: who calls (auth), how often (rate limit), whether the pipeline has room
(backlog), whether the request was made before (idempotency), and which job a path names (access).

Each is a FastAPI dependency, so a handler states what it needs in its signature and holds none of it.
"""

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError, conflict, not_found, too_many
from api.services import Services
from contracts.errors import FieldProblem
from contracts.jobs import JobStatus
from contracts.names import api_rate_key, idempotency_key
from contracts.tokens import Scope, TokenRecord


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(services)]


@dataclass(frozen=True)
class Caller:
    """Who is calling: a token's record, or (auth off) anyone, known by address."""

    name: str
    record: TokenRecord | None  # None: auth is off, every scope and pipeline

    def reaches(self, pipeline: str) -> bool:
        return self.record is None or self.record.reaches(pipeline)

    def check_pipeline(self, pipeline: str) -> None:
        if not self.reaches(pipeline):
            raise ApiError(403, "forbidden", f"token '{self.name}' may not use pipeline '{pipeline}' (it reaches: "
                                             f"{', '.join(self.record.pipelines or []) if self.record else ''})")

    @property
    def pipelines(self) -> list[str] | None:
        return None if self.record is None else self.record.pipelines


BEARER = HTTPBearer(auto_error=False, description="an API token: `stagecoach tokens create NAME`")


def caller(request: Request, svc: ServicesDep,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Caller:
    """The caller's token (401 without a valid one), or anyone when auth is off."""
    if not svc.api.auth:
        host = request.client.host if request.client else "unknown"
        return Caller(f"address:{host}", None)
    token = credentials.credentials if credentials is not None else None
    if not token:
        raise ApiError(401, "unauthorized", "missing bearer token: send `Authorization: Bearer <token>` "
                                            "(`stagecoach tokens create NAME`)", headers={"WWW-Authenticate": "Bearer"})
    record = svc.tokens.check(token)
    if record is None:
        raise ApiError(401, "unauthorized", "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return Caller(record.name, record)


CallerDep = Annotated[Caller, Depends(caller)]


def rate_limited(svc: ServicesDep, who: CallerDep) -> Caller:
    """At most the caller's requests per minute (its token's own limit, else STAGECOACH_API_RATE_PER_MINUTE);
    a fixed one-minute window in Redis, so every API process counts together."""
    limit = (who.record.rate_per_minute if who.record and who.record.rate_per_minute else None) or \
        svc.api.rate_per_minute
    if limit <= 0:
        return who
    now = time.time()
    minute = int(now // 60)
    key = api_rate_key(who.name, minute)
    pipe = svc.redis.pipeline()
    pipe.incr(key)
    pipe.expire(key, 120)
    count = int(pipe.execute()[0])
    if count > limit:
        raise too_many(f"rate limit of {limit} requests per minute spent for '{who.name}'", int(60 - now % 60) + 1)
    return who


class Allowed:
    """The caller, rate limited, holding `scope` (403 without it)."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    def __call__(self, who: Annotated[Caller, Depends(rate_limited)]) -> Caller:
        if who.record is not None and not who.record.allows(self.scope):
            raise ApiError(403, "forbidden", f"token '{who.name}' lacks scope '{self.scope}' (it has: "
                                             f"{', '.join(who.record.scopes)})")
        return who


Reader = Annotated[Caller, Depends(Allowed("read"))]
Submitter = Annotated[Caller, Depends(Allowed("submit"))]


def _job(svc: Services, who: Caller, job_id: str) -> JobStatus:
    status = svc.client.status(job_id)
    if status.state == "unknown":
        raise not_found(f"no job {job_id} (never submitted, or its record expired)")
    if status.pipeline is not None:
        who.check_pipeline(status.pipeline)
    return status


def readable_job(job_id: str, svc: ServicesDep, who: Reader) -> JobStatus:
    """The job the path names, if the caller may read it (404 unknown, 403 another pipeline's)."""
    return _job(svc, who, job_id)


def own_job(job_id: str, svc: ServicesDep, who: Submitter) -> JobStatus:
    """The job the path names, if the caller may act on it (cancel, resume)."""
    return _job(svc, who, job_id)


async def submitted_pipeline(request: Request) -> str:
    """The pipeline a POST /v1/jobs body names ("" when the body has none: validation says why)."""
    try:
        body = await request.json()
    except ValueError:
        return ""
    return str(body.get("pipeline") or "") if isinstance(body, dict) else ""


def may_submit(svc: ServicesDep, who: Submitter, pipeline: Annotated[str, Depends(submitted_pipeline)]) -> Caller:
    """The caller may start jobs of the body's pipeline, and the pipeline has room (`max_queued`)."""
    if pipeline:
        who.check_pipeline(pipeline)
        _room(svc, pipeline)
    return who


def _room(svc: Services, pipeline: str) -> None:
    try:
        spec = svc.runtime.catalog.pipeline(pipeline)
    except Exception:  # unknown pipeline or version: the handler answers 404 naming it
        return
    if spec.max_queued is not None and svc.runtime.jobs.backlog(spec.name) >= spec.max_queued:
        raise too_many(f"pipeline '{spec.name}' has {spec.max_queued} jobs queued or running (its max_queued): "
                       "try again later", svc.api.backlog_retry_after, "backlog")


@dataclass
class Idempotency:
    """The job id a POST /v1/jobs starts: a fresh one, or, for a repeated `Idempotency-Key` with the same
    body, the job the first request started (`replay`)."""

    job_id: str | None
    replay: bool = False


IDEMPOTENCY_KEY_PROBLEM = "1 to 200 printable ASCII characters"


async def idempotent(request: Request, svc: ServicesDep, who: Annotated[Caller, Depends(may_submit)],
                     idempotency_key_header: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
                     ) -> AsyncIterator[Idempotency]:
    """Reserve the key for this body (SET NX, kept as long as jobs are); the same key with another body is
    409. If the request then fails, the reservation goes, so a corrected retry may use the key."""
    if idempotency_key_header is None:
        yield Idempotency(None)
        return
    key = idempotency_key_header
    if not 0 < len(key) <= 200 or not key.isascii() or not key.isprintable():
        raise ApiError(400, "bad-request", f"Idempotency-Key: expected {IDEMPOTENCY_KEY_PROBLEM}",
                       [FieldProblem("Idempotency-Key", IDEMPOTENCY_KEY_PROBLEM)])
    digest = hashlib.sha256(_canonical(await request.body())).hexdigest()
    redis_key = idempotency_key(who.name, key)
    fresh = Idempotency(_new_id())
    record = json.dumps({"job_id": fresh.job_id, "body": digest})
    reserve = partial(svc.redis.set, redis_key, record, nx=True, ex=svc.settings.result_expires)
    if await anyio.to_thread.run_sync(reserve):  # Redis calls off the event loop
        try:
            yield fresh
        except Exception:
            await anyio.to_thread.run_sync(svc.redis.delete, redis_key)
            raise
        return
    yield _replayed(await anyio.to_thread.run_sync(svc.redis.get, redis_key), digest, key)


def _replayed(raw: Any, digest: str, key: str) -> Idempotency:
    if raw is None:  # expired between the two reads: the body is new to us
        return Idempotency(_new_id())
    earlier = json.loads(raw)
    if earlier["body"] != digest:
        raise conflict(f"Idempotency-Key '{key}' was used with another request body (job {earlier['job_id']})")
    return Idempotency(str(earlier["job_id"]), replay=True)


def _canonical(body: bytes) -> bytes:
    """The body as sorted JSON, so key order and spacing do not make two requests differ."""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return body


def _new_id() -> str:
    return uuid.uuid4().hex

