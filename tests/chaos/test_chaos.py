"""Chaos runs (issue 9), outside the default suite: `make test-chaos` (CI runs it too).

- 200 jobs while stage workers are SIGKILLed at least 10 times (main process and pool child,
  thread and prefork pools): every job completes, none runs a stage twice into its result.
- A Redis restart (AOF) under load: every job completes once, no worker is left dead.
- 100 jobs with 30 % 429 and 20 % 500 from the LM: every job ends (succeeds or fails cleanly).
Each run prints its figures (kills, re-dispatches, redeliveries, wall time). Real processes only.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client, JobHandle
from tests.reliability_kit import RestartableRedis, catalog_paths, collect, restartable_redis
from tests.services import Fleet, Worker, client_for, private_redis, worker_env
from tests.services import test_lm as start_test_lm

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
STAGES = ("key_terms", "answer")
CHAOS_ENV = {"STAGECOACH_STAGE_TIME_LIMIT": "5", "STAGECOACH_VISIBILITY_TIMEOUT": "10",
             "STAGECOACH_WATCHDOG_STALL_SECONDS": "5", "STAGECOACH_WATCHDOG_INTERVAL": "1"}

SETTLE = 3.0  # seconds after its start before a worker's pool children are fair game


class Chaos:
    """A fleet of two workers per stage (threads and prefork), a routing worker and the watchdog."""

    def __init__(self, redis_url: str, lm_url: str, logdir: Path) -> None:
        self.env = worker_env(redis_url, lm_url, catalog_paths(), **CHAOS_ENV)
        self.fleet = Fleet(self.env, logdir)
        self.serial = 0
        self.watchdog_log = logdir / "watchdog.out"
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.started: dict[str, float] = {}  # worker name -> when it was started (monotonic)

    def start(self) -> None:
        self.fleet.start("routing", [ROUTING_QUEUE], concurrency=6)
        for stage in STAGES:
            for pool in ("threads", "prefork"):
                self.add(stage, pool)
        self.fleet.wait_ready()
        with self.watchdog_log.open("wb") as out:
            self.watchdog = subprocess.Popen([STAGECOACH, "watchdog"], env=self.env, stdout=out,
                                             stderr=subprocess.STDOUT)

    def add(self, stage: str, pool: str) -> Worker:
        self.serial += 1
        name = f"{stage}-{pool}-{self.serial}"
        self.started[name] = time.monotonic()
        return self.fleet.start(name, [stage_queue(stage)], pool=pool, concurrency=4 if pool == "threads" else 2)

    def kill(self, stage: str, pool: str, target: str) -> str:
        """SIGKILL a worker's main process (a replacement starts) or one of its pool children. A child is
        killed only in a worker that finished starting: Celery exits with "Could not start worker
        processes" when a pool child dies during the pool's start (a supervisor would restart it)."""
        worker = next(w for w in self.fleet.workers if w.name.startswith(f"{stage}-{pool}-") and w.proc.poll() is None)
        if target == "child":
            self.settle(worker)
            kids = pool_children(worker.proc.pid)
            if kids:
                os.kill(random.choice(kids), signal.SIGKILL)
                return f"{worker.name} pool child"
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        self.fleet.workers.remove(worker)
        self.add(stage, pool)
        return f"{worker.name} main process"

    def settle(self, worker: Worker) -> None:
        """Wait until `worker` has served for a while (its pool started), SETTLE seconds after it was started."""
        self.fleet.wait_ready()
        time.sleep(max(0.0, self.started.get(worker.name, 0.0) + SETTLE - time.monotonic()))

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.terminate()
            self.watchdog.wait(20)
        self.fleet.stop()

    def redispatches(self) -> int:
        """Re-dispatches the watchdog made (its printed `HH:MM:SS job ID: re-dispatched (generation N)` lines;
        its log lines say the same again)."""
        text = self.watchdog_log.read_text(errors="replace")
        return len(re.findall(r"^\d\d:\d\d:\d\d job \S+: re-dispatched \(generation", text, flags=re.M))

    def alive(self) -> bool:
        return all(w.proc.poll() is None for w in self.fleet.workers)


def pool_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@contextmanager
def chaos_fleet(redis_url: str, lm_url: str, tmp_path: Path) -> Iterator[Chaos]:
    chaos = Chaos(redis_url, lm_url, tmp_path)
    try:
        chaos.start()
        yield chaos
    finally:
        chaos.stop()


def submit_all(client: Client, count: int, tag: str, pause: float = 0.0) -> list[JobHandle]:
    handles = []
    for index in range(count):
        handles.append(client.submit("qa", {"question": f"{tag} {index}?"}))
        time.sleep(pause)
    return handles


