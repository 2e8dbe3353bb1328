"""The job ledger: the one owner of a job's life. A job is started, claimed, checkpointed and ended here.

- **Start** (`start`, then `sent`): the Python client and `pipeline.run` alike record the job first
  (its request, the versions it runs, its queued status, its watch deadline, a once-only start
  claim), then send its first message. A job whose sender dies in between has a checkpoint, so the
  watchdog starts it; a second start of the same job id is refused.
- **Steps** (`begin`, `save`): one round trip before a stage call (claim, cancellation, replay) and
  one after (checkpoint, counters, published fields, and for the job's last step its close).
- **End** (`close`, `close_step`): every ending goes through one close: succeeded, failed, cancelled,
  rejected by its contract, dead-lettered, timed out. It runs once per job generation (a script
  takes a close marker, writes the final status and stores the JobResult where Celery's result
  backend would, together), and only the call that closed the job announces it: one typed
  `JobFinished` event (contracts/events.py), on the event log with the close, and the Celery task
  events that end the job's tasks in Flower as the job ended. Whatever must happen at a job's end
  hangs off `Ledger.announce`.
"""

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, states
from celery.exceptions import Ignore

from contracts.catalog import Catalog, static_stage_count
from contracts.connections import redis_client
from contracts.envelope import Envelope, ErrorRecord
from contracts.events import (
    FieldsPublished,
    FinishedError,
    FinishedNode,
    JobFinished,
    JobQueued,
    StagecoachEvent,
    StageStarted,
    preview,
)
from contracts.jobs import JobResult, requested_priority
from contracts.specs import PipelineSpec
from workers.checkpoint import Begun, Checkpoints, Claim, Close, Closed, Done, Keep, Start, StoredResult, claims_of
from workers.eventlog import EventLog
from workers.events import end_task_event
from workers.jobs import JobStore, encoded, finished_fields
from workers.lease import keeper
from workers.onerror import cancelled_record
from workers.settings import Settings
from workers.webhooks import Deliveries, webhook_of

log = logging.getLogger(__name__)
TRAIL_CHARS = 20_000  # a job-finished event drops a longer decision trail (the JobResult keeps it)


@dataclass(frozen=True)
class Finish:
    """What the task that ends a job is told when the job is compiled (its `finish` argument)."""

    outputs: list[str]  # the pipeline's declared outputs: the JobResult's answer
    inputs: list[str]  # the pipeline's inputs, named in the job-finished event for traces

    def dump(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "inputs": self.inputs}

    @classmethod
    def load(cls, raw: Any) -> "Finish | None":
        if not isinstance(raw, dict):
            return None
        return cls([str(o) for o in raw.get("outputs") or []], [str(i) for i in raw.get("inputs") or []])


@dataclass(frozen=True)
class Closer:
    """Who closes a job, for the events that end its tasks in Flower: the hostname the events come from,
    the Celery task that closes it (None outside a task), and that task's name when Flower may not
    have seen the task (a dead-lettered message)."""

    hostname: str | None
    task_id: str | None = None
    task_name: str | None = None

    @classmethod
    def of(cls, task: Task) -> "Closer":
        return cls(task.request.hostname, task.request.id)


@dataclass(frozen=True)
class Closing:
    """A job's end, ready to write: its JobResult and what the close script writes for it (the final
    status, the stored result, the JobFinished event)."""

    result: JobResult
    record: Close

    @property
    def finished(self) -> JobFinished:
        return self.record.finished


