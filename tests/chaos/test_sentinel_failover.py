"""Redis Sentinel failover under load (issue 20), in `make test-chaos`: a real master, one replica and three
sentinels on loopback (`redis-server --sentinel`), a fleet of stage workers, the routing worker and the watchdog,
all on the `sentinel://` URL with default recovery settings. The master is SIGKILLed in the middle of a burst of
jobs; the sentinels promote the replica, every client (kombu's broker connection, Celery's result backend, the
ledger's own clients, the watchdog's) finds it by itself, and every job finishes exactly once with no worker
restarted by hand. Prints the figures docs/deploy.md quotes (time to recover, jobs delayed)."""

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from contracts.jobs import JobResult
from routing.client import Client, JobHandle
from tests.chaos.test_chaos import DefaultFleet, check_once, figures
from tests.reliability_kit import catalog_paths, collect
from tests.sentinel_kit import SentinelSet, sentinel_set
from tests.services import client_for
from tests.services import test_lm as start_test_lm

JOBS = 120
KILL_AFTER_SECONDS = 4.0  # into the burst: jobs queued, running, and between stages when the master dies
DOWN_AFTER_MS = 2000  # sentinel down-after-milliseconds: how long a silent master is waited for (default 30000)


@dataclass(frozen=True)
class Submitted:
    """One job of the burst, with the test's clock around its submission (the client rides out the failover)."""

    handle: JobHandle
    began: float
    sent: float


def submit_burst(client: Client, count: int, tag: str, pause: float, into: list[Submitted]) -> None:
    for index in range(count):
        began = time.time()
        handle = client.submit("qa", {"question": f"{tag} {index}?"})
        into.append(Submitted(handle, began, time.time()))
        time.sleep(pause)


@contextmanager
def sentinel_fleet(sentinels: SentinelSet, lm_url: str, tmp_path: Path) -> Iterator[DefaultFleet]:
    fleet = DefaultFleet(sentinels.url, lm_url, tmp_path)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(autouse=True)
def _no_stray_redis_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGECOACH_BROKER_URL", raising=False)
    monkeypatch.delenv("STAGECOACH_SENTINEL_MASTER", raising=False)  # the kit's sentinels know "mymaster"


@pytest.mark.timeout(600)
def test_killing_the_master_mid_burst_loses_and_repeats_no_job(tmp_path: Path) -> None:
    with sentinel_set(replicas=1, sentinels=3, down_after_ms=DOWN_AFTER_MS) as sentinels, \
            start_test_lm("--latency-ms", "150") as lm, sentinel_fleet(sentinels, lm, tmp_path) as chaos:
        client = client_for(sentinels.url, lm, catalog_paths())
        burst: list[Submitted] = []
        submitter = threading.Thread(target=submit_burst, args=(client, JOBS, "Failover", 0.05, burst))
        started = time.time()
        submitter.start()
        time.sleep(KILL_AFTER_SECONDS)
        old = sentinels.kill_master()
        killed_at = time.time()
        new = sentinels.wait_failover(old)
        promoted_at = time.time()
        submitter.join()
        results = collect([job.handle for job in burst], 300, sentinels.url, tmp_path)
        check_once(client, results, "Failover")
        assert len(results) == JOBS
        assert chaos.alive(), [(w.name, w.proc.returncode) for w in chaos.fleet.workers]
        assert chaos.watchdog is not None and chaos.watchdog.poll() is None, "the watchdog died"
        assert sentinels.master() is new and not old.alive()
        failover_figures(burst, results, started, killed_at, promoted_at, chaos)


def failover_figures(burst: list[Submitted], results: list[JobResult], started: float, killed_at: float,
                     promoted_at: float, chaos: DefaultFleet) -> None:
    """Time to recover (from the kill to the first job that finished after it, and to the last job) and the jobs
    the failover delayed: in flight at the kill, submitted while it lasted, slower than twice the median before."""
    ends = [r.finished_at or 0.0 for r in results]
    took = [end - job.began for job, end in zip(burst, ends, strict=True)]
    before = [t for t, end in zip(took, ends, strict=True) if end < killed_at]
    median = statistics.median(before)
    in_flight = [r for job, r in zip(burst, results, strict=True) if job.sent < killed_at < (r.finished_at or 0.0)]
    waited = [job.sent - job.began for job in burst if job.began < promoted_at and job.sent > killed_at]
    timings = [t for r in results for t in r.timings]
    figures("sentinel_failover", jobs=len(results), down_after_ms=DOWN_AFTER_MS,
            kill_after_burst_start=round(killed_at - started, 1),
            replica_promoted_after_kill=round(promoted_at - killed_at, 1),
            first_job_finished_after_kill=round(min(e for e in ends if e > killed_at) - killed_at, 1),
            last_job_finished_after_kill=round(max(ends) - killed_at, 1),
            jobs_finished_before_kill=len(before), median_job_seconds_before_kill=round(median, 2),
            jobs_in_flight_at_kill=len(in_flight),
            submissions_held_by_the_failover=len(waited), longest_submission_wait=round(max(waited, default=0.0), 1),
            jobs_delayed_over_2x_median=sum(1 for t in took if t > 2 * median),
            slowest_job_seconds=round(max(took), 1),
            watchdog_redispatches=chaos.redispatches(),
            redelivered_stages=sum(1 for t in timings if t.redeliveries),
            stages_replayed_from_checkpoint=sum(1 for t in timings if t.from_checkpoint))
