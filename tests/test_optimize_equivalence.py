"""Optimisation on the fleet changes nothing but where evaluations run: DSPy's own BootstrapFewShot,
MIPROv2 and GEPA produce the same program (demo for demo, instruction for instruction) from the proxy
of the `qa` pipeline, whose every evaluation is a job on real workers, as from the same pipeline written
as an ordinary in-process DSPy program, with the same data, seed and deterministic LM.

The test LM runs in `--vary` mode: its text answers depend on the instructions, demos and temperature
of the prompt, so candidates score differently under `vary_metric` and the optimisers' choices matter;
the shared stage cache is on, so repeated evaluations are served from it (with their traces).
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.fleet import client_for
from contracts.names import ROUTING_QUEUE, stage_queue
from optimize.optimizers import OptimizerOptions
from routing.client import Client
from tests import services
from tests.optimize_kit import examples, in_process, on_fleet, programs_state
from tests.services import ROOT, Fleet, worker_env

CATALOG = [ROOT / "pipelines"]


@pytest.fixture(scope="module")
def vary_lm() -> Iterator[str]:
    with services.test_lm("--vary") as url:
        yield url


@pytest.fixture(scope="module")
def qa_client(private_redis: str, vary_lm: str) -> Iterator[Client]:
    env = worker_env(private_redis, vary_lm, catalog=CATALOG, STAGECOACH_CACHE_ENABLED="true")
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-optimize-")))
    fleet.start("qa-stages", [stage_queue("key_terms"), stage_queue("answer")], concurrency=4)
    fleet.start("routing", [ROUTING_QUEUE], concurrency=2)
    try:
        fleet.wait_ready()
        yield client_for(private_redis, vary_lm, CATALOG, shared_cache=True)
    finally:
        fleet.stop()


def test_bootstrap_fewshot_on_the_fleet_equals_in_process(qa_client: Client, vary_lm: str) -> None:
    options = OptimizerOptions(optimizer="bootstrap", max_bootstrapped_demos=3, max_labeled_demos=2, max_rounds=2)
    train = examples(6)
    local = in_process(vary_lm, options, train, None)
    fleet = on_fleet(qa_client, options, train, None)
    expected = programs_state(local)
    assert programs_state(fleet) == expected
    demos = expected["answer"]["demos"]
    assert any(d.get("augmented") for d in demos), "some demos must be bootstrapped from traces"
    assert any(" ~" in str(d.get("answer", "")) for d in demos), "bootstrapped demos carry the workers' outputs"
    assert fleet._fleet.jobs > 0 and fleet._fleet.failed == 0, "every bootstrap attempt was a job that succeeded"


def test_mipro_on_the_fleet_equals_in_process(qa_client: Client, vary_lm: str) -> None:
    options = OptimizerOptions(optimizer="mipro", threads=4, auto=None, trials=5, candidates=3, seed=11,
                               max_bootstrapped_demos=2, max_labeled_demos=1)
    train, dev = examples(5), examples(3, start=5)
    local = in_process(vary_lm, options, train, dev)
    fleet = on_fleet(qa_client, options, train, dev)
    assert programs_state(fleet) == programs_state(local)
    assert [c["score"] for c in fleet.candidate_programs] == [c["score"] for c in local.candidate_programs]


def test_gepa_on_the_fleet_equals_in_process(qa_client: Client, vary_lm: str) -> None:
    options = OptimizerOptions(optimizer="gepa", threads=4, auto=None, trials=30, seed=6)
    train, dev = examples(5), examples(3, start=5)
    local = in_process(vary_lm, options, train, dev)
    fleet = on_fleet(qa_client, options, train, dev)
    expected = programs_state(local)
    assert programs_state(fleet) == expected
    # the reflection LM read the rebuilt traces and proposed an instruction that won (this seed's outcome)
    assert expected["answer"]["instructions"].startswith("new_instruction of <")