class Ledger:
    def __init__(self, app: Celery, client: redis.Redis, catalog: Catalog | None, ttl: int,
                 stall_seconds: float, events: EventLog | None = None, lease_seconds: float = 15.0,
                 max_deliveries: int = 4, keep: Keep | None = None) -> None:
        self.app = app
        self.catalog = catalog  # names a failed job's inputs in its event (None: no inputs named)
        self.checkpoints = Checkpoints(client, ttl, stall_seconds, events, keep)
        self.lease_seconds = lease_seconds
        self.max_deliveries = max_deliveries
        self.jobs = JobStore(client, ttl)
        self.deliveries = Deliveries(app, self.jobs, catalog)  # completion webhooks, queued at the close

    @classmethod
    def from_settings(cls, app: Celery, settings: Settings, catalog: Catalog | None = None) -> "Ledger":
        client = redis_client(settings.backend_url, settings.sentinel)
        events = EventLog(client, settings.result_expires, settings.events_per_job, settings.events_maxlen)
        keep = Keep(settings.succeeded_keep_seconds, settings.events_keep_seconds)
        return cls(app, client, catalog, settings.result_expires, settings.watchdog_stall_seconds, events,
                   settings.lease_seconds, settings.max_deliveries, keep)

    @property
    def stall(self) -> float:
        return self.checkpoints.stall

    @property
    def events(self) -> EventLog:
        """The job's events (workers/eventlog.py): the ledger appends in its own round trips; other writers
        (a routing task's decisions) append here."""
        return self.checkpoints.events

    # --- start --------------------------------------------------------------------------------

    def start(self, job: Envelope, request: dict[str, Any], spec: PipelineSpec, door: str, owner: str,
              redelivered: bool = False, final: bool = False) -> Claim:
        """Record the job before its first message is sent: its request, and `spec`, the pipeline with every
        version pinned (the watchdog and `resume` run the same versions). The claim says whether this
        caller starts it (`Begin.RUN`) or another start owns it; `owner` names this attempt to start (the
        same owner sending it again after a lost reply gets `Begin.RUN`). `final`: the sender is never
        redelivered (the client), so the start is claimed done at once; otherwise call `sent` once the
        message is out."""
        return self.start_sent(job, request, spec, door, owner, redelivered, final)()

    def start_sent(self, job: Envelope, request: dict[str, Any], spec: PipelineSpec, door: str, owner: str,
                   redelivered: bool = False, final: bool = False) -> Callable[[], Claim]:
        """`start`, its record sent to Redis at once and its answer read when the returned function is called:
        a sender whose job id cannot have been started before (a fresh one) sends the job's first message
        in between, so recording the job costs it no round trip of its own."""
        start = Start(request, spec.model_dump(mode="json"), door, request.get("webhook"))
        total = static_stage_count(spec)
        status = encoded({"state": "queued", "pipeline": job.pipeline, "submitted_at": job.submitted_at,
                          "updated_at": time.time(), "priority": requested_priority(request),
                          "metadata": request.get("metadata"),
                          "stages_total": None if total is None else total - len(job.skipped)})
        queued = JobQueued(job_id=job.job_id, pipeline=job.pipeline, at=time.time(), door=door,
                           pipeline_version=job.pipeline_version, skipped=job.skipped)
        return self.checkpoints.start(job, start, status, owner, redelivered, final, queued)

    def sent(self, claim: Claim) -> None:
        self.checkpoints.complete(claim)

    # --- steps ----------------------------------------------------------------------------------

    def begin(self, job: Envelope, step: str, path: str, ttl: float, owner: str, redelivered: bool,
              deadline: float, status: dict[str, str], started: StageStarted, source: str = "") -> Begun:
        return self.checkpoints.begin(job, step, path, ttl, owner, redelivered, deadline, status, started, source)

    def leased(self, job_id: str, until: float) -> AbstractContextManager[None]:
        """The job's lease renewed while a step it claimed runs (workers/lease.py), up to `until`."""
        return keeper(self.checkpoints.client, self.lease_seconds).held(job_id, until)

    def complete(self, claim: Claim, job_id: str = "", events: Sequence[StagecoachEvent] = ()) -> None:
        """A step that completed no stage (failed, cancelled, retried, replayed): its claim done, its events
        appended once."""
        self.checkpoints.complete(claim, job_id, events)

    def save(self, job: Envelope, path: str, done: Done, claim: Claim, publish: dict[str, Any],
             events: Sequence[StagecoachEvent], closing: Closing | None, closer: Closer) -> bool:
        """Checkpoint a completed step with its events; with `closing` (the job's last step) close the job in
        the same round trip. Returns whether this call closed it (True when not asked to close)."""
        if closing is not None:  # the job's end carries its fields: none to publish early
            publish = {}
        published = [FieldsPublished(job_id=job.job_id, pipeline=job.pipeline, at=time.time(), fields=publish)]
        events = [*events, *(published if publish else [])]
        reply = self.checkpoints.save(job, path, done, claim, closing.record if closing else None, publish,
                                             events)
        if closing is not None and reply.closed:
            self.announce(closing, reply, closer)
        return reply.closed

    # --- end ------------------------------------------------------------------------------------

    def closing(self, job: Envelope, finish: Finish | None) -> Closing:
        """The job's end from its last envelope: `finish` names its answer and inputs (a job ended by a
        failure before its last step has no answer; its inputs come from the catalog)."""
        inputs = finish.inputs if finish is not None else self._inputs_of(job)
        result = job_result(job, finish.outputs if finish is not None else [])
        steps = [(t.node, t.attempts) for t in job.timings] + [(e.node, e.attempts) for e in job.errors]
        return self._closing(result, job.pick(inputs), claims_of(job.generation, steps))

    def hand_on(self, task: Task, job: Envelope, finish: Finish | None) -> dict[str, Any]:
        """What a task of a job's chain returns: the envelope for the next step; or, when the job is over
        here (its last step, or a fatal error outside a fan-out member), the job closed. A job that ended
        otherwise than succeeded ends the task with Ignore (see `end_task`), which also stops the chain."""
        if finish is None and not (job.failed and job.member_of is None):
            return job.model_dump(mode="json")
        closing = self.close_step(job, finish, Closer.of(task))
        if closing is None:
            raise Ignore()  # another delivery closed the job: this one answers for nothing
        return end_task(closing.result)

    def close_step(self, job: Envelope, finish: Finish | None, closer: Closer) -> Closing | None:
        """Close the job from a task of its chain; None when another delivery closed it already."""
        closing = self.closing(self._cancelled_as_such(job), finish)
        reply = self.checkpoints.close(job.job_id, job.generation, closing.record)
        if not reply.closed:
            return None
        self.announce(closing, reply, closer)
        return closing

    def fail(self, job_id: str, record: ErrorRecord, closer: Closer, pipeline: str | None = None,
             inputs: dict[str, Any] | None = None, rejected: Any = None) -> bool:
        """End a job that has no envelope at hand (rejected, dead-lettered, cancelled while no stage runs,
        given up by the watchdog) as failed with `record`; whichever generation is current. `rejected`: the
        request of a job refused before it started (no checkpoint holds it; its webhook is still called).
        Returns whether this call closed it."""
        request = self.checkpoints.request(job_id) or (rejected if isinstance(rejected, dict) else {})
        name = pipeline if pipeline is not None else str(request.get("pipeline") or self.jobs.status(job_id).pipeline
                                                         or "")
        result = JobResult(job_id=job_id, pipeline=name.partition("@")[0], pipeline_version="", state="failed",
                           error=record, errors=[record], finished_at=time.time())
        closing = self._closing(result, inputs if inputs is not None else dict(request.get("inputs") or {}))
        reply = self.checkpoints.close(job_id, None, closing.record)
        if reply.closed:
            self.announce(closing, reply, closer, request)
        return reply.closed

    def announce(self, closing: Closing, reply: Closed, closer: Closer,
                 request: dict[str, Any] | None = None) -> None:
        """What happens once a job has ended (only the call that closed it gets here; its JobFinished event
        is on the event log already, written by the close itself, where the monitor reads it): Flower told
        how the job's tasks ended, and the job's completion webhook queued (the one `request` names when the
        caller has the request at hand, else the one recorded at start). Best effort: the job is closed
        already."""
        result = closing.result
        try:
            if closer.task_id is not None and not result.ok:  # a task that returns its result gets SUCCESS
                extra = {"name": closer.task_name} if closer.task_name else None
                end_task_event(self.app, closer.hostname, closer.task_id, result, extra)
            if reply.door == "run" and closer.task_id != result.job_id:  # the `pipeline.run` task under the job id
                end_task_event(self.app, closer.hostname, result.job_id, result)
        except Exception:
            log.exception("job %s closed, but announcing its end failed", result.job_id)
        try:
            named = request.get("webhook") if request is not None else (json.loads(reply.webhook) if reply.webhook
                                                                          else None)
            self.deliveries.after_close(result, webhook_of(named))
        except Exception:
            log.exception("job %s closed, but queueing its webhook failed", result.job_id)

    def _closing(self, result: JobResult, inputs: dict[str, Any], claims: tuple[str, ...] = ()) -> Closing:
        payload = result.model_dump(mode="json")
        stored = stored_result(self.app, result.job_id, payload)
        return Closing(result, Close(finished_fields(result.state), stored, finished_event(result, inputs), claims))

    def _cancelled_as_such(self, job: Envelope) -> Envelope:
        """A job that failed after an operator cancelled it (a fan-out whose members all stopped, say)
        ends as cancelled, whatever error the cancellation caused on the way."""
        if job.failure is None or job.failure.kind == "cancelled" or not self.checkpoints.cancelled(job.job_id):
            return job
        record = cancelled_record(job.failure.node, job.failure.stage)
        return job.model_copy(update={"failure": record, "errors": [*job.errors, record]})

    def _inputs_of(self, job: Envelope) -> list[str]:
        try:
            return list(self.catalog.pipeline(job.pipeline, job.pipeline_version).inputs) if self.catalog else []
        except Exception:  # the catalog changed since the job started: the trace shows no inputs
            return []

    # --- recovery -------------------------------------------------------------------------------

    def reopen(self, job_id: str) -> None:
        """Open an ended job again (resume, a replayed dead letter): its result and close marker go, so the
        run that carries it on can close it, and the watchdog watches it again if it has a checkpoint."""
        self.app.backend.forget(job_id)
        self.checkpoints.reopen(job_id)

    def request(self, job_id: str) -> dict[str, Any] | None:
        return self.checkpoints.request(job_id)

    def spec(self, job_id: str) -> PipelineSpec | None:
        raw = self.checkpoints.spec(job_id)
        return PipelineSpec.model_validate(raw) if raw is not None else None


