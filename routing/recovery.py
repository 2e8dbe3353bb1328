"""Carry jobs past lost messages and operators' decisions: re-dispatch from the checkpoint, resume, cancel.

A re-dispatch starts the job's canvas again under a new generation. Stages completed by an
earlier generation replay their checkpointed outputs (no LM call), so the job continues where it
stopped; messages of older generations still in the broker are dropped when they arrive (stale).
"""

import logging
import time
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from contracts.catalog import Catalog
from contracts.connections import SENTINEL_SCHEME, SentinelSettings, redis_client, scheme_of
from contracts.envelope import ErrorRecord
from contracts.errors import StagecoachError
from contracts.jobs import requested_priority
from contracts.names import DEFAULT_QUEUE, QUEUE_PROGRESS_KEY, ROUTING_QUEUE, backlog_key, stage_queue
from contracts.priority import queue_lists
from routing.compile import Compiler
from routing.errors import PipelineError
from routing.nodes import KINDS
from routing.tasks import job_canvas, start_envelope
from workers.events import local_hostname
from workers.ledger import Closer, Ledger
from workers.onerror import cancelled_record

log = logging.getLogger(__name__)
# errors that say the store is away for now, not that the job is bad: the job stays watched
OUTAGES = (redis.ConnectionError, redis.TimeoutError, OperationalError)
MAX_BACKOFF = 8  # a job re-dispatched again and again waits at most this many stall periods


class RecoveryError(PipelineError):
    """A job cannot be resumed, re-dispatched or cancelled; the message says why."""


class Recovery:
    def __init__(self, app: Celery, catalog: Catalog, ledger: Ledger, max_redispatches: int = 8,
                 backlog_seconds: float = 3600.0, sentinel: SentinelSettings | None = None) -> None:
        self.app = app
        self.backlog_seconds = backlog_seconds
        self.sentinel = sentinel  # how to reach a sentinel:// broker's sentinels (default: the environment's)
        self.catalog = catalog
        self.compiler = Compiler(app, catalog, KINDS)
        self.ledger = ledger
        self.checkpoints = ledger.checkpoints
        self.max_redispatches = max_redispatches
        self.closer = Closer(local_hostname("watchdog"))

    def redispatch(self, job_id: str) -> int:
        """Start the job again from its request under a new generation, on the versions it started with;
        returns the generation."""
        request = self.ledger.request(job_id)
        if request is None:
            raise RecoveryError(f"job {job_id} has no checkpoint (never started, or expired)", job_id)
        try:
            first, pipeline, _ = start_envelope(self.catalog, request, job_id, self.ledger.spec(job_id))
        except StagecoachError as error:
            raise RecoveryError(f"job {job_id} cannot run again on the versions it started with: {error}",
                                job_id) from None
        generation = self.checkpoints.next_generation(job_id)
        self.checkpoints.client.delete(backlog_key(job_id))  # a later stall waits behind a backlog afresh
        envelope = first.model_copy(update={"generation": generation})
        backoff = self.checkpoints.stall * min(2 ** generation, MAX_BACKOFF)
        self.checkpoints.push_deadline(job_id, time.time() + backoff)
        canvas = job_canvas(self.compiler, pipeline, envelope, requested_priority(request))
        canvas.apply_async(root_id=job_id)  # finish answers as the job
        return generation

    def resume(self, job_id: str) -> int:
        """Continue a failed (or stalled) job; completed stages are replayed, not run again."""
        state = self.result_state(job_id)
        if state == "succeeded":
            raise RecoveryError(f"job {job_id} succeeded; nothing to resume", job_id)
        if self.ledger.request(job_id) is None:
            raise RecoveryError(f"job {job_id} has no checkpoint (never started, or expired)", job_id)
        self.checkpoints.uncancel(job_id)
        self.ledger.reopen(job_id)
        self.ledger.jobs.entered(job_id, "", None)
        return self.redispatch(job_id)

    def cancel(self, job_id: str) -> None:
        """Stop the job's remaining stages: the next one to start ends the job as cancelled."""
        if self.ledger.request(job_id) is None:
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

    def backlog(self) -> float | None:
        """How far the least advanced queue list that holds messages has got: the latest progress time (a job's
        previous stage end, or submit) of a message the workers started from it (0.0: unknown). None when no
        list holds messages. One LLEN per list, whatever the number of jobs queued (reading the messages to
        find a job's would grow with the backlog), and one read of the lists' progress. Always None on
        RabbitMQ, which hands a dead consumer's messages back at once."""
        if scheme_of(str(self.app.conf.broker_url)) not in ("redis", "rediss", SENTINEL_SCHEME):
            return None
        broker = redis_client(str(self.app.conf.broker_url), self.sentinel)
        pipe = broker.pipeline(transaction=False)
        queues = [ROUTING_QUEUE, DEFAULT_QUEUE, *(stage_queue(name) for name in self.catalog.stages)]
        lists = [key for name in queues for key in queue_lists(name)]  # one list per priority step
        for name in lists:
            pipe.llen(name)
        waiting = [name for name, length in zip(lists, pipe.execute(), strict=True) if int(length)]
        if not waiting:
            return None
        reached = self.checkpoints.client.hmget(QUEUE_PROGRESS_KEY, waiting)
        return min(float(r) if r else 0.0 for r in reached)

    def waits_in_backlog(self, job_id: str, now: float, reached: float) -> bool:
        """A stalled job may be waiting behind a backlog rather than lost, unless every list that holds messages
        has started messages sent well after the job last moved (each list is first in, first out: the
        job's message would have started before them). A job that may be waiting is given more time: until
        about when the lists' current wait says its message should start, for at most `backlog_seconds`
        from the first sweep that found it so (then it is re-dispatched: a lost message behind a backlog
        that never drains is recovered too, only later); its deadline is pushed here."""
        moved = self.checkpoints.progress_at(job_id)
        stall = self.checkpoints.stall
        if moved + stall / 2 <= reached:  # half a stall: the time a message may take to go out
            return False
        key = backlog_key(job_id)
        client = self.checkpoints.client
        client.set(key, now, nx=True, ex=int(self.backlog_seconds * 2) + 1)
        first = client.get(key)
        if first is None or now - float(first) >= self.backlog_seconds:
            return False
        # looked at again once the lists' current wait has passed for it (a backlog nothing drains: an eighth of
        # the allowance later, so a deep backlog's jobs cost the sweep a few visits each, not one per stall)
        expected = moved + (now - reached) + stall
        deadline = min(max(expected, now + stall), now + max(stall, self.backlog_seconds / 8))
        self.checkpoints.push_deadline(job_id, deadline)
        return True

    def finish_cancelled(self, job_id: str) -> None:
        """A cancelled job that no stage will pick up again: it ends now, as cancelled."""
        self.ledger.fail(job_id, cancelled_record("", None), self.closer)

    def give_up(self, job_id: str, generation: int) -> None:
        """A job re-dispatched `max_redispatches` times without finishing: it ends as timed out."""
        record = ErrorRecord(node="", kind="timeout", error_type="JobStalledError", message=(
            f"the job made no progress after {generation} re-dispatches by the watchdog "
            f"(STAGECOACH_WATCHDOG_MAX_REDISPATCHES={self.max_redispatches}); see the workers' logs"))
        self.ledger.fail(job_id, record, self.closer)


