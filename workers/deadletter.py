"""Quarantine for messages no worker can run.

Each one goes to a bounded dead-letter list in Redis (reason, task id, raw bytes), and whoever
waits on the task the message named gets a failed result instead of waiting forever: the job the
message belonged to (root id; a `pipeline.run` message's own id) ends as dead-lettered through the
job ledger's one close (workers/ledger.py).
"""

import json
import logging

import redis
from celery.result import AsyncResult

from contracts.deadletters import DeadLetter
from contracts.envelope import ErrorRecord
from contracts.names import DEAD_LETTER_KEY, RUN_TASK
from workers.errors import PoisonMessageError
from workers.events import task_failed_event
from workers.ledger import Closer, Ledger

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


def quarantine(ledger: Ledger | None, store: DeadLetterStore, letter: DeadLetter, hostname: str | None) -> None:
    """Dead-letter the message and end whoever waits on it; never raises (the consumer must live)."""
    log.error("dead-lettered a message from %s: %s (task %s, id %s)", letter.queue, letter.reason,
              letter.task, letter.task_id)
    try:
        store.add(letter)
        if ledger is not None:
            fail_waiters(ledger, letter, hostname)
    except Exception:  # a broker outage here must not take the consumer down with it
        log.exception("could not record dead letter %s", letter.id)


def fail_waiters(ledger: Ledger, letter: DeadLetter, hostname: str | None) -> None:
    """The job the message belonged to (a `pipeline.run` message's own id, else its root id, when that is a
    job the ledger started) ends as dead-lettered through the ledger's one close; a waiter on any other
    task the message named gets that task's failure, as Celery would give it."""
    job_id = (letter.task_id if letter.task == RUN_TASK else None) or letter.root_id
    if job_id and (letter.task == RUN_TASK or ledger.request(job_id) is not None):
        ledger.fail(job_id, poisoned_record(letter.reason), Closer(hostname, letter.task_id, letter.task))
    else:
        job_id = None
    if letter.task_id and letter.task_id != job_id and not AsyncResult(letter.task_id, app=ledger.app).ready():
        error = PoisonMessageError(f"message dead-lettered: {letter.reason}")
        ledger.app.backend.mark_as_failure(letter.task_id, error)
        if job_id is None:  # else the ledger's close told Flower how this task ended, naming the job's error
            task_failed_event(ledger.app, hostname, letter.task_id, repr(error), {"name": letter.task})


def poisoned_record(reason: str) -> ErrorRecord:
    return ErrorRecord(node="", kind="message", error_type="PoisonMessageError",
                       message=f"message dead-lettered: {reason} (see `stagecoach dead-letters`)")


def describe(raw: bytes) -> str:
    """A short printable preview of raw message bytes, for listings."""
    text = raw[:120].decode("utf-8", errors="replace")
    return json.dumps(text)[1:-1]
