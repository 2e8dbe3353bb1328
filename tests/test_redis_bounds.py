"""Redis stays bounded (issue 22), with real workers on a real private Redis:
- once a succeeded job's records expire (STAGECOACH_SUCCEEDED_KEEP_SECONDS, its event stream's
  STAGECOACH_EVENTS_KEEP_SECONDS, both short here), it leaves only its result and status, under 4 KB;
  a failed job keeps what `stagecoach resume` needs, and resume works; no key of any job lacks a TTL;
- a Redis at maxmemory (noeviction) refuses writes: submitting is a clear error and writes nothing; a
  stage step whose checkpoint is refused leaves nothing half-written, and the job finishes once Redis
  takes writes again (re-dispatched by the watchdog, or its message handed back);
- the watchdog gives a stalled job more time while the queues hold a backlog, for a bounded time, unless
  the lists that hold messages have started messages sent after the job last moved (then its message is
  lost, not waiting, and it is re-dispatched at once).
The 10,000-job version is the `scale` benchmark."""

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.budget import measure
from contracts.names import QUEUE_PROGRESS_KEY, WATCH_KEY, checkpoint_key, job_key, stage_queue
from contracts.priority import queue_lists
from routing.client import Client
from routing.errors import RedisFullError
from routing.recovery import Recovery, sweep
from routing.tasks import start_envelope
from tests.reliability_kit import catalog_paths, qa_fleet, wait_for
from tests.services import Fleet, client_for, worker_env
from tests.services import test_lm as start_test_lm
from workers.ledger import Ledger

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
KEEP = 2  # seconds a succeeded job's records and any ended job's event stream are kept, here
STALL = 2.0
LIMIT = 3  # stage time limit
LEASE = 2  # a step's lease: a job whose step ended without a checkpoint stalls this long after it
ENV = {"STAGECOACH_SUCCEEDED_KEEP_SECONDS": str(KEEP), "STAGECOACH_EVENTS_KEEP_SECONDS": str(KEEP),
       "STAGECOACH_WATCHDOG_STALL_SECONDS": str(STALL), "STAGECOACH_STAGE_TIME_LIMIT": str(LIMIT),
       "STAGECOACH_LEASE_SECONDS": str(LEASE)}
BUDGET = 4096  # bytes a succeeded job may leave


@pytest.fixture(scope="module")
def own_lm() -> Iterator[str]:
    with start_test_lm() as url:
        yield url


@pytest.fixture(scope="module")
def stack(private_redis: str, own_lm: str) -> Iterator[Fleet]:
    with qa_fleet(private_redis, own_lm, shared=("rel_summarize", "rel_headline"), **ENV) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def client(private_redis: str, own_lm: str, stack: Fleet) -> Client:
    return client_for(private_redis, own_lm, catalog_paths())


@pytest.fixture(scope="module")
def env(private_redis: str, own_lm: str) -> dict[str, str]:
    return worker_env(private_redis, own_lm, catalog_paths(), **ENV)


def keys_of(db: redis.Redis, job_id: str) -> list[str]:
    return [k.decode() for k in db.scan_iter(match=f"*{job_id}*", count=1000)]


