"""Job status records in Redis: which stage a job is in, readable by any client."""

import json
import time
from typing import Any

import redis

from contracts.jobs import JobState, JobStatus
from contracts.names import job_fields_key, job_key

MISSING = object()


class JobStore:
    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    @classmethod
    def from_url(cls, url: str, ttl_seconds: int) -> "JobStore":
        return cls(redis.Redis.from_url(url), ttl_seconds)

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
        raw = self.client.hgetall(job_key(job_id))
        if not raw:
            return JobStatus(job_id=job_id, state="unknown")
        fields = {_text(k): json.loads(v) for k, v in raw.items()}
        return JobStatus(job_id=job_id, **fields)

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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
