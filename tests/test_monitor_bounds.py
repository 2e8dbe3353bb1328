"""Monitor traces stay within STAGECOACH_MONITOR_TRACES on a real fleet and a real monitor (issue 18): 200
jobs at a bound of 50 leave at most 50 trace lists, each expiring, each its job's whole trace (capped at
STAGECOACH_MONITOR_TRACE_EVENTS), none for a job that fell out of the index. This module's own Redis."""

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from contracts.names import ROUTING_QUEUE, RUN_TASK, monitor_key
from routing.client import Client
from tests import monitor_services as ms
from tests.services import Fleet, client_for, wait_until, worker_env

TRACES = 50
TRACE_EVENTS = 10
QA_EVENTS = 6  # a qa job's events on the stream: queued, 2 x (started, outcome), finished
JOBS = 200


@pytest.fixture(scope="module")
def redis_url(private_redis: str) -> str:
    return private_redis


@pytest.fixture(scope="module")
def monitored(redis_url: str, lm_url: str) -> Iterator[str]:
    """The `qa` stages' workers and a monitor keeping 50 traces of at most 10 events."""
    logdir = Path(tempfile.mkdtemp(prefix="stagecoach-monitor-bounds-"))
    fleet = Fleet(worker_env(redis_url, lm_url), logdir)
    fleet.start_per_stage(["key_terms", "answer"])
    try:
        fleet.wait_ready()
        with ms.monitor_service(redis_url, lm_url, logdir, STAGECOACH_MONITOR_TRACES=str(TRACES),
                                STAGECOACH_MONITOR_TRACE_EVENTS=str(TRACE_EVENTS)) as url:
            yield url
    finally:
        fleet.stop()


def trace_keys(db: redis.Redis) -> set[str]:
    return {str(key) for key in db.scan_iter(match=monitor_key("trace", "*"), count=1000)}


def qa_runs(url: str) -> int:
    pipelines = ms.get_json(f"{url}/api/stats")["pipelines"]
    return sum(int(p["runs"]) for p in pipelines if p["name"] == "qa")


def settled(db: redis.Redis) -> set[str]:
    """The trace keys once they stop changing (a job's last task events follow its job-finished event)."""
    last: set[str] = set()
    stable_since = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        keys = {f"{key}:{db.llen(key)}" for key in trace_keys(db)}
        if keys != last:
            last, stable_since = keys, time.monotonic()
        elif time.monotonic() - stable_since > 3:
            break
        time.sleep(0.3)
    return trace_keys(db)


def test_200_jobs_leave_at_most_the_bound_of_traces(monitored: str, redis_url: str, lm_url: str) -> None:
    client: Client = client_for(redis_url, lm_url)
    app: Celery = client.app
    handles = [client.submit("qa", {"question": f"Bounded trace {i}?"}) for i in range(JOBS // 2)]
    sent = [app.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": {"question": f"By name {i}?"}}],
                          queue=ROUTING_QUEUE) for i in range(JOBS // 2)]
    assert all(h.get(timeout=300).ok for h in handles)
    assert all(s.get(timeout=300)["state"] == "succeeded" for s in sent)
    wait_until(lambda: qa_runs(monitored) == JOBS, 120, "the monitor counting every job")

    db = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = settled(db)
    indexed = {monitor_key("trace", str(job)) for job in db.zrange(monitor_key("jobs"), 0, -1)}
    assert len(indexed) == TRACES
    assert keys == indexed, f"{len(keys)} trace lists for {len(indexed)} indexed jobs"
    assert all(0 < db.ttl(key) <= 7 * 24 * 3600 for key in keys)
    lengths = [db.llen(key) for key in keys]
    assert set(lengths) == {QA_EVENTS}  # each kept trace is its job's whole trace (the cap: test_monitor_units)
    finished = [key for key in keys if any('"job-finished"' in str(e) for e in db.lrange(key, 0, -1))]
    assert len(finished) == len(keys), "a kept trace lacks its job's end: it lost events to an eviction"
    assert monitor_key("trace", handles[0].id) not in keys  # the first job fell out long ago