def check_once(client: Client, results: list[JobResult], tag: str, submitted: int | None = None) -> None:
    """Every job submitted (`submitted`: how many the test meant to: a submit that raised in the submitter
    thread must not shrink the check) succeeded with its own answer, each stage exactly once in its result
    and its count."""
    if submitted is not None:
        assert len(results) == submitted, f"{len(results)} of {submitted} jobs were submitted"
    for index, result in enumerate(results):
        assert result.ok, (result.job_id, result.error)
        assert result.answer["answer"] == f"answer of <{tag} {index}?>"
        assert [t.node for t in result.timings] == ["key_terms", "answer"], result.timings
        assert client.status(result.job_id).stages_done == 2, result.job_id


def figures(name: str, **values: object) -> None:
    print(f"CHAOS FIGURES {name}: {json.dumps(values)}")


@pytest.mark.timeout(480)
def test_sigkills_of_stage_workers_lose_no_job_and_repeat_none(tmp_path: Path) -> None:
    kills_wanted = 12
    plan = [("key_terms", "threads", "main"), ("answer", "prefork", "child"), ("answer", "threads", "main"),
            ("key_terms", "prefork", "child"), ("key_terms", "prefork", "main"), ("answer", "prefork", "main")]
    with private_redis() as url, start_test_lm("--latency-ms", "300") as lm, chaos_fleet(url, lm, tmp_path) as chaos:
        client = client_for(url, lm, catalog_paths())
        started = time.monotonic()
        handles: list[JobHandle] = []
        submitter = threading.Thread(target=lambda: handles.extend(submit_all(client, 200, "Kill", 0.02)))
        submitter.start()
        killed = []
        for number in range(kills_wanted):
            time.sleep(1.2)
            killed.append(chaos.kill(*plan[number % len(plan)]))
        submitter.join()
        results = collect(handles, 240, url, tmp_path)
        seconds = time.monotonic() - started
        check_once(client, results, "Kill", 200)
        chaos.fleet.wait_ready()
        assert chaos.alive()
        timings = [t for r in results for t in r.timings]
        figures("sigkill", jobs=len(results), kills=len(killed), killed=killed, wall_seconds=round(seconds, 1),
                watchdog_redispatches=chaos.redispatches(),
                redelivered_stages=sum(1 for t in timings if t.redeliveries),
                replayed_from_checkpoint=sum(1 for t in timings if t.from_checkpoint),
                jobs_in_generation_above_0=sum(1 for r in results if any(t.from_checkpoint for t in r.timings)))
        assert len(killed) >= 10 and len(results) == 200


@pytest.mark.timeout(480)
def test_redis_restart_under_load_loses_and_repeats_nothing(tmp_path: Path) -> None:
    with restartable_redis() as server, start_test_lm("--latency-ms", "200") as lm, \
            chaos_fleet(server.url, lm, tmp_path) as chaos:
        client = client_for(server.url, lm, catalog_paths())
        started = time.monotonic()
        handles: list[JobHandle] = []
        submitter = threading.Thread(target=lambda: handles.extend(submit_all(client, 100, "Restart", 0.1)))
        submitter.start()
        restarts = 0
        for _ in range(2):
            time.sleep(3.0)
            restart(server)
            restarts += 1
        submitter.join()
        results = collect(handles, 240, server.url, tmp_path)
        seconds = time.monotonic() - started
        check_once(client, results, "Restart", 100)
        assert chaos.alive(), [(w.name, w.proc.returncode) for w in chaos.fleet.workers]
        logs = "".join(w.log_text() for w in chaos.fleet.workers)
        assert "Unrecoverable error" not in logs
        figures("redis_restart", jobs=len(results), restarts=restarts, wall_seconds=round(seconds, 1),
                watchdog_redispatches=chaos.redispatches(),
                redelivered_stages=sum(1 for r in results for t in r.timings if t.redeliveries))


def restart(server: RestartableRedis) -> None:
    server.stop()
    time.sleep(2.0)
    server.start()


@pytest.mark.timeout(480)
def test_lm_faults_429_and_500_every_job_ends(tmp_path: Path) -> None:
    with private_redis() as url, start_test_lm("--fail-statuses", "429:0.3,500:0.2") as lm, \
            chaos_fleet(url, lm, tmp_path) as chaos:
        client = client_for(url, lm, catalog_paths())
        started = time.monotonic()
        handles = submit_all(client, 100, "Faulty")
        results = collect(handles, 240, url, tmp_path)  # a hang fails here, with its post-mortem
        seconds = time.monotonic() - started
        failed = [r for r in results if not r.ok]
        for result in failed:
            assert result.error is not None and result.error.kind == "lm" and result.error.attempts == 4
            assert any(code in result.error.message for code in ("429", "500", "RateLimit", "InternalServer"))
        retries = sum(1 for r in results for e in r.errors if e.retryable) - len(failed)
        assert chaos.alive()
        figures("lm_faults", jobs=len(results), succeeded=len(results) - len(failed), failed_cleanly=len(failed),
                retries_logged=retries, wall_seconds=round(seconds, 1))
        assert len(results) == 100


@pytest.fixture(autouse=True)
def _no_stray_redis_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAGECOACH_BROKER_URL", raising=False)


