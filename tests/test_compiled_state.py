"""Optimised programs on workers: compile a stage in-process, save its state, serve it from a worker.

The decompose stage is optimised with `dspy.BootstrapFewShot` against the test LM, saved as JSON
and named as the `state` of a `decompose_compiled` stage in a catalog written for this test. A
worker loads it; the job's timing shows the state's digest in the stage identity, the bootstrapped
demos reach the LM (longer prompts, token for token what the in-process compiled module sends),
and the answer is what the compiled module gives in-process.

These workers need a catalog the session fleet does not have, so they run against a private
redis-server: the session's routing worker would otherwise take jobs it cannot route.
"""

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import dspy
import pytest

from contracts.names import ROUTING_QUEUE, stage_queue
from examples.multihop import DecomposeStage, optimise_decompose
from monitor.evaluation import load_examples
from routing.client import Client
from tests.services import ROOT, Fleet, client_for, worker_env
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings

QUESTION = "Who founded the school where the designer of the Marrow Bridge studied?"
CATALOG = """
stages:
  - name: decompose_compiled
    version: "2"
    description: decompose with bootstrapped demos
    module: examples.multihop:DecomposeStage
    state: decompose_compiled.json
    inputs: {question: str}
    outputs: {sub_questions: "list[str]"}
pipeline:
  name: multihop_compiled
  inputs: {question: str}
  outputs: [sub_questions, retrieved_facts, final_answer]
  root:
    - decompose_compiled
    - {kind: map, id: hops, over: sub_questions, item: sub_question, node: retrieve,
       collect: {retrieved_info: retrieved_facts}}
    - {stage: synthesize, inputs: {original_question: question}}
"""




def lm_context(lm_url: str) -> AbstractContextManager[Any]:
    settings = LMSettings(model="openai/test-lm", api_base=lm_url, cache=False)
    context: AbstractContextManager[Any] = dspy.context(lm=lm_for(settings), adapter=adapter_for(settings),
                                                        track_usage=True)
    return context


@pytest.fixture(scope="module")
def compiled(lm_url: str, tmp_path_factory: pytest.TempPathFactory, hotpotqa: Path) -> tuple[DecomposeStage, Path]:
    """The optimised decompose stage and the folder holding its saved state and a catalog naming it."""
    folder = tmp_path_factory.mktemp("compiled")
    train = [e.question for e in load_examples(hotpotqa, limit=4)]
    with lm_context(lm_url):
        program = optimise_decompose(train, max_demos=2)
    program.save(str(folder / "decompose_compiled.json"))
    (folder / "catalog.yaml").write_text(CATALOG)
    return program, folder


@pytest.fixture(scope="module")
def compiled_client(private_redis: str, lm_url: str, compiled: tuple[DecomposeStage, Path]) -> Iterator[Client]:
    catalog = [ROOT / "pipelines", compiled[1] / "catalog.yaml"]
    logdir = Path(tempfile.mkdtemp(prefix="stagecoach-compiled-workers-"))
    fleet = Fleet(worker_env(private_redis, lm_url, catalog=catalog), logdir)
    stages = ["decompose_compiled", "decompose", "retrieve", "synthesize"]
    fleet.start("compiled", [stage_queue(s) for s in stages] + [ROUTING_QUEUE], concurrency=4)
    try:
        fleet.wait_ready()
        yield client_for(private_redis, lm_url, catalog)
    finally:
        fleet.stop()


def test_saved_state_holds_the_bootstrapped_demos(compiled: tuple[DecomposeStage, Path], hotpotqa: Path) -> None:
    saved = json.loads((compiled[1] / "decompose_compiled.json").read_text())
    demos = saved["decompose.predict"]["demos"]
    train = [e.question for e in load_examples(hotpotqa, limit=4)]
    assert len(demos) == 2
    assert [d["question"] for d in demos] == train[:2]
    assert all(len(d["sub_questions"]) == 2 for d in demos)


def test_worker_serves_the_compiled_stage(
    compiled_client: Client, compiled: tuple[DecomposeStage, Path], lm_url: str
) -> None:
    program, folder = compiled
    digest = hashlib.sha256((folder / "decompose_compiled.json").read_bytes()).hexdigest()
    tuned = compiled_client.submit("multihop_compiled", {"question": QUESTION}).get(timeout=90)
    plain = compiled_client.submit("multihop", {"question": QUESTION}).get(timeout=90)
    assert tuned.state == "succeeded", tuned.error
    assert plain.state == "succeeded", plain.error
    identities = {t.stage: t.identity for t in tuned.timings + plain.timings}
    assert identities["decompose_compiled"] == f"decompose_compiled@2#{digest[:12]}"
    assert identities["decompose"] == "decompose@1"
    with lm_context(lm_url):
        local = program(question=QUESTION)
    assert tuned.answer["sub_questions"] == local.sub_questions
    local_prompt = next(iter(local.get_lm_usage().values()))["prompt_tokens"]
    assert tuned.usage["decompose_compiled"].prompt_tokens == local_prompt  # the demos reached the LM
    assert tuned.usage["decompose_compiled"].prompt_tokens > plain.usage["decompose"].prompt_tokens + 100
    assert tuned.answer["final_answer"] == plain.answer["final_answer"]
