"""The API's paths (fixed: clients rely on them). Each handler validates with the contracts, calls the
Python client / recovery / job records the CLI uses, and shapes the answer; nothing else."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import (
    Idempotency,
    Reader,
    ServicesDep,
    idempotent,
    may_submit,
    own_job,
    readable_job,
)
from api.errors import ApiError, ErrorBody, conflict
from api.events import job_events
from api.models import JobPage, PipelineDetail, PipelineInfo, Resumed, Submitted
from api.pipelines import detail, info, names
from contracts.errors import FieldProblem
from contracts.jobs import JobRequest, JobResult, JobStatus
from routing.errors import JobTimeoutError
from routing.recovery import RecoveryError
from workers.jobs import Cursor

FINAL = ("succeeded", "failed")
ListState = Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed)$",
                                        description="queued, running, succeeded or failed")]

Since = Annotated[float | None, Query(description="only jobs submitted at or after (unix seconds)")]
Limit = Annotated[int, Query(ge=1, description="at most this many (capped by STAGECOACH_API_LIST_MAX)")]
PageCursor = Annotated[str | None, Query(description="`next_cursor` of the previous page")]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of the error statuses a path answers, all with the one error body."""
    return {status: {"model": ErrorBody} for status in (401, 429, 503, *statuses)}


router = APIRouter(prefix="/v1", tags=["jobs"])


def links(request: Request, job_id: str) -> dict[str, str]:
    status = str(request.url_for("job_status", job_id=job_id))
    return {"job_id": job_id, "status_url": status, "result_url": f"{status}/result", "events_url": f"{status}/events"}


@router.post("/jobs", status_code=202, response_model=Submitted, dependencies=[Depends(may_submit)],
             responses=errors(403, 404, 409, 413, 422))
def submit(body: JobRequest, request: Request, svc: ServicesDep,
           idempotency: Annotated[Idempotency, Depends(idempotent)]) -> JSONResponse:
    """Start a job: 202 with where to follow it. An `Idempotency-Key` header makes a retry safe: the same
    key and body return the same job, another body with that key is 409."""
    if not idempotency.replay:
        handle = svc.client.submit(body.pipeline, body.inputs, job_id=idempotency.job_id, version=body.version,
                                   outputs=body.outputs, priority=body.priority, webhook=body.webhook,
                                   metadata=body.metadata, candidates=body.candidates)
        job_id = handle.id
    else:
        job_id = str(idempotency.job_id)
    answer = Submitted(**links(request, job_id), replayed=idempotency.replay)
    return JSONResponse(answer.model_dump(mode="json"), status_code=202, headers={"Location": answer.status_url})


@router.get("/jobs", response_model=JobPage, responses=errors(403, 422))
def list_jobs(svc: ServicesDep, who: Reader, pipeline: str | None = None, state: ListState = None,
              since: Since = None, limit: Limit = 50, cursor: PageCursor = None) -> JobPage:
    """Jobs, newest first, from the index the ledger keeps (it expires with the jobs)."""
    if pipeline is None and who.pipelines is not None:
        if len(who.pipelines) != 1:
            raise ApiError(403, "forbidden", f"token '{who.name}' reaches only pipelines {', '.join(who.pipelines)}: "
                                             "name one with ?pipeline=")
        pipeline = who.pipelines[0]
    if pipeline is not None:
        who.check_pipeline(pipeline)
    try:
        after = Cursor.load(cursor) if cursor else None
    except ValueError as error:
        raise ApiError(422, "contract", f"cursor: {error}", [FieldProblem("cursor", str(error))]) from None
    found, following = svc.runtime.jobs.listing(pipeline, state, since, min(limit, svc.api.list_max),  # type: ignore[arg-type]
                                                after)
    return JobPage(jobs=found, next_cursor=following.dump() if following else None)


@router.get("/jobs/{job_id}", name="job_status", response_model=JobStatus, responses=errors(403, 404))
def job_status(status: Annotated[JobStatus, Depends(readable_job)]) -> JobStatus:
    """Where the job is: queued, running (which stage, stages done of how many), succeeded or failed; and
    its webhook's delivery."""
    return status


@router.get("/jobs/{job_id}/result", name="job_result", response_model=JobResult,
            responses={**errors(403, 404), 202: {"model": JobStatus, "description": "not finished yet: its status"}})
def job_result(job_id: str, svc: ServicesDep, status: Annotated[JobStatus, Depends(readable_job)],
               wait: Annotated[float, Query(ge=0, description="seconds to wait for the end (long poll; capped by "
                                                              "STAGECOACH_API_MAX_WAIT)")] = 0) -> Any:
    """The JobResult once the job has ended (200, however it ended); before that 202 with its status."""
    pause = min(wait, svc.api.max_wait)
    if status.state not in FINAL and pause == 0:
        return _pending(status)
    try:
        return svc.client.handle(job_id).get(timeout=pause if status.state not in FINAL else svc.api.max_wait)
    except JobTimeoutError:
        return _pending(svc.client.status(job_id))


def _pending(status: JobStatus) -> JSONResponse:
    return JSONResponse(status.model_dump(mode="json"), status_code=202, headers={"Retry-After": "1"})


@router.delete("/jobs/{job_id}", status_code=202, response_model=JobStatus, responses=errors(403, 404, 409))
def cancel(job_id: str, svc: ServicesDep, status: Annotated[JobStatus, Depends(own_job)]) -> JobStatus:
    """Cancel the job: its next stage ends it as cancelled (stages already running finish first)."""
    if status.state in FINAL:
        raise conflict(f"job {job_id} already {status.state}")
    try:
        svc.recovery.cancel(job_id)
    except RecoveryError as error:
        raise conflict(str(error)) from None
    return svc.client.status(job_id)


@router.post("/jobs/{job_id}/resume", status_code=202, response_model=Resumed, responses=errors(403, 404, 409))
def resume(job_id: str, request: Request, svc: ServicesDep, status: Annotated[JobStatus, Depends(own_job)]) -> Resumed:
    """Continue a failed (or cancelled, or stalled) job from its checkpoint: completed stages are replayed."""
    try:
        generation = svc.recovery.resume(job_id)
    except RecoveryError as error:
        raise conflict(str(error)) from None
    return Resumed(**links(request, job_id), generation=generation)


router.add_api_route(
    "/jobs/{job_id}/events", job_events, methods=["GET"], name="job_events", response_class=EventSourceResponse,
    responses={**errors(403, 404, 422), 200: {"content": {"text/event-stream": {}},
                                              "description": "server-sent events; the last one is the JobResult"},
               204: {"description": "Last-Event-ID was the result: nothing follows"}})

pipelines = APIRouter(prefix="/v1", tags=["pipelines"])


@pipelines.get("/pipelines", response_model=list[PipelineInfo], responses=errors())
def list_pipelines(svc: ServicesDep, who: Reader) -> list[PipelineInfo]:
    """Every pipeline the caller may use: inputs, outputs, stages, versions."""
    catalog = svc.runtime.catalog
    return [info(catalog, name) for name in names(catalog) if who.reaches(name)]


@pipelines.get("/pipelines/{name}", response_model=PipelineDetail, responses=errors(403, 404))
def get_pipeline(name: str, svc: ServicesDep, who: Reader) -> PipelineDetail:
    """One pipeline (`name` or `name@version`): its spec, versions and the JSON Schemas of request and result."""
    who.check_pipeline(name)
    return detail(svc.runtime.catalog, name)
