"""Quarantine for messages no worker can run.

Each one goes to a bounded dead-letter list in Redis (reason, task id, raw bytes), and whoever
waits on the task the message named gets a failed result instead of waiting forever: a failed
JobResult for `pipeline.run` and for the job (root id) a stage message belonged to.
"""

import json
import logging
import time

import redis
from celery import Celery
from celery.result import AsyncResult

from contracts.deadletters import DeadLetter
from contracts.envelope import ErrorRecord
from contracts.jobs import JobResult
from contracts.names import DEAD_LETTER_KEY, RUN_TASK
from workers.errors import PoisonMessageError
from workers.jobs import JobStore

log = logging.getLogger(__name__)
MAX_RAW_BYTES = 64 * 1024  # raw bytes kept per dead letter; the size field tells the whole length


class DeadLetterStore:
    """A capped Redis list of DeadLetter JSON entries, newest first."""

    def __init__(self, client: redis.Redis, max_entries: int = 1000) -> None:
        self.client = client
        self.max_entries = max_entries

    def add(self, letter: DeadLetter) -> None:
        pipe = self.client.pipeline()
        pipe.lpush(DEAD_LETTER_KEY, letter.model_dump_json())
        pipe.ltrim(DEAD_LETTER_KEY, 0, self.max_entries - 1)
        pipe.execute()

    def entries(self, limit: int | None = None) -> list[DeadLetter]:
        raw = self.client.lrange(DEAD_LETTER_KEY, 0, -1 if limit is None else limit - 1)
        return [DeadLetter.model_validate_json(item) for item in raw]

    def get(self, letter_id: str) -> DeadLetter | None:
        found = [e for e in self.entries() if e.id == letter_id or e.id.startswith(letter_id)]
        return found[0] if len(found) == 1 else None

    def remove(self, letter_id: str) -> bool:
        for item in self.client.lrange(DEAD_LETTER_KEY, 0, -1):
            if DeadLetter.model_validate_json(item).id == letter_id:
                return bool(self.client.lrem(DEAD_LETTER_KEY, 1, item))  # type: ignore[arg-type]
        return False


def quarantine(app: Celery | None, store: DeadLetterStore, letter: DeadLetter) -> None:
    """Dead-letter the message and fail whoever waits on it; never raises (the consumer must live)."""
    log.error("dead-lettered a message from %s: %s (task %s, id %s)", letter.queue, letter.reason,
              letter.task, letter.task_id)
    try:
        store.add(letter)
        if app is not None:
            fail_waiters(app, letter)
    except Exception:  # a broker outage here must not take the consumer down with it
        log.exception("could not record dead letter %s", letter.id)


def fail_waiters(app: Celery, letter: DeadLetter) -> None:
    if letter.task_id:
        _fail_task(app, letter.task_id, letter.task, letter.reason)
    if letter.root_id and letter.root_id != letter.task_id:
        _fail_job(app, letter.root_id, letter.reason)


def _fail_task(app: Celery, task_id: str, task: str | None, reason: str) -> None:
    if AsyncResult(task_id, app=app).ready():
        return  # a duplicate of a message that already ran: its result stands
    if task == RUN_TASK:
        _fail_job(app, task_id, reason)
        return
    app.backend.mark_as_failure(task_id, PoisonMessageError(f"message dead-lettered: {reason}"))


def _fail_job(app: Celery, job_id: str, reason: str) -> None:
    if AsyncResult(job_id, app=app).ready():
        return
    jobs = JobStore(redis.Redis.from_url(app.conf.result_backend), app.conf.result_expires)
    status = jobs.status(job_id)
    result = poisoned_result(job_id, status.pipeline or "", reason)
    app.backend.store_result(job_id, result.model_dump(mode="json"), "SUCCESS")
    jobs.finished(job_id, "failed")


def poisoned_result(job_id: str, pipeline: str, reason: str) -> JobResult:
    record = ErrorRecord(node="", kind="message", error_type="PoisonMessageError",
                         message=f"message dead-lettered: {reason} (see `stagecoach dead-letters`)")
    return JobResult(job_id=job_id, pipeline=pipeline, pipeline_version="", state="failed", error=record,
                     errors=[record], finished_at=time.time())


def describe(raw: bytes) -> str:
    """A short printable preview of raw message bytes, for listings."""
    text = raw[:120].decode("utf-8", errors="replace")
    return json.dumps(text)[1:-1]
