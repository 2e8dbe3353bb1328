"""Optimisation on the fleet changes nothing but where evaluations run: DSPy's own BootstrapFewShot,
MIPROv2, GEPA and SIMBA produce the same program (demo for demo, instruction for instruction) from the proxy
of the `qa` pipeline, whose every evaluation is a job on real workers, as from the same pipeline written
as an ordinary in-process DSPy program, with the same data, seed and deterministic LM.

The test LM runs in `--vary` mode: its text answers depend on the instructions, demos and temperature
of the prompt, so candidates score differently under `vary_metric` and the optimisers' choices matter;
the shared stage cache is on, so repeated evaluations are served from it (with their traces).
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest

from cli.fleet import client_for
from contracts.names import ROUTING_QUEUE, stage_queue
from examples.multihop import build_multi_hop_qa_pipeline
from monitor.evaluation import load_examples
from optimize.journal import Journal
from optimize.optimizers import OptimizerOptions, compile_program
from optimize.run import client_lm_context, fleet_program
from routing.client import Client
from tests import services
from tests.optimize_kit import always, examples, in_process, on_fleet, programs_state
from tests.services import ROOT, Fleet, worker_env
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings

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


def test_simba_on_the_fleet_equals_in_process(qa_client: Client, vary_lm: str) -> None:
    """SIMBA sets its sampled LMs on the predictors (`set_lm`: temperature, rollout id), which travel per job."""
    options = OptimizerOptions(optimizer="simba", threads=4, trials=3, candidates=3, seed=4, max_bootstrapped_demos=2)
    train = examples(8)
    local = in_process(vary_lm, options, train, None)
    fleet = on_fleet(qa_client, options, train, None)
    expected = programs_state(local)
    assert programs_state(fleet) == expected
    assert expected["answer"]["demos"], "SIMBA appended a demo from a trajectory"


@pytest.fixture(scope="module")
def multihop_client(private_redis: str, lm_url: str, hotpotqa: Path) -> Iterator[Client]:
    env = worker_env(private_redis, lm_url, catalog=CATALOG, STAGECOACH_HOTPOTQA_PATH=str(hotpotqa))
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-optimize-multihop-")))
    fleet.start("multihop-stages", [stage_queue(s) for s in ("decompose", "retrieve_hotpotqa", "synthesize")],
                concurrency=4)
    fleet.start("multihop-routing", [ROUTING_QUEUE], concurrency=2)
    try:
        fleet.wait_ready()
        yield client_for(private_redis, lm_url, CATALOG)
    finally:
        fleet.stop()


def test_bootstrap_of_multihop_with_its_map_fan_out_equals_in_process(multihop_client: Client, lm_url: str,
                                                                      hotpotqa: Path) -> None:
    """The multi-hop pipeline (chain-of-thought modules, retrieval fanned out by a map node): every hop's
    trace comes back, in hop order, so BootstrapFewShot picks the same demo
    among a predictor's several traces of one example (it samples with a hash of them)."""
    options = OptimizerOptions(optimizer="bootstrap", max_bootstrapped_demos=2, max_labeled_demos=0)
    train = [dspy.Example(question=e.question, answer=e.answer).with_inputs("question")
             for e in load_examples(hotpotqa, limit=3)]
    settings = LMSettings(model="openai/test-lm", api_base=lm_url, cache=False)
    with dspy.context(lm=lm_for(settings), adapter=adapter_for(settings)):
        local = compile_program(build_multi_hop_qa_pipeline(str(hotpotqa), format="hotpotqa"), always, train, None,
                                options)
    program, _ = fleet_program(multihop_client, "multihop_hotpotqa", None, Journal(None, False))
    with client_lm_context(multihop_client):
        fleet = compile_program(program, always, train, None, options)
    pairs = list(zip(fleet.named_predictors(), local.named_predictors(), strict=True))
    assert [name for (name, _), _ in pairs] == ["decompose.decompose.predict", "retrieve_hotpotqa.extract.predict",
                                                "synthesize.synthesize.predict"]
    for (_, remote), (_, here) in pairs:
        assert remote.signature.instructions == here.signature.instructions
        assert [dict(d) for d in remote.demos] == [dict(d) for d in here.demos]
        assert len(remote.demos) == 2 and all(d.get("augmented") for d in remote.demos)