def test_a_succeeded_job_leaves_its_result_and_status_a_failed_one_what_resume_needs(
        client: Client, private_redis: str, env: dict[str, str]) -> None:
    db = redis.Redis.from_url(private_redis)
    handles = [client.submit("qa", {"question": f"Where do eels spawn ({i})?"}) for i in range(20)]
    failed = client.submit("rel_two", {"document": "Rivers carry silt.", "hint": "[[lm:fail_first=1]] tide"})
    assert all(h.get(timeout=60).ok for h in handles)
    assert failed.get(timeout=60).state == "failed"
    time.sleep(KEEP + 1.0)
    succeeded = [k for h in handles for k in keys_of(db, h.id)]
    budget = measure(db, succeeded)
    assert set(budget.by_prefix) == {"celery-task-meta-<id>", "stagecoach:job:<id>"}, budget.table(20)
    assert budget.bytes / len(handles) <= BUDGET, budget.table(20)
    everything = measure(db)
    assert not [p for p in everything.without_ttl() if "<id>" in p], everything.table(21)
    assert db.exists(checkpoint_key(failed.id)) and db.ttl(checkpoint_key(failed.id)) > 3600
    resumed = subprocess.run([STAGECOACH, "resume", failed.id], env=env, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert failed.get(timeout=60).ok


def test_redis_at_maxmemory_refuses_writes_and_no_job_is_half_written(
        client: Client, private_redis: str, env: dict[str, str]) -> None:
    db = redis.Redis.from_url(private_redis)
    assert db.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    refused = uuid.uuid4().hex
    running = client.submit("qa", {"question": "[[lm:sleep=1500]] Why is the sea salty?"})
    wait_for(lambda: client.status(running.id).stage == "key_terms", 30, "the job inside key_terms")
    db.config_set("maxmemory", 1)  # every write refused from now on
    try:
        with pytest.raises(RedisFullError, match="maxmemory"):
            client.submit("qa", {"question": "Will this start?"}, job_id=refused)
        assert keys_of(db, refused) == []  # nothing of it written
        time.sleep(2.5)  # key_terms' call ends; its checkpoint is refused whole
        assert not db.hexists(checkpoint_key(running.id), "done:key_terms")
        assert not db.hexists(job_key(running.id), "stages_done")
    finally:
        db.config_set("maxmemory", 0)
    def finished() -> bool:  # the watchdog sweeping meanwhile, as `stagecoach up` runs it
        once = subprocess.run([STAGECOACH, "watchdog", "--once"], env=env, capture_output=True, text=True, timeout=60)
        assert once.returncode == 0, once.stderr
        return client.status(running.id).state == "succeeded"
    # the step whose checkpoint was refused failed its task: the watchdog re-dispatches the job once its
    # lease runs out (or the broker hands the message back first, when its ack was refused too)
    wait_for(finished, 90, "the job finishing once Redis takes writes again")
    result = running.get(timeout=60)
    assert result.ok and [t.stage for t in result.timings] == ["key_terms", "answer"]


def test_a_stalled_job_waits_behind_a_backlog_for_a_bounded_time(client: Client, private_redis: str) -> None:
    """The watchdog tells a backlog by one LLEN per queue (never reading the messages): a stalled job is
    given more time while a queue holds messages, up to the allowance; then it is re-dispatched."""
    db = redis.Redis.from_url(private_redis)
    job_id = uuid.uuid4().hex
    request = {"pipeline": "qa", "inputs": {"question": "Behind the backlog?"}}
    first, _, pinned = start_envelope(client.runtime.catalog, request, job_id)
    ledger = Ledger(client.app, db, client.runtime.catalog, 3600, STALL)  # the watchdog's stall, as `ENV` sets it
    ledger.start(first, request, pinned, "client", "test", final=True)  # recorded, never sent: it stalls
    recovery = Recovery(client.app, client.runtime.catalog, ledger, backlog_seconds=3)
    db.lpush(stage_queue("rel_limited"), "a message nobody consumes here")  # a backlog
    try:
        time.sleep(STALL + 0.2)
        assert (job_id, "re-dispatched (generation 1)") not in sweep(recovery)  # waits behind the backlog
        assert db.zscore(WATCH_KEY, job_id) is not None
        deadline = time.monotonic() + 30
        while not (acted := [a for j, a in sweep(recovery) if j == job_id]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert acted == ["re-dispatched (generation 1)"]  # the allowance is over: treated as lost
    finally:
        db.delete(stage_queue("rel_limited"))
    assert client.handle(job_id).get(timeout=60).ok


def test_a_lost_job_is_redispatched_at_once_when_every_backlogged_list_has_moved_past_it(
        client: Client, private_redis: str) -> None:
    """Each Redis list is first in, first out: a list whose workers have started messages sent after the
    stalled job last moved does not hold the job's message, so its backlog gives the job no more time.
    The workers record how far each list has got as they start messages (checked on a real job first)."""
    db = redis.Redis.from_url(private_redis)
    assert client.submit("qa", {"question": "How far has the queue got?"}).get(timeout=60).ok
    recorded = {name.decode() for name in db.hkeys(QUEUE_PROGRESS_KEY)}  # by the begins, one list per priority
    assert recorded & set(queue_lists(stage_queue("key_terms"))), recorded
    job_id = uuid.uuid4().hex
    request = {"pipeline": "qa", "inputs": {"question": "Lost behind a moving backlog?"}}
    first, _, pinned = start_envelope(client.runtime.catalog, request, job_id)
    ledger = Ledger(client.app, db, client.runtime.catalog, 3600, STALL)
    ledger.start(first, request, pinned, "client", "test", final=True)  # recorded, never sent: it is lost
    recovery = Recovery(client.app, client.runtime.catalog, ledger, backlog_seconds=3600)
    db.lpush(stage_queue("rel_limited"), "a message nobody consumes here")  # a backlog...
    try:
        time.sleep(STALL + 0.2)
        db.hset(QUEUE_PROGRESS_KEY, stage_queue("rel_limited"), time.time())  # ...that started later messages
        assert (job_id, "re-dispatched (generation 1)") in sweep(recovery)  # at once, not after 3600 s
    finally:
        db.delete(stage_queue("rel_limited"))
        db.hdel(QUEUE_PROGRESS_KEY, stage_queue("rel_limited"))
    assert client.handle(job_id).get(timeout=60).ok