def sweep(recovery: Recovery) -> list[tuple[str, str]]:
    """One watchdog pass: every job past its deadline is closed, finished as cancelled, or re-dispatched;
    while the queues hold a backlog, a stalled job may be waiting in it, and is given more time (up to
    STAGECOACH_WATCHDOG_BACKLOG_SECONDS) unless the lists' progress says its message is not among those
    waiting. Its cost: one LLEN per queue list and one read of their progress, and a few round trips per
    stalled job (a range of the watch index); a job waiting behind a backlog is looked at again when its
    message should have started, at most 8 times over the allowance, and the queued messages are never read."""
    actions: list[tuple[str, str]] = []
    checkpoints = recovery.checkpoints
    now = time.time()
    stalled = checkpoints.stalled(now)
    reached = recovery.backlog() if stalled else None
    for job_id in stalled:
        if checkpoints.is_finished(job_id) or recovery.result_state(job_id) is not None:
            checkpoints.unwatch(job_id)
            continue
        if reached is not None and recovery.waits_in_backlog(job_id, now, reached):
            continue
        actions.append((job_id, _act(recovery, job_id)))
    return actions


def _act(recovery: Recovery, job_id: str) -> str:
    """End or re-dispatch one stalled job; never raises (one bad job must not stop the watchdog)."""
    checkpoints = recovery.checkpoints
    try:
        if checkpoints.cancelled(job_id):
            recovery.finish_cancelled(job_id)
            return "finished as cancelled"
        done = checkpoints.generation(job_id)
        if done >= recovery.max_redispatches:
            recovery.give_up(job_id, done)
            return f"ended as timed out after {done} re-dispatches"
        generation = recovery.redispatch(job_id)
    except RecoveryError as error:  # e.g. its versions are gone: it ends, saying why
        log.warning("cannot re-dispatch job %s: %s", job_id, error)
        recovery.ledger.fail(job_id, ErrorRecord(node="", kind="pipeline", error_type="RecoveryError",
                                                 message=str(error)), recovery.closer)
        return f"ended: {error}"
    except OUTAGES:  # Redis or the broker away (a restart, a Sentinel failover): the next sweep tries again
        raise
    except Exception as error:
        log.exception("cannot re-dispatch job %s", job_id)
        checkpoints.unwatch(job_id)
        return f"dropped: {error}"
    log.warning("job %s made no progress past its deadline: re-dispatched (generation %d)", job_id, generation)
    return f"re-dispatched (generation {generation})"
