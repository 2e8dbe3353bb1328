"""Job status records in Redis: which stage a job is in, readable by any client."""

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from contracts.connections import SentinelSettings, redis_client
from contracts.jobs import JobState, JobStatus
from contracts.names import JOBS_INDEX_KEY, job_fields_key, job_key, open_jobs_key, pipeline_jobs_key
from contracts.webhooks import WebhookDelivery

MISSING = object()
LIST_BATCH = 200  # index entries read per round trip while listing


@dataclass(frozen=True)
class Cursor:
    """Where a page of the job listing ended: the last job's submit time and id (ties: by id, as Redis orders)."""

    score: float
    job_id: str

    def covers(self, job_id: str, score: float) -> bool:
        """Whether an index entry came on this page or an earlier one (newest first, ties by id descending)."""
        return score > self.score or (score == self.score and job_id >= self.job_id)

    def dump(self) -> str:
        return f"{self.score!r}:{self.job_id}"

    @classmethod
    def load(cls, text: str) -> "Cursor":
        score, sep, job_id = text.partition(":")
        if not sep or not job_id:
            raise ValueError("expected the `next_cursor` of a listing page")
        return cls(float(score), job_id)


class JobStore:
    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    @classmethod
    def from_url(cls, url: str, ttl_seconds: int, sentinel: SentinelSettings | None = None) -> "JobStore":
        return cls(redis_client(url, sentinel), ttl_seconds)

    def queued(self, job_id: str, pipeline: str, pipe: "redis.client.Pipeline | None" = None) -> None:
        """Each field written only where absent: the client records the status after sending the job,
        whose first stage may have begun already. With `pipe`, queued on the caller's pipeline (the
        client's one round trip per job)."""
        now = time.time()
        fields = {"state": "queued", "pipeline": pipeline, "submitted_at": now, "updated_at": now}
        own = pipe is None
        pipe = self.client.pipeline() if pipe is None else pipe
        for name, value in encoded(fields).items():
            pipe.hsetnx(job_key(job_id), name, value)
        pipe.expire(job_key(job_id), self.ttl)
        if own:
            pipe.execute()

    def entered(self, job_id: str, node: str, stage: str | None) -> None:
        self._update(job_id, {"state": "running", "node": node, "stage": stage})

    def left(self, job_id: str) -> None:
        self.client.hincrby(job_key(job_id), "stages_done", 1)

    def status(self, job_id: str) -> JobStatus:
        return _status(job_id, self.client.hgetall(job_key(job_id)))

    def webhook(self, job_id: str, delivery: WebhookDelivery) -> None:
        """The state of the job's completion webhook, shown in its status."""
        self._write(job_id, {"webhook": delivery.model_dump(mode="json")})

    def backlog(self, pipeline: str) -> int:
        """Jobs of `pipeline` started and not ended yet (the ledger keeps the set at start and close)."""
        return int(self.client.zcard(open_jobs_key(pipeline)))

    def listing(self, pipeline: str | None, state: JobState | None, since: float | None, limit: int,
                cursor: Cursor | None) -> tuple[list[JobStatus], "Cursor | None"]:
        """Jobs newest first (by submit time) from the index the ledger keeps at start, filtered by pipeline,
        state and submit time; at most `limit`, and the cursor of the next page (None: no more)."""
        key = pipeline_jobs_key(pipeline) if pipeline else JOBS_INDEX_KEY
        found: list[JobStatus] = []
        last = Cursor(0.0, "")
        top: float | str = cursor.score if cursor else "+inf"
        floor = since if since is not None else "-inf"
        offset = 0
        while True:
            batch = self.client.zrevrangebyscore(key, top, floor, start=offset, num=LIST_BATCH, withscores=True)
            if not batch:
                return found, None
            offset += len(batch)
            entries = [(_text(member), float(score)) for member, score in batch]  # type: ignore[str-unpack,arg-type]
            entries = [e for e in entries if cursor is None or not cursor.covers(*e)]
            for status, (job_id, score) in zip(self._statuses([j for j, _ in entries]), entries, strict=True):
                if status.state == "unknown" or (state is not None and status.state != state):
                    continue
                if len(found) == limit:
                    return found, last
                found.append(status)
                last = Cursor(score, job_id)

    def _statuses(self, job_ids: list[str]) -> list[JobStatus]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [_status(job_id, raw) for job_id, raw in zip(job_ids, pipe.execute(), strict=True)]

    def publish(self, job_id: str, fields: dict[str, Any]) -> None:
        """Answer fields that are final already, readable before the job ends (`JobHandle.output`)."""
        if not fields:
            return
        key = job_fields_key(job_id)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def published(self, job_id: str, field: str) -> Any:
        """A published field's value, or MISSING."""
        raw = self.client.hget(job_fields_key(job_id), field)
        return MISSING if raw is None else json.loads(raw)

    def _update(self, job_id: str, fields: dict[str, Any]) -> None:
        self._write(job_id, {**fields, "updated_at": time.time()})

    def _write(self, job_id: str, fields: dict[str, Any]) -> None:
        key = job_key(job_id)
        mapping: dict[Any, Any] = encoded(fields)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.ttl)
        pipe.execute()


def running_fields(node: str, stage: str | None) -> dict[str, str]:
    """The status of a job entering `node`, encoded for a script that writes it (workers/checkpoint.py)."""
    return encoded({"state": "running", "node": node, "stage": stage, "updated_at": time.time()})


def finished_fields(state: JobState) -> dict[str, str]:
    """The final status of a job, encoded for the script that closes it."""
    return encoded({"state": state, "node": None, "stage": None, "updated_at": time.time()})


def encoded(fields: dict[str, Any]) -> dict[str, str]:
    """Status fields as stored: each value JSON (what `status` reads back)."""
    return {k: json.dumps(v) for k, v in fields.items()}


def _status(job_id: str, raw: dict[Any, Any]) -> JobStatus:
    if not raw:
        return JobStatus(job_id=job_id, state="unknown")
    return JobStatus(job_id=job_id, **{_text(k): json.loads(v) for k, v in raw.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