# --- recovery in seconds with DEFAULT settings (issue 18): leases, not the visibility timeout --------------

RECOVERY_BOUND = 60.0  # seconds from the last fault to the last job's end, with default recovery settings


class DefaultFleet(Chaos):
    """Thread-pool stage workers (two per stage), a routing worker and the watchdog, every recovery
    setting (lease, stall, sweep interval, visibility timeout, stage limits) at its default."""

    def __init__(self, redis_url: str, lm_url: str, logdir: Path) -> None:
        super().__init__(redis_url, lm_url, logdir)
        self.env = worker_env(redis_url, lm_url, catalog_paths())
        self.fleet = Fleet(self.env, logdir)

    def start(self) -> None:
        self.fleet.start("routing", [ROUTING_QUEUE], concurrency=6)
        for stage in STAGES:
            for _ in range(2):
                self.add(stage, "threads")
        self.fleet.wait_ready()
        with self.watchdog_log.open("wb") as out:
            self.watchdog = subprocess.Popen([STAGECOACH, "watchdog"], env=self.env, stdout=out,
                                             stderr=subprocess.STDOUT)


@contextmanager
def default_fleet(redis_url: str, lm_url: str, tmp_path: Path) -> Iterator[DefaultFleet]:
    chaos = DefaultFleet(redis_url, lm_url, tmp_path)
    try:
        chaos.start()
        yield chaos
    finally:
        chaos.stop()


def recovery_figures(name: str, results: list[JobResult], last_fault: float, chaos: Chaos, **extra: object) -> float:
    """Seconds from the last fault to the last job's end (the JobResults' own clock), printed with the rest."""
    tail = max(r.finished_at or 0.0 for r in results) - last_fault
    figures(name, jobs=len(results), seconds_after_last_fault=round(tail, 1),
            watchdog_redispatches=chaos.redispatches(),
            jobs_resumed_from_checkpoint=sum(1 for r in results if any(t.from_checkpoint for t in r.timings)),
            **extra)
    return tail


@pytest.mark.timeout(600)
def test_killed_thread_pool_workers_jobs_finish_within_a_minute_with_defaults(tmp_path: Path) -> None:
    with private_redis() as url, start_test_lm("--latency-ms", "150") as lm, default_fleet(url, lm, tmp_path) as chaos:
        client = client_for(url, lm, catalog_paths())
        handles: list[JobHandle] = []
        submitter = threading.Thread(target=lambda: handles.extend(submit_all(client, 200, "Lease", 0.02)))
        submitter.start()
        killed = []
        for number in range(4):
            time.sleep(1.5)
            killed.append(chaos.kill(STAGES[number % 2], "threads", "main"))
        last_fault = time.time()
        submitter.join()
        results = collect(handles, 300, url, tmp_path)
        check_once(client, results, "Lease", 200)
        tail = recovery_figures("sigkill_defaults", results, last_fault, chaos, kills=len(killed))
        assert tail <= RECOVERY_BOUND, f"the last job ended {tail:.0f}s after the last kill"


@pytest.mark.timeout(600)
def test_redis_restart_jobs_finish_within_a_minute_with_defaults(tmp_path: Path) -> None:
    with restartable_redis() as server, start_test_lm("--latency-ms", "150") as lm, \
            default_fleet(server.url, lm, tmp_path) as chaos:
        client = client_for(server.url, lm, catalog_paths())
        handles: list[JobHandle] = []
        submitter = threading.Thread(target=lambda: handles.extend(submit_all(client, 100, "Lease restart", 0.05)))
        submitter.start()
        time.sleep(2.5)
        server.stop()
        time.sleep(3.0)
        server.start()
        last_fault = time.time()
        submitter.join()
        results = collect(handles, 300, server.url, tmp_path)
        check_once(client, results, "Lease restart", 100)
        assert chaos.alive(), [(w.name, w.proc.returncode) for w in chaos.fleet.workers]
        tail = recovery_figures("redis_restart_defaults", results, last_fault, chaos)
        assert tail <= RECOVERY_BOUND, f"the last job ended {tail:.0f}s after Redis came back"


@pytest.mark.timeout(600)
def test_a_long_stage_under_a_live_worker_is_never_redispatched(tmp_path: Path) -> None:
    """40 s of LM time, well past the 15 s lease and the 30 s stall: the worker renews its lease, so the
    watchdog never touches the job (default settings)."""
    with private_redis() as url, start_test_lm() as lm, default_fleet(url, lm, tmp_path) as chaos:
        client = client_for(url, lm, catalog_paths())
        result = client.submit("qa", {"question": "A long think [[lm:sleep=20000]]"}).get(timeout=300)
        assert result.ok and [t.node for t in result.timings] == ["key_terms", "answer"]
        assert all(not t.from_checkpoint and t.redeliveries == 0 for t in result.timings)
        assert chaos.redispatches() == 0, chaos.watchdog_log.read_text()
        figures("long_stage_defaults", seconds=round(result.seconds or 0.0, 1), redispatches=chaos.redispatches())
