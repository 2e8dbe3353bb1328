"""A stage worker SIGKILLed during an optimisation changes nothing in its result (issue 21).

MIPROv2 tunes the `qa` pipeline on a fleet of one worker per stage (threads pool) and the watchdog,
with the test LM slowed down so evaluation jobs are in flight; the `answer` worker's main process is
SIGKILLed twice while a job's `answer` stage runs on it (a replacement starts each time). The killed
workers' messages come back (Redis visibility timeout, or the watchdog's re-dispatch), the evaluations
finish, and the program
MIPROv2 returns equals, demo for demo and instruction for instruction, the one it returns in-process.
"""

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.fleet import client_for
from contracts.names import ROUTING_QUEUE, checkpoint_key, claim_key, job_key, stage_queue
from optimize.optimizers import OptimizerOptions
from optimize.program import FleetProgram
from tests import services
from tests.optimize_kit import examples, in_process, on_fleet, programs_state
from tests.services import ROOT, Fleet, worker_env

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
CATALOG = [ROOT / "pipelines"]
ENV = {"STAGECOACH_STAGE_TIME_LIMIT": "5", "STAGECOACH_VISIBILITY_TIMEOUT": "10",
       "STAGECOACH_WATCHDOG_STALL_SECONDS": "5", "STAGECOACH_WATCHDOG_INTERVAL": "1",
       "STAGECOACH_CACHE_ENABLED": "true"}
OPTIONS = OptimizerOptions(optimizer="mipro", threads=6, auto=None, trials=6, candidates=3, seed=11,
                           max_bootstrapped_demos=2, max_labeled_demos=1)


@pytest.fixture(scope="module")
def slow_lm() -> Iterator[str]:
    with services.test_lm("--vary", "--latency-ms", "150") as url:
        yield url


def test_sigkill_of_a_stage_worker_changes_nothing(private_redis: str, slow_lm: str) -> None:
    train, dev = examples(5), examples(3, start=5)
    expected = programs_state(in_process(slow_lm, OPTIONS, train, dev))
    env = worker_env(private_redis, slow_lm, catalog=CATALOG, **ENV)
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-optimize-kill-")))
    fleet.start("routing", [ROUTING_QUEUE], concurrency=6)
    fleet.start("key_terms-1", [stage_queue("key_terms")], concurrency=6)
    fleet.start("answer-1", [stage_queue("answer")], concurrency=6)  # one: a job in `answer` runs on it
    fleet.wait_ready()
    watchdog = subprocess.Popen([STAGECOACH, "watchdog"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = client_for(private_redis, slow_lm, CATALOG, shared_cache=True)
    outcome: dict[str, FleetProgram] = {}
    try:
        runner = threading.Thread(target=lambda: outcome.update(program=on_fleet(client, OPTIONS, train, dev)))
        runner.start()
        killed = kill_while_jobs_fly(fleet, runner, private_redis)
        runner.join(600)
        assert not runner.is_alive(), "the optimisation did not finish"
    finally:
        watchdog.terminate()
        watchdog.wait(20)
        fleet.stop()
    assert len(killed) == 2, killed
    assert carried_on(private_redis) > 0, "a kill hit a running evaluation (redelivered or re-dispatched)"
    program = outcome["program"]
    assert programs_state(program) == expected
    assert program._fleet.failed == 0, "no evaluation failed: the killed workers' jobs were carried on"


def carried_on(redis_url: str) -> int:
    """Evaluation jobs whose stage message was delivered again or that the watchdog re-dispatched."""
    r = redis.Redis.from_url(redis_url)
    redelivered = sum(int(r.get(key) or 0) > 1 for key in r.scan_iter(match=claim_key("*", "*:deliveries")))
    redispatched = sum(int(r.hget(key, "generation") or 0) > 0 for key in r.scan_iter(match=checkpoint_key("*")))
    return redelivered + redispatched


def kill_while_jobs_fly(fleet: Fleet, runner: threading.Thread, redis_url: str) -> list[str]:
    """SIGKILL the `answer` worker's main process twice, each time while an evaluation job runs its
    `answer` stage there; start a replacement after each kill."""
    r = redis.Redis.from_url(redis_url)
    killed: list[str] = []
    serial = 1
    while len(killed) < 2 and runner.is_alive():
        if not answering(r):
            time.sleep(0.02)
            continue
        victim = next(w for w in fleet.workers if w.name.startswith("answer-") and w.proc.poll() is None)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        fleet.workers.remove(victim)
        killed.append(victim.name)
        serial += 1
        fleet.start(f"answer-{serial}", [stage_queue("answer")], concurrency=6)
        time.sleep(3)
    return killed


def answering(r: redis.Redis) -> bool:
    """Whether some job's status says it runs its `answer` stage now."""
    prefix = len(job_key(""))
    for key in r.scan_iter(match=job_key("*"), count=1000):
        if b":" in key[prefix:]:  # a job's other keys (published fields, event stream): not its status
            continue
        status = r.hmget(key, "state", "stage")
        if status == [b'"running"', b'"answer"']:
            return True
    return False
