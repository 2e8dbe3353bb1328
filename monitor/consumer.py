"""The event consumer: Celery's event stream (`app.events.Receiver`) into the store.

Celery's own task events give queue waits (sent -> started), retries and crashes; the custom
`stagecoach-stage-outcome` event gives each stage call's outcome (errors are values, so Celery sees
SUCCESS for a failed stage), and `stagecoach-job-finished` each job's outcome and path. Every task
event whose task belongs to a job (its root id) is appended to that job's trace.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.events.receiver import EventReceiver
from pydantic import ValidationError

from contracts.events import EVENT_MODELS, LEDGER_FIELD, JobFinished, StageOutcome
from contracts.fields import problems_of
from contracts.names import JOB_FINISHED_EVENT, RUN_TASK, STAGE_OUTCOME_EVENT, STAGE_PREFIX
from monitor.report import PAIR, ErrorExample
from monitor.store import Store

log = logging.getLogger(__name__)
Event = dict[str, Any]
TRACE_FIELDS = ("uuid", "name", "hostname", "retries", "runtime", "exception", "queue", "parent_id")
RECONNECT_SECONDS = 2.0


class Consumer:
    """Feeds one store from one Celery app's events (the app passed explicitly, never current_app)."""

    def __init__(self, app: Celery, store: Store) -> None:
        self.app = app
        self.store = store
        self.receiver: EventReceiver | None = None
        self.stopped = threading.Event()
        self.seen = 0  # events received since start (the health check shows the stream is live)
        self.malformed = 0  # Stagecoach events that did not match their model (logged, skipped)
        self.live = threading.Event()  # subscribed to the event stream: events from now on are counted
        self.handlers: dict[str, Callable[[Event], None]] = {
            "task-sent": self.on_sent,
            "task-received": self.on_received,
            "task-started": self.on_started,
            "task-failed": self.on_failed,
            STAGE_OUTCOME_EVENT: self.on_own_event,
            JOB_FINISHED_EVENT: self.on_own_event,
        }

    def run(self) -> None:
        """Consume until stop(); reconnects when the broker goes away."""
        while not self.stopped.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    self.receiver = self.app.events.Receiver(connection, handlers={"*": self.handle})
                    self._watch_ready(self.receiver)
                    self.receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception:
                self.live.clear()
                if self.stopped.is_set():
                    return
                log.warning("event stream lost; reconnecting", exc_info=True)
                self.stopped.wait(RECONNECT_SECONDS)

    def _watch_ready(self, receiver: EventReceiver) -> None:
        ready = receiver.on_consume_ready

        def consuming(*args: Any, **kwargs: Any) -> None:
            ready(*args, **kwargs)
            self.live.set()

        receiver.on_consume_ready = consuming  # type: ignore[method-assign]

    def stop(self) -> None:
        self.stopped.set()
        if self.receiver is not None:
            self.receiver.should_stop = True

    def handle(self, event: Event) -> None:
        """One event; a bad event is logged and skipped, never the end of the consumer."""
        self.seen += 1
        try:
            handler = self.handlers.get(event.get("type", ""))
            if handler is not None:
                handler(event)
            if event.get("type", "").startswith("task-"):
                self.trace_task_event(event)
        except Exception:
            log.exception("could not record event %s", event.get("type"))

    # --- Celery's task events ----------------------------------------------------------------------

    def on_sent(self, event: Event) -> None:
        self.store.remember_task(event["uuid"], {"name": event.get("name"), "root_id": event.get("root_id"),
                                                 "sent": event.get("timestamp")})

    def on_received(self, event: Event) -> None:
        self.store.remember_task(event["uuid"], {"name": event.get("name"), "root_id": event.get("root_id")})

    def on_started(self, event: Event) -> None:
        task = self.store.task(event["uuid"])
        sent, name = task.get("sent"), str(task.get("name") or "")
        if sent is None or "timestamp" not in event:
            return
        wait = max(0.0, float(event["timestamp"]) - float(sent))
        if name.startswith(STAGE_PREFIX):
            self.store.sample("waits", "stage", name[len(STAGE_PREFIX):], wait)
        elif name == RUN_TASK:
            self.store.remember_task(event["uuid"], {"wait": wait})

    def on_failed(self, event: Event) -> None:
        """A stage task that raised (a crash, a hard time limit): a failure of kind `exception`. Not the
        events the job ledger sends to end a failed job's tasks in Flower: their stage is counted already."""
        if event.get(LEDGER_FIELD):
            return
        task = self.store.task(event["uuid"])
        name = str(task.get("name") or "")
        if not name.startswith(STAGE_PREFIX):
            return
        stage = name[len(STAGE_PREFIX):]
        at = float(event.get("timestamp") or time.time())
        self.store.count("stage", stage, runs=1, failed=1, **{"fail:exception": 1})
        self.store.tick("stage", stage, at, True, None)
        example = ErrorExample(job_id=str(task.get("root_id") or ""), message=str(event.get("exception")), at=at)
        self.store.error_example(stage, "exception", example)

    def trace_task_event(self, event: Event) -> None:
        task = self.store.task(event.get("uuid", ""))
        job_id = event.get("root_id") or task.get("root_id")
        if not job_id:
            return
        entry = {k: event[k] for k in TRACE_FIELDS if event.get(k) is not None}
        entry.setdefault("name", task.get("name"))
        self.store.trace_event(str(job_id), {"type": event["type"], "timestamp": event.get("timestamp"), **entry})

    # --- Stagecoach's own events (typed: contracts/events.py) ---------------------------------------

    def on_own_event(self, event: Event) -> None:
        """A Stagecoach event, validated against its model: a malformed one is counted and logged."""
        try:
            parsed = EVENT_MODELS[event["type"]].model_validate(event)
        except ValidationError as error:
            self.malformed += 1
            log.warning("malformed %s event skipped (%d so far): %s", event.get("type"), self.malformed,
                        "; ".join(str(p) for p in problems_of(error))[:500])
            return
        if isinstance(parsed, StageOutcome):
            self.on_stage_outcome(parsed, event)
        elif isinstance(parsed, JobFinished):
            self.on_job_finished(parsed, event)

    def on_stage_outcome(self, event: StageOutcome, raw: Event) -> None:
        stage, pipeline, at = event.stage, event.pipeline, float(raw.get("timestamp") or event.at)
        shared = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                  "cache_hits": 1 if event.cached else 0}
        if event.outcome == "retry":
            self.store.count("stage", stage, retries=1)
            self.store.count("pipeline", pipeline, retries=1)
        elif event.outcome == "skipped":
            self.store.count("stage", stage, skipped=1)
        elif event.outcome == "ok":
            self._stage_ok(event, at, shared)
        else:
            self._stage_error(event, at, shared)
        self.store.trace_event(event.job_id, {**raw, "type": "stage-outcome"})

    def _stage_ok(self, event: StageOutcome, at: float, shared: dict[str, Any]) -> None:
        stage, pipeline, seconds = event.stage, event.pipeline, event.seconds or 0.0
        sizes = {"input_bytes": event.input_bytes, "output_bytes": event.output_bytes}
        self.store.count("stage", stage, runs=1, succeeded=1, **shared, **sizes)
        self.store.count("pair", stage + PAIR + pipeline, runs=1, succeeded=1)
        self.store.count("pipeline", pipeline, **shared, **sizes)
        self.store.sample("samples", "stage", stage, seconds)
        self.store.tick("stage", stage, at, False, seconds)

    def _stage_error(self, event: StageOutcome, at: float, shared: dict[str, Any]) -> None:
        stage, pipeline, kind = event.stage, event.pipeline, event.kind or "stage"
        self.store.count("stage", stage, runs=1, failed=1, input_bytes=event.input_bytes, **shared,
                         **{f"fail:{kind}": 1})
        self.store.count("pipeline", pipeline, **shared)
        self.store.count("pair", stage + PAIR + pipeline, runs=1, failed=1, **{f"fail:{kind}": 1})
        self.store.tick("stage", stage, at, True, None)
        example = ErrorExample(job_id=event.job_id, node=event.node, pipeline=pipeline, message=event.message or "",
                               at=at)
        self.store.error_example(stage, kind, example)

    def _version_figures(self, name: str, at: float, failed: bool, seconds: float) -> None:
        """The same job counted again per pipeline version (`qa@2`): versions served side by side."""
        self.store.count("version", name, runs=1, failed=int(failed), succeeded=int(not failed))
        if not failed:
            self.store.sample("samples", "version", name, seconds)
        self.store.tick("version", name, at, failed, None if failed else seconds)

    def on_job_finished(self, event: JobFinished, raw: Event) -> None:
        pipeline, at = event.pipeline, float(raw.get("timestamp") or event.at)
        failed = event.state != "succeeded"
        if failed:
            kind = event.kind or "pipeline"
            self.store.count("pipeline", pipeline, runs=1, failed=1, **{f"fail:{kind}": 1})
            example = ErrorExample(job_id=event.job_id, node=event.error_node or "", pipeline=pipeline,
                                   message=event.message or "", at=at)
            self.store.error_example(f"pipeline:{pipeline}", kind, example)
        else:
            self.store.count("pipeline", pipeline, runs=1, succeeded=1)
            self.store.sample("samples", "pipeline", pipeline, event.seconds)
        self.store.tick("pipeline", pipeline, at, failed, None if failed else event.seconds)
        if event.version:
            self._version_figures(f"{pipeline}@{event.version}", at, failed, event.seconds)
        wait = self.store.task(event.job_id).get("wait")
        if wait is not None:
            self.store.sample("waits", "pipeline", pipeline, float(wait))
        self.store.trace_event(event.job_id, {**raw, "type": "job-finished"})
