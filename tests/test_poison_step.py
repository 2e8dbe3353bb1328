"""Steps that take their worker process down end their job through the ledger, never loop:

- a call that ignores its soft time limit is killed by the prefork pool at its hard limit: the job ends
  as timed out at once (the worker's main process closes it before Celery records the failure);
- a call that kills its process (as an OOM kill or a native crash would) makes Celery hand its message
  back, again and again: after STAGECOACH_MAX_DELIVERIES deliveries the job ends as failed.
The worker keeps serving."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from tests.services import ROOT, Fleet, client_for, default_catalog, worker_env

CATALOG = """
stages:
  - name: stubborn
    module: examples.ensemble:Sleeper
    options: {seconds: 60, stubborn: true}
    inputs: {text: str}
    outputs: {finding: str, score: float}
    time_limit: 1
    retry: {max_retries: 0}
  - name: self_killer
    module: tests.poison_modules:SelfKiller
    inputs: {text: str}
    outputs: {finding: str, score: float}
    retry: {max_retries: 0}
pipelines:
  - {name: poison_timeout, inputs: {text: str}, outputs: [finding], root: [stubborn]}
  - {name: poison_crash, inputs: {text: str}, outputs: [finding], root: [self_killer]}
"""


@pytest.fixture(scope="module")
def catalog_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    path = tmp_path_factory.mktemp("poison") / "poison.yaml"
    path.write_text(CATALOG)
    return [*default_catalog(), path]


@pytest.fixture(scope="module")
def client(private_redis: str, lm_url: str, catalog_paths: list[Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    # PYTHONPATH: the workers import this suite's own stage module (tests.poison_modules)
    env = worker_env(private_redis, lm_url, catalog=catalog_paths, STAGECOACH_MAX_DELIVERIES="2",
                     PYTHONPATH=str(ROOT))
    fleet = Fleet(env, tmp_path_factory.mktemp("poison-logs"))
    fleet.start("routing", [ROUTING_QUEUE])
    fleet.start("stubborn", [stage_queue("stubborn"), stage_queue("self_killer")], pool="prefork", concurrency=1)
    try:
        fleet.wait_ready()
        yield client_for(private_redis, lm_url, catalog_paths)
    finally:
        fleet.stop()


def test_a_call_killed_at_its_hard_limit_ends_its_job_as_timed_out(client: Client) -> None:
    result = client.submit("poison_timeout", {"text": "never finishes"}).get(timeout=180)
    assert result.ending == "timed-out" and result.error is not None
    assert result.error.stage == "stubborn" and "hard time limit of 3s exceeded" in result.error.message
    assert client.status(result.job_id).state == "failed"


def test_a_step_that_kills_its_worker_ends_its_job_after_the_bounded_deliveries(client: Client) -> None:
    result = client.submit("poison_crash", {"text": "crash"}).get(timeout=180)
    assert result.ending == "failed" and result.error is not None
    assert result.error.stage == "self_killer" and "delivered 3 times" in result.error.message
    assert "STAGECOACH_MAX_DELIVERIES=2" in result.error.message
    assert client.status(result.job_id).state == "failed"
    assert client.submit("poison_timeout", {"text": "still served"}).get(timeout=180).ending == "timed-out"
