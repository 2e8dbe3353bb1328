"""Carry jobs past lost messages and operators' decisions: re-dispatch from the checkpoint, resume, cancel.

A re-dispatch starts the job's canvas again under a new generation. Stages completed by an
earlier generation replay their checkpointed outputs (no LM call), so the job continues where it
stopped; messages of older generations still in the broker are dropped when they arrive (stale).
"""

import logging
import re
import time
from typing import Any
from urllib.parse import urlparse

import redis
from celery import Celery
from celery.result import AsyncResult

from contracts.catalog import Catalog
from contracts.envelope import ErrorRecord
from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.compile import Compiler
from routing.errors import PipelineError
from routing.nodes import KINDS
from routing.tasks import job_canvas, start_envelope
from workers.checkpoint import Checkpoints
from workers.jobs import JobStore

log = logging.getLogger(__name__)
_ROOT_ID = re.compile(r'"root_id": ?"([^"]+)"')
DEFAULT_QUEUE = "celery"  # where clients that name no queue send (the routing worker consumes it)
MAX_BACKOFF = 8  # a job re-dispatched again and again waits at most this many stall periods


class RecoveryError(PipelineError):
    """A job cannot be resumed, re-dispatched or cancelled; the message says why."""


class Recovery:
    def __init__(self, app: Celery, catalog: Catalog, checkpoints: Checkpoints, jobs: JobStore) -> None:
        self.app = app
        self.catalog = catalog
        self.compiler = Compiler(app, catalog, KINDS)
        self.checkpoints = checkpoints
        self.jobs = jobs

    def redispatch(self, job_id: str) -> int:
        """Start the job again from its request under a new generation; returns the generation."""
        request = self.checkpoints.request(job_id)
        if request is None:
            raise RecoveryError(f"job {job_id} has no checkpoint (never started, or expired)", job_id)
        first, pipeline = start_envelope(self.catalog, request, job_id)  # same version, outputs and plan
        generation = self.checkpoints.next_generation(job_id)
        envelope = first.model_copy(update={"generation": generation})
        backoff = self.checkpoints.stall * min(2 ** generation, MAX_BACKOFF)
        self.checkpoints.push_deadline(job_id, time.time() + backoff)
        job_canvas(self.compiler, pipeline, envelope).apply_async(root_id=job_id)  # finish answers as the job
        return generation

    def resume(self, job_id: str) -> int:
        """Continue a failed (or stalled) job; completed stages are replayed, not run again."""
        state = self.result_state(job_id)
        if state == "succeeded":
            raise RecoveryError(f"job {job_id} succeeded; nothing to resume", job_id)
        self.checkpoints.uncancel(job_id)
        AsyncResult(job_id, app=self.app).forget()
        self.checkpoints.reopen(job_id)
        self.jobs.entered(job_id, "", None)
        return self.redispatch(job_id)

    def cancel(self, job_id: str) -> None:
        """Stop the job's remaining stages: the next one to start ends the job as failed (cancelled)."""
        if self.checkpoints.request(job_id) is None:
            raise RecoveryError(f"no job {job_id} to cancel (never started, or expired)", job_id)
        if self.result_state(job_id) is not None:
            raise RecoveryError(f"job {job_id} already finished", job_id)
        self.checkpoints.cancel(job_id)

    def result_state(self, job_id: str) -> str | None:
        """'succeeded' / 'failed' when the job has a result, else None."""
        result = AsyncResult(job_id, app=self.app)
        if not result.ready():
            return None
        value: Any = result.result
        return str(value.get("state")) if isinstance(value, dict) else "failed"

    def queued_jobs(self) -> set[str]:
        """Jobs with a message waiting in a routing or stage queue (by the root id in its headers).
        Reads every queued message: the cost of telling a backlog from a lost message."""
        if urlparse(str(self.app.conf.broker_url)).scheme not in ("redis", "rediss"):
            return set()  # RabbitMQ hands a dead consumer's messages back at once: no backlog scan
        broker = redis.Redis.from_url(str(self.app.conf.broker_url))
        queues = [ROUTING_QUEUE, DEFAULT_QUEUE, *(stage_queue(name) for name in self.catalog.stages)]
        found: set[str] = set()
        for queue in queues:
            for raw in broker.lrange(queue, 0, -1):
                text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                found.update(_ROOT_ID.findall(text))
        return found

    def finish_cancelled(self, job_id: str) -> None:
        """A cancelled job that no stage will pick up again: its failed result, now."""
        record = ErrorRecord(node="", kind="cancelled", error_type="JobCancelledError",
                             message="job cancelled by an operator (`stagecoach cancel`)")
        pipeline = str((self.checkpoints.request(job_id) or {}).get("pipeline") or "")
        result = JobResult(job_id=job_id, pipeline=pipeline, pipeline_version="", state="failed", error=record,
                           errors=[record], finished_at=time.time())
        self.app.backend.store_result(job_id, result.model_dump(mode="json"), "SUCCESS")
        self.jobs.finished(job_id, "failed")
        self.checkpoints.finished(job_id)


def sweep(recovery: Recovery) -> list[tuple[str, str]]:
    """One watchdog pass: every job past its deadline is closed, finished as cancelled, or re-dispatched;
    a job whose next message still waits in a queue (a backlog, not a loss) is given more time."""
    actions: list[tuple[str, str]] = []
    checkpoints = recovery.checkpoints
    stalled = checkpoints.stalled()
    queued = recovery.queued_jobs() if stalled else set()
    for job_id in stalled:
        if checkpoints.is_finished(job_id) or recovery.result_state(job_id) is not None:
            checkpoints.finished(job_id)
            continue
        if job_id in queued:
            checkpoints.push_deadline(job_id, time.time() + checkpoints.stall)
            continue
        if checkpoints.cancelled(job_id):
            recovery.finish_cancelled(job_id)
            actions.append((job_id, "finished as cancelled"))
            continue
        try:
            generation = recovery.redispatch(job_id)
        except Exception as error:  # one bad job must not stop the watchdog
            log.exception("cannot re-dispatch job %s", job_id)
            checkpoints.finished(job_id)
            actions.append((job_id, f"dropped: {error}"))
            continue
        log.warning("job %s made no progress past its deadline: re-dispatched (generation %d)", job_id, generation)
        actions.append((job_id, f"re-dispatched (generation {generation})"))
    return actions
