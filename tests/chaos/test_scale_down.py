"""Scale-down that loses nothing (issue 20), as Kubernetes stops a pod: SIGTERM, then SIGKILL once the grace
period is over. The stopped stage worker runs with the environment its Deployment in `stagecoach k8s` gives it.

- SIGTERM in the middle of a burst, default recovery settings (a lost message would wait out the 690 s
  visibility timeout, far past the test's limit): the worker takes nothing new, finishes what it runs, exits
  0; every job finishes exactly once.
- SIGTERM then SIGKILL after a short grace: what the worker held comes back (visibility timeout, watchdog)
  and every job still finishes exactly once.
"""

import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from cli.fleet import Fleet, Worker
from cli.k8s import K8sOptions, render
from contracts.catalog import load_catalog
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import JobHandle
from tests.chaos.test_chaos import CHAOS_ENV, STAGECOACH, check_once, figures, submit_all
from tests.reliability_kit import catalog_paths, collect, wait_for
from tests.services import client_for, private_redis, worker_env
from tests.services import test_lm as start_test_lm
from workers.settings import Settings

JOBS = 40


def deployment_env(stage: str, settings: Settings) -> dict[str, str]:
    """The plain (non-secret) environment `stagecoach k8s` gives the stage's worker Deployment."""
    texts = render(load_catalog(settings.catalog), settings, K8sOptions())
    deployment = next(yaml.safe_load_all(texts[f"worker-{stage.replace('_', '-')}.yaml"]))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {env["name"]: env["value"] for env in container["env"] if "value" in env}


@contextmanager
def burst_fleet(redis_url: str, lm_url: str, pool: str = "threads", **env: str) -> Iterator[tuple[Fleet, Worker, Path]]:
    """Routing, answer, and two key_terms workers: `victim` (stopped by the test) and one that stays."""
    logdir = Path(tempfile.mkdtemp(prefix="stagecoach-scale-down-"))
    base = worker_env(redis_url, lm_url, catalog_paths(), **env)
    settings = Settings(catalog=catalog_paths(), **{k.removeprefix("STAGECOACH_").lower(): v  # type: ignore[arg-type]
                                                    for k, v in env.items() if k == "STAGECOACH_STAGE_TIME_LIMIT"})
    fleet = Fleet(base, logdir)
    fleet.start("routing", [ROUTING_QUEUE], concurrency=4)
    fleet.start("answer", [stage_queue("answer")], concurrency=4)
    fleet.start("key_terms-stays", [stage_queue("key_terms")], concurrency=2)
    fleet.env = {**base, **deployment_env("key_terms", settings)}
    victim = fleet.start("key_terms-victim", [stage_queue("key_terms")], pool=pool, concurrency=2)
    fleet.env = base
    try:
        fleet.wait_ready()
        yield fleet, victim, logdir
    finally:
        fleet.stop()


def started_tasks(worker: Worker) -> int:
    return worker.log_text().count("Task stage.key_terms[")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_sigterm_mid_burst_finishes_what_the_worker_holds_and_loses_nothing(pool: str) -> None:
    with private_redis() as url, start_test_lm("--latency-ms", "400") as lm, \
            burst_fleet(url, lm, pool) as (_, victim, logdir):
        client = client_for(url, lm, catalog_paths())
        handles: list[JobHandle] = []
        submitter = threading.Thread(target=lambda: handles.extend(submit_all(client, JOBS, "Term", 0.05)))
        submitter.start()
        wait_for(lambda: started_tasks(victim) >= 3, 60, "the victim working")
        stopped_at = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        code = victim.proc.wait(60)
        stop_seconds = time.monotonic() - stopped_at
        submitter.join()
        results = collect(handles, 120, url, logdir)  # a lost message would wait 690 s: a timeout here
        check_once(client, results, "Term")
        by_victim = sum(1 for r in results for t in r.timings if t.worker.startswith("key_terms-victim@"))
        figures(f"sigterm_{pool}", jobs=len(results), victim_stages=by_victim, stop_seconds=round(stop_seconds, 1),
                exit_code=code)
        assert code == 0 and by_victim >= 1  # it worked, then stopped cleanly within the grace


@pytest.mark.timeout(300)
def test_sigkill_after_a_short_grace_loses_nothing() -> None:
    with private_redis() as url, start_test_lm("--latency-ms", "1500") as lm, \
            burst_fleet(url, lm, **CHAOS_ENV) as (fleet, victim, logdir):
        with (logdir / "watchdog.out").open("wb") as out:
            watchdog = subprocess.Popen([STAGECOACH, "watchdog"], env=fleet.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            client = client_for(url, lm, catalog_paths())
            handles = submit_all(client, JOBS, "Kill", 0.02)
            wait_for(lambda: started_tasks(victim) >= 2, 60, "the victim working")
            victim.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # a grace far shorter than the 1.5 s LM calls it is running
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            started = time.monotonic()
            results = collect(handles, 180, url, logdir)
            check_once(client, results, "Kill")
            redispatched = (logdir / "watchdog.out").read_text(errors="replace").count("re-dispatched")
            figures("sigkill_after_grace", jobs=len(results), seconds_after_kill=round(time.monotonic() - started, 1),
                    watchdog_redispatches=redispatched,
                    redelivered_stages=sum(1 for r in results for t in r.timings if t.redeliveries))
        finally:
            watchdog.terminate()
            watchdog.wait(20)
