"""The monitor on the fleet's event stream, with real workers, a real private Redis and real monitor processes:
a monitor killed and started again after jobs ran meanwhile catches up with exact counts, and two replicas
sharing the stream count every event once (each counts some, together all)."""

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts.events import JobFinished, parse_event
from contracts.names import EVENTS_STREAM, MONITOR_GROUP
from routing.client import Client
from tests import monitor_services as ms
from tests.services import Fleet, client_for, per_stage_fleet, wait_until, worker_env

EVENTS_PER_QA_JOB = 6  # queued, 2 x (stage started, stage outcome), finished
# a killed replica's unacknowledged events are taken over after this many seconds
MONITOR_ENV = {"STAGECOACH_MONITOR_CLAIM_IDLE_SECONDS": "2", "STAGECOACH_MONITOR_BATCH": "20"}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monitor-stream")


@pytest.fixture(scope="module")
def fleet(private_redis: str, lm_url: str, logdir: Path) -> Iterator[Fleet]:
    with per_stage_fleet(worker_env(private_redis, lm_url), logdir, ["key_terms", "answer"]) as own:
        yield own


@pytest.fixture(scope="module")
def client(private_redis: str, lm_url: str, fleet: Fleet) -> Client:
    return client_for(private_redis, lm_url)


@pytest.fixture
def fresh(private_redis: str) -> redis.Redis:
    """No monitor state and no event stream from an earlier test."""
    r = redis.Redis.from_url(private_redis, decode_responses=True)
    r.delete(EVENTS_STREAM)
    for key in r.scan_iter(match="stagecoach:monitor:*"):
        r.delete(key)
    return r


def run_jobs(client: Client, n: int, tag: str) -> None:
    handles = [client.submit("qa", {"question": f"Why do tides turn ({tag} {i} {uuid.uuid4().hex[:6]})?"})
               for i in range(n)]
    for handle in handles:
        assert handle.get(timeout=120).ok


def stats(url: str) -> tuple[int, int, int]:
    """(jobs counted for qa, stage calls counted, job-finished events in the traces' pipeline runs)."""
    report = ms.get_json(f"{url}/api/stats")
    qa = [p for p in report["pipelines"] if p["name"] == "qa"]
    return (qa[0]["runs"] if qa else 0, sum(s["runs"] for s in report["stages"]),
            sum(p["succeeded"] for p in report["pipelines"]))


def settled(r: redis.Redis) -> bool:
    """Every event on the stream read and acknowledged by the monitor's group."""
    group = next((g for g in r.xinfo_groups(EVENTS_STREAM) if g["name"] == MONITOR_GROUP), None)
    return group is not None and group["pending"] == 0 and group.get("lag") == 0


def finished_on_stream(r: redis.Redis) -> int:
    """JobFinished events the stream still holds (nothing trims it while no monitor reads)."""
    entries: Any = r.xrange(EVENTS_STREAM)
    return sum(isinstance(parse_event(f["type"], f["data"]), JobFinished) for _, f in entries)


def test_a_monitor_down_while_jobs_ran_catches_up_with_exact_counts(
        client: Client, private_redis: str, lm_url: str, logdir: Path, fresh: redis.Redis) -> None:
    with ms.monitor_process(private_redis, lm_url, logdir, STAGECOACH_MONITOR_CONSUMER="first",
                            **MONITOR_ENV) as (url, proc):
        run_jobs(client, 10, "before")
        wait_until(lambda: stats(url)[0] == 10, 60, "the first monitor to count 10 jobs")
        proc.send_signal(signal.SIGKILL)  # no goodbye: whatever it read and did not commit stays pending
        proc.wait(20)
    run_jobs(client, 30, "while down")
    assert finished_on_stream(fresh) >= 30  # waiting for the monitor, which is down (trimming is approximate)
    with ms.monitor_process(private_redis, lm_url, logdir, STAGECOACH_MONITOR_CONSUMER="second",
                            **MONITOR_ENV) as (url, _):
        wait_until(lambda: stats(url)[0] >= 40 and settled(fresh), 90, "the restarted monitor to catch up")
        run_jobs(client, 5, "after")
        wait_until(lambda: stats(url)[0] >= 45 and settled(fresh), 60, "the monitor to count the new jobs")
        assert stats(url) == (45, 90, 45)
        health = ms.get_json(f"{url}/api/health")
        assert health["lag"] == 0 and health["pending"] == 0 and health["trimmed"] == 0, health


def test_two_replicas_share_the_stream_and_count_each_event_once(
        client: Client, private_redis: str, lm_url: str, logdir: Path, fresh: redis.Redis) -> None:
    with ms.monitor_process(private_redis, lm_url, logdir, STAGECOACH_MONITOR_CONSUMER="one",
                            **MONITOR_ENV) as (one, _), \
            ms.monitor_process(private_redis, lm_url, logdir, STAGECOACH_MONITOR_CONSUMER="two",
                               **MONITOR_ENV) as (two, _):
        run_jobs(client, 60, "replicas")
        wait_until(lambda: stats(one)[0] >= 60 and settled(fresh), 90, "the replicas to count 60 jobs")
        assert stats(one) == stats(two) == (60, 120, 60)  # one store: both serve the same figures
        counted = [ms.get_json(f"{url}/api/health")["events"] for url in (one, two)]
        assert sum(counted) == 60 * EVENTS_PER_QA_JOB, counted  # each event counted by exactly one replica
        assert min(counted) > 0, counted  # and both took their share
        trace = ms.get_json(f"{one}/api/jobs?limit=100")
        assert len(trace) == 60
