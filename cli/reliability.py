"""Operator controls for jobs and messages: dead letters (list, replay), cancel, resume."""

import json
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis

from cli import render
from contracts.connections import redis_client
from contracts.deadletters import DeadLetter
from contracts.names import RUN_TASK
from workers.deadletter import DeadLetterStore, describe
from workers.settings import Settings

if TYPE_CHECKING:
    from routing.recovery import Recovery
    from workers.ledger import Ledger


class ReplayError(ValueError):
    """A dead letter that cannot be replayed; the message says why."""


def store(settings: Settings) -> DeadLetterStore:
    return DeadLetterStore(redis_client(settings.backend_url, settings.sentinel), settings.dead_letter_max)


def show_dead_letters(letters: list[DeadLetter], as_json: bool) -> None:
    if as_json:
        render.print_json([letter.model_dump(mode="json") for letter in letters])
        return
    rows = [(letter.id[:12], datetime.fromtimestamp(letter.at, UTC).strftime("%Y-%m-%d %H:%M:%S"), letter.queue,
             letter.task or "-", (letter.task_id or "-")[:12], letter.reason, f"{letter.size}",
             describe(letter.raw)) for letter in letters]
    render.out.print(render.rows_table(f"dead letters ({len(letters)})",
                                       ("id", "at (UTC)", "queue", "task", "task id", "reason", "bytes", "raw"), rows))


def replay(settings: Settings, letter_id: str, queue: str | None) -> DeadLetter:
    """Push a dead letter's raw message back onto its queue (a fresh delivery tag) and drop the entry."""
    letters = store(settings)
    letter = letters.get(letter_id)
    if letter is None:
        raise ReplayError(f"no single dead letter with id '{letter_id}' (see `stagecoach dead-letters`)")
    if letter.source != "broker":
        raise ReplayError(f"dead letter {letter.id} holds a task's refused arguments, not a broker message")
    if letter.truncated:
        raise ReplayError(f"dead letter {letter.id} kept only part of its {letter.size} bytes; cannot replay")
    target = queue or letter.queue
    if not target:
        raise ReplayError(f"dead letter {letter.id} names no queue; pass --queue")
    if not settings.broker_is_redis:
        raise ReplayError("replay pushes onto Redis queues; this broker is not Redis")
    job_id = (letter.task_id if letter.task == RUN_TASK else None) or letter.root_id
    if job_id:  # the job its dead-lettering ended is open again, so the replayed run can end it
        _ledger(settings).reopen(job_id)
    redis_client(settings.broker_url, settings.sentinel).lpush(target, refreshed(letter.raw))
    letters.remove(letter.id)
    return letter


def refreshed(raw: bytes) -> bytes:
    """The message with a new delivery tag (the old one may still sit in the broker's unacked set)."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if isinstance(payload, dict) and isinstance(payload.get("properties"), dict):
        payload["properties"]["delivery_tag"] = str(uuid.uuid4())
        return json.dumps(payload).encode()
    return raw


def _ledger(settings: Settings) -> "Ledger":
    from workers.factory import create_runtime

    return create_runtime(settings).ledger


def recovery(settings: Settings) -> "Recovery":
    from routing.recovery import Recovery
    from workers.factory import create_runtime

    runtime = create_runtime(settings)
    return Recovery(runtime.app, runtime.catalog, runtime.ledger, settings.watchdog_max_redispatches,
                    settings.watchdog_backlog_seconds, settings.sentinel)


def watch(settings: Settings, interval: float, once: bool) -> None:
    """Sweep for stalled jobs every `interval` seconds (until interrupted), printing what it did."""
    from routing.recovery import OUTAGES, sweep

    carer = recovery(settings)  # builds the app without touching Redis
    render.err.print(f"watchdog: a running step's lease is {settings.lease_seconds:g}s; a job between steps gets "
                     f"{settings.watchdog_stall_seconds:g}s; sweeping every {interval:g}s", highlight=False)
    while True:
        try:
            for job_id, action in sweep(carer):
                render.out.print(f"{datetime.now(UTC):%H:%M:%S} job {job_id}: {action}", highlight=False)
        except (redis.RedisError, *OUTAGES) as error:  # Redis or the broker restarting or failing over: next sweep
            render.err.print(f"watchdog: Redis unavailable ({error}); retrying", highlight=False)
            if once:
                raise
        if once:
            return
        time.sleep(interval)
