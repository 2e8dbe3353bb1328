"""GET /v1/jobs/{id}/events: the job's event log (workers/eventlog.py) as server-sent events.

Each SSE event is one entry of the job's Redis stream: `id` is the entry id, `event` the event's type
name (contracts/names.py), `data` its JSON (contracts/events.py). So a client that reconnects with
`Last-Event-ID` resumes exactly after the last entry it got, and a client that connects after the end
reads the whole history. After the job-finished event comes one `result` event with the JobResult
(id `<finished entry id>:result`); a reconnect after it is answered 204, which tells an EventSource
to stop reconnecting.
"""

import re
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Header, Query, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import ServicesDep, readable_job
from api.errors import ApiError
from api.services import Services
from contracts.errors import FieldProblem
from contracts.events import JobFinished, StagecoachEvent, event_name
from contracts.jobs import JobStatus

BLOCK_MS = 5000  # one blocking read of the stream; the loop reads again (and a ping keeps proxies open)
PING_SECONDS = 15
RESULT_SUFFIX = ":result"
ENTRY_ID = re.compile(r"^\d+-\d+$")
FINAL = ("succeeded", "failed")
# blocking stream reads run in threads of their own, so followers never starve the handlers' pool
READERS = anyio.CapacityLimiter(256)


def job_events(job_id: str, svc: ServicesDep, status: Annotated[JobStatus, Depends(readable_job)],
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
               after: Annotated[str | None, Query(description="an entry id to resume after (as Last-Event-ID, for "
                                                              "clients that cannot set headers)")] = None,
               ) -> Response:
    """The job's life as it happens: queued, each stage started and its outcome (ok, error, retry), routing
    decisions (branches, loop iterations, map items), answer fields as soon as they are final, the end;
    then the JobResult."""
    resume = last_event_id or after or "0-0"
    if resume.endswith(RESULT_SUFFIX):
        return Response(status_code=204)  # the client has the whole job, result included
    if not ENTRY_ID.match(resume):
        raise ApiError(422, "contract", f"Last-Event-ID: expected an event id like 1712345678901-0, got {resume!r}",
                       [FieldProblem("Last-Event-ID", "expected an event id like 1712345678901-0")])
    return EventSourceResponse(stream(svc, job_id, resume), ping=PING_SECONDS)


async def stream(svc: Services, job_id: str, after: str) -> AsyncIterator[ServerSentEvent]:
    while True:
        batch = await anyio.to_thread.run_sync(_read, svc, job_id, after, limiter=READERS)
        for entry_id, event in batch:
            after = entry_id
            yield ServerSentEvent(event.model_dump_json(), event=event_name(event), id=entry_id)
            if isinstance(event, JobFinished):
                result = await anyio.to_thread.run_sync(lambda: _result(svc, job_id), limiter=READERS)
                if result is not None:  # else the job was resumed since: its next run follows
                    yield ServerSentEvent(result, event="result", id=entry_id + RESULT_SUFFIX)
                    return


def _read(svc: Services, job_id: str, after: str) -> list[tuple[str, StagecoachEvent]]:
    return svc.events.read(job_id, after, block_ms=BLOCK_MS)


def _result(svc: Services, job_id: str) -> str | None:
    if svc.client.status(job_id).state not in FINAL:
        return None
    return svc.client.handle(job_id).get(timeout=svc.api.max_wait).model_dump_json()
