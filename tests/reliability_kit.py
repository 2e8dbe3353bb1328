"""Helpers shared by the reliability and chaos tests: raw broker messages and a private fleet."""

import base64
import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.stack import redis_binary
from contracts.connections import redis_client
from contracts.deadletters import DeadLetter
from contracts.jobs import JobResult
from contracts.names import DEAD_LETTER_KEY, ROUTING_QUEUE, WATCH_KEY, stage_queue
from routing.client import JobHandle
from routing.errors import JobTimeoutError
from tests.services import Fleet, default_catalog, free_port, reachable, worker_env

JSON = "application/json"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def headers(task: str, task_id: str, **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
            "retries": 0, "eta": None, "expires": None, **extra}


def message(queue: str, head: dict[str, Any] | Any, body: Any, content_type: str = JSON,
            encoding: str = "base64", raw_body: str | None = None) -> dict[str, Any]:
    """A broker message as kombu's Redis transport stores it; `body` is JSON-encoded then base64'd."""
    encoded = raw_body if raw_body is not None else base64.b64encode(
        body if isinstance(body, bytes) else json.dumps(body).encode()).decode()
    return {"body": encoded, "content-encoding": "utf-8", "content-type": content_type, "headers": head,
            "properties": {"correlation_id": "c", "delivery_mode": 2, "priority": 0, "body_encoding": encoding,
                           "delivery_tag": str(uuid.uuid4()),
                           "delivery_info": {"exchange": "", "routing_key": queue}}}


def run_message(job_id: str, request: Any, **extra: Any) -> dict[str, Any]:
    return message(ROUTING_QUEUE, headers("pipeline.run", job_id, **extra), [[request], {}, EMBED])


def letters(db: redis.Redis) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(item) for item in db.lrange(DEAD_LETTER_KEY, 0, -1)]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `check` returns something truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: not seen after {timeout}s")


RELIABILITY_PIPELINES = Path(__file__).resolve().parent / "pipelines_reliability"
QA_STAGES = ("key_terms", "answer")


def catalog_paths() -> list[Path]:
    return [*default_catalog(), RELIABILITY_PIPELINES]


@contextmanager
def qa_fleet(redis_url: str, lm_url: str, pool: str = "threads", copies: int = 1,
             stages: tuple[str, ...] = QA_STAGES, shared: tuple[str, ...] = (), **env: str) -> Iterator[Fleet]:
    """Routing worker plus workers for `stages` (default: qa's) on a Redis of the caller's own, and one
    worker consuming every queue of the `shared` stages."""
    logdir = Path(tempfile.mkdtemp(prefix="stagecoach-reliability-"))
    fleet = Fleet(worker_env(redis_url, lm_url, catalog_paths(), **env), logdir)
    fleet.start("routing", [ROUTING_QUEUE], concurrency=4)
    for copy in range(copies):
        for stage in stages:
            fleet.start(f"{stage}-{copy}", [stage_queue(stage)], pool=pool, concurrency=2)
    if shared:
        fleet.start("shared", [stage_queue(stage) for stage in shared], pool=pool, concurrency=4)
    try:
        fleet.wait_ready()
        yield fleet
    finally:
        fleet.stop()


class RestartableRedis:
    """A private redis-server with AOF on a fixed free port, which a test may stop and start again."""

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="stagecoach-aof-")
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "yes", "--appendfsync", "always", "--dir", self.dir,
               *(["--requirepass", self.password] if self.password else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: reachable(self.url), 20, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None


@contextmanager
def restartable_redis(password: str | None = None) -> Iterator[RestartableRedis]:
    server = RestartableRedis(password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def collect(handles: list[JobHandle], timeout: float, redis_url: str, logdir: Path) -> list[JobResult]:
    """Every job's result; a job not finished within `timeout` fails the test with its post-mortem (its keys in
    Redis and the log lines naming it), read before the private Redis goes away."""
    results = []
    for handle in handles:
        try:
            results.append(handle.get(timeout=timeout))
        except JobTimeoutError:
            pytest.fail(f"job {handle.id} not finished after {timeout}s\n{post_mortem(redis_url, handle.id, logdir)}")
    return results


def post_mortem(redis_url: str, job_id: str, logdir: Path, lines: int = 60) -> str:
    """What Redis and the fleet's logs hold about one job: every key naming it (with its content) and the log
    lines that mention it. Printed when a chaos run loses sight of a job, so the failure explains itself."""
    db = redis_client(redis_url, decode_responses=True)
    report = [f"--- post-mortem of job {job_id}"]
    for key in sorted(db.scan_iter(match=f"*{job_id}*")):
        report.append(f"{key!s} ({db.type(key)!s}, ttl {db.ttl(key)}): {_key_content(db, str(key))[:2000]}")
    report.append(f"watch score: {db.zscore(WATCH_KEY, job_id)}")
    for path in sorted(logdir.glob("*.out")) + sorted(logdir.glob("*.log")):
        hits = [line for line in path.read_text(errors="replace").splitlines() if job_id in line]
        report.extend(f"{path.name}: {line[:400]}" for line in hits[:lines])
    return "\n".join(report)


def _key_content(db: redis.Redis, key: str) -> str:
    kind = str(db.type(key))
    if kind == "string":
        return str(db.get(key))
    if kind == "hash":
        return json.dumps(db.hgetall(key))
    if kind == "list":
        return json.dumps(db.lrange(key, 0, -1))
    if kind == "stream":
        return json.dumps([fields for _, fields in db.xrange(key) or []])
    if kind == "zset":
        return json.dumps(db.zrange(key, 0, -1, withscores=True))
    return kind
