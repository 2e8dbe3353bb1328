"""Sending events: Stagecoach's own (contracts/events.py) and the terminal Celery task events that
tell Flower how a job ended.

Errors are values, so a failed job's tasks return normally and Celery itself would report SUCCESS;
the job ledger (workers/ledger.py) therefore ends those tasks itself: their task raises Celery's
`Ignore` (which sends no event) and the ledger sends `task-failed` (with the error as the exception
text) or `task-revoked` here. Sending is best effort and off the task's path: an event must never
fail a stage, and the next hop does not wait for the monitor's publish.
"""

import atexit
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from contracts.events import LEDGER_FIELD, StagecoachEvent, event_name
from contracts.jobs import JobResult

log = logging.getLogger(__name__)

def local_hostname(role: str) -> str:
    """The event hostname of a process that is not a worker (client, watchdog): `role@host`."""
    return f"{role}@{socket.gethostname()}"


@dataclass(frozen=True)
class Outgoing:
    app: Celery
    hostname: str | None
    task_id: str | None
    event: str
    fields: dict[str, Any]


class EventSender:
    """One thread per process publishing events in the order they were sent, on its own dispatcher
    (Celery's `Task.send_event` builds and closes a dispatcher per event). At exit it gets
    FLUSH_SECONDS to send what is queued; a broker error drops that one event."""

    FLUSH_SECONDS = 2.0

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Outgoing | None] = queue.SimpleQueue()
        self._dispatchers: dict[tuple[int, str | None], Any] = {}
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="stagecoach-events", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def put(self, item: Outgoing) -> None:
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

    def _publish(self, item: Outgoing) -> None:
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


def sender() -> EventSender:
    """This process's sender (a forked pool child starts its own: threads do not survive a fork)."""
    pid = os.getpid()
    with _senders_lock:
        if pid not in _senders:
            _senders[pid] = EventSender()
        return _senders[pid]


def send(app: Celery, hostname: str | None, task_id: str | None, event: StagecoachEvent) -> None:
    """One of Stagecoach's own events, typed."""
    sender().put(Outgoing(app, hostname, task_id, event_name(event), event.payload()))


def end_task_event(app: Celery, hostname: str | None, task_id: str, result: JobResult,
                   extra: dict[str, Any] | None = None) -> None:
    """The Celery event that ends task `task_id` in Flower as the job ended: SUCCESS, FAILURE with the
    error as its exception text, or REVOKED for a cancelled job."""
    runtime = (result.finished_at or time.time()) - (result.submitted_at or time.time())
    fields: dict[str, Any] = {LEDGER_FIELD: True, **(extra or {})}
    if result.ok:
        event, fields = "task-succeeded", {**fields, "result": f"job {result.state}", "runtime": runtime}
    elif result.ending == "cancelled":
        event, fields = "task-revoked", {**fields, "terminated": False, "expired": False, "signum": None}
    else:
        return task_failed_event(app, hostname, task_id, failure_text(result), extra)
    sender().put(Outgoing(app, hostname, task_id, event, fields))


def task_failed_event(app: Celery, hostname: str | None, task_id: str, exception: str,
                      extra: dict[str, Any] | None = None) -> None:
    """`task-failed` for a task whose failure Celery itself does not report (it ended with Ignore)."""
    fields = {LEDGER_FIELD: True, **(extra or {}), "exception": exception, "traceback": ""}
    sender().put(Outgoing(app, hostname, task_id, "task-failed", fields))


def failure_text(result: JobResult) -> str:
    """A failed job's error as Flower shows it: `JobFailed(kind, stage 'x' at node 'y': message)`."""
    error = result.error
    if error is None:
        return "JobFailed('no error recorded')"
    where = f"stage '{error.stage}' at node '{error.node}'" if error.stage else f"node '{error.node or '-'}'"
    return f"JobFailed({error.kind}, {where}: {error.message[:1000]})"