def end_task(result: JobResult) -> dict[str, Any]:
    """How a task that closed its job ends: a succeeded job's JobResult is returned (Celery reports the task's
    SUCCESS); any other ending raises Ignore, which sends no event of Celery's, because the ledger has
    sent FAILURE or REVOKED for it already."""
    if result.ok:
        return result.model_dump(mode="json")
    raise Ignore()


def stored_result(app: Celery, job_id: str, result: dict[str, Any]) -> StoredResult:
    """The record Celery's result backend would write for a successful task `job_id` returning `result`:
    the ledger writes it itself, with the job's status, so a client's `AsyncResult(job_id).get()`
    reads the JobResult however the job ended."""
    backend = app.backend
    meta = backend._get_result_meta(result=result, state=states.SUCCESS, traceback=None, request=None)
    meta["task_id"] = job_id
    key = backend.get_key_for_task(job_id)
    return StoredResult(key.decode() if isinstance(key, bytes) else str(key), backend.encode(meta),
                        int(backend.expires or 0))


def final_state(job: Envelope) -> str:
    return "failed" if job.failed else "succeeded"


def job_result(job: Envelope, outputs: list[str]) -> JobResult:
    answer = {name: job.state.get(name) for name in outputs} if not job.failed else {}
    return JobResult(
        job_id=job.job_id,
        pipeline=job.pipeline,
        pipeline_version=job.pipeline_version,
        state="failed" if job.failed else "succeeded",
        answer=answer,
        fields=job.state,
        outputs=job.outputs,
        error=job.failure,
        errors=job.errors,
        timings=job.timings,
        trail=job.trail,
        usage=job.usage,
        cached_usage=job.cached_usage,
        skipped=job.skipped,
        traces=job.traces,
        submitted_at=job.submitted_at,
        finished_at=time.time(),
    )


def finished_event(result: JobResult, inputs: dict[str, Any]) -> JobFinished:
    """The typed job-finished event: the outcome and the path the job took, for counters and traces."""
    error = result.error
    trail = [d.model_dump(mode="json") for d in result.trail]
    finished = result.finished_at or time.time()
    return JobFinished(
        job_id=result.job_id, pipeline=result.pipeline, version=result.pipeline_version, at=finished,
        state="failed" if not result.ok else "succeeded",
        ending=result.ending, seconds=finished - (result.submitted_at or finished), submitted_at=result.submitted_at,
        kind=error.kind if error else None, message=error.message[:500] if error else None,
        error_node=error.node if error else None, inputs=inputs,
        trail=trail if len(preview(trail, TRAIL_CHARS + 1)[0]) <= TRAIL_CHARS else [],
        nodes=[FinishedNode(node=t.node, stage=t.stage, seconds=t.seconds, attempts=t.attempts)
               for t in result.timings],
        errors=[FinishedError(node=e.node, stage=e.stage, kind=e.kind, message=e.message[:300])
                for e in result.errors],
        answer=preview(result.answer)[0],
    )
