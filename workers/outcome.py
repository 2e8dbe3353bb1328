"""The custom Celery events the monitor counts: one per stage outcome, one per finished job.

Errors are values here: a stage that fails records an ErrorRecord in the envelope and Celery sees
SUCCESS. So the stage task says what happened (ok, error kind, retry) in a `stagecoach-stage-outcome`
event, and `pipeline.finish` sends `stagecoach-job-finished` with the job's path (decisions, inputs)
for per-job traces. Sending is best effort: a monitor event must never fail a stage.
"""

import atexit
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Retry

from contracts.envelope import Envelope
from contracts.jobs import JobResult
from contracts.names import JOB_FINISHED_EVENT, STAGE_OUTCOME_EVENT

log = logging.getLogger(__name__)
PREVIEW_CHARS = 400  # inputs/outputs in a trace are previews; the JobResult has the full values
TRAIL_CHARS = 20_000


def preview(value: Any, limit: int = PREVIEW_CHARS) -> tuple[str, int]:
    """JSON text of a value cut to `limit` characters, and its full size in bytes."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return (text if len(text) <= limit else text[:limit] + "..."), len(text.encode())


def send(task: Task, event: str, fields: dict[str, Any]) -> None:
    """Best effort and off the task's path: the event is handed to this process's sender thread, so a
    stage's next hop does not wait for the monitor's publish."""
    request = task.request
    _sender().put(_Outgoing(task.app, request.hostname, request.id, event, fields))


@dataclass(frozen=True)
class _Outgoing:
    app: Any
    hostname: str | None
    task_id: str | None
    event: str
    fields: dict[str, Any]


class EventSender:
    """One thread per process publishing Stagecoach's events in the order they were sent, on its own
    dispatcher (Celery's `Task.send_event` builds and closes a dispatcher per event). At exit it gets
    FLUSH_SECONDS to send what is queued; a broker error drops that one event (the monitor misses it)."""

    FLUSH_SECONDS = 2.0

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
        self.pid = os.getpid()
        self._dispatchers: dict[tuple[int, str | None], Any] = {}
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="stagecoach-events", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def put(self, item: _Outgoing) -> None:
        self._idle.clear()
        self.queue.put(item)

    def flush(self, timeout: float = FLUSH_SECONDS) -> bool:
        """Wait until everything queued so far was published (True), or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while not (self._idle.is_set() and self.queue.empty()):
            if time.monotonic() > deadline:
                return False
            self._idle.wait(0.01)
        return True

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is not None:
                self._publish(item)
            if self.queue.empty():
                self._idle.set()

    def _publish(self, item: _Outgoing) -> None:
        key = (id(item.app), item.hostname)
        try:
            if key not in self._dispatchers:
                self._dispatchers[key] = item.app.events.Dispatcher(item.app.connection_for_write(),
                                                                    hostname=item.hostname, enabled=True)
            self._dispatchers[key].send(item.event, uuid=item.task_id, **item.fields)
        except Exception:  # the broker hiccuped: the job goes on, only the monitor misses one event
            self._dispatchers.pop(key, None)  # the next event starts on a fresh connection
            log.warning("could not send %s", item.event, exc_info=True)


_senders: dict[int, EventSender] = {}
_senders_lock = threading.Lock()


def _sender() -> EventSender:
    """This process's sender (a forked pool child starts its own: threads do not survive a fork)."""
    pid = os.getpid()
    with _senders_lock:
        if pid not in _senders:
            _senders[pid] = EventSender()
        return _senders[pid]


@contextmanager
def stage_outcome(task: Task, stage: str, job: Envelope, path: str,
                  inputs: dict[str, Any]) -> Iterator[Callable[[Envelope], Envelope]]:
    """Around one stage call: yields `report(done) -> done`; a Celery retry is reported as a retry."""
    base = _base(task, stage, job, path, inputs)
    try:
        yield lambda done: _report(task, base, job, done, path)
    except Retry as retry:
        cause = retry.__cause__  # the StageError the executor retries on
        send(task, STAGE_OUTCOME_EVENT, {**base, "outcome": "retry", "kind": getattr(cause, "kind", "stage"),
                                         "message": str(cause)[:500]})
        raise


def _base(task: Task, stage: str, job: Envelope, path: str, inputs: dict[str, Any]) -> dict[str, Any]:
    text, size = preview(inputs)
    return {"stage": stage, "pipeline": job.pipeline, "job_id": job.job_id, "node": path,
            "attempts": task.request.retries + 1, "input_bytes": size, "inputs": text, "at": time.time()}


def _report(task: Task, base: dict[str, Any], before: Envelope, done: Envelope, path: str) -> Envelope:
    if before.failed:  # passed through after an earlier fatal error: the stage did not run
        send(task, STAGE_OUTCOME_EVENT, {**base, "outcome": "skipped"})
        return done
    new_errors = done.errors[len(before.errors):]
    fields = {**base, **_timing(before, done), **_tokens(before, done, base["stage"])}
    fields["elapsed"] = time.time() - base["at"]
    if new_errors:
        error = new_errors[-1]
        fields.update(outcome="error", kind=error.kind, message=error.message[:500], fatal=done.failed)
    else:
        text, size = preview(done.outputs.get(path, {}))
        fields.update(outcome="ok", outputs=text, output_bytes=size)
    send(task, STAGE_OUTCOME_EVENT, fields)
    return done


def _timing(before: Envelope, done: Envelope) -> dict[str, Any]:
    new = done.timings[len(before.timings):]
    if not new:  # an error: the call's time is what passed since the task started
        return {"seconds": None, "cached": False}
    timing = new[-1]
    return {"seconds": timing.seconds, "started_at": timing.started_at, "cached": timing.cached,
            "worker": timing.worker}


def _tokens(before: Envelope, done: Envelope, stage: str) -> dict[str, int]:
    old, new = before.usage.get(stage), done.usage.get(stage)
    if new is None:
        return {"prompt_tokens": 0, "completion_tokens": 0}
    return {"prompt_tokens": new.prompt_tokens - (old.prompt_tokens if old else 0),
            "completion_tokens": new.completion_tokens - (old.completion_tokens if old else 0)}


def job_finished(task: Task, result: JobResult, inputs: dict[str, Any]) -> None:
    """What `pipeline.finish` (or a rejected `pipeline.run`) tells the monitor: the outcome and the
    path the job took (decisions, nodes, errors), for per-job traces."""
    error = result.error
    trail = [d.model_dump(mode="json") for d in result.trail]
    finished = result.finished_at or time.time()
    send(task, JOB_FINISHED_EVENT, {
        "job_id": result.job_id, "pipeline": result.pipeline, "version": result.pipeline_version,
        "state": result.state,
        "seconds": finished - (result.submitted_at or finished), "submitted_at": result.submitted_at,
        "kind": error.kind if error else None, "message": error.message[:500] if error else None,
        "error_node": error.node if error else None,
        "inputs": inputs,
        "trail": trail if len(json.dumps(trail, default=str)) <= TRAIL_CHARS else [],
        "nodes": [{"node": t.node, "stage": t.stage, "seconds": t.seconds, "attempts": t.attempts}
                  for t in result.timings],
        "errors": [{"node": e.node, "stage": e.stage, "kind": e.kind, "message": e.message[:300]}
                   for e in result.errors],
        "answer": preview(result.answer)[0],
    })
