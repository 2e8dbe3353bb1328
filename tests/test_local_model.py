"""End to end with the REAL default LM: SmolLM2-135M served by llama.cpp (workers.local_lm).

Private Redis (its own server) so these workers never take jobs from the session's test-LM fleet,
which serves the same stage queues.
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.fleet import Fleet, client_for, local_lm_server, private_redis, worker_env
from contracts.catalog import load_catalog
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from tests.services import ROOT
from workers.errors import PermanentStageError
from workers.local_lm import gguf_path
from workers.settings import LOCAL_MODEL, LMSettings
from workers.stage import StageRunner

CATALOG = [ROOT / "pipelines" / "qa.yaml", ROOT / "pipelines" / "digest.yaml"]
# Questions the answers benchmark (bench/answers.py, docs/benchmarks.md) finds the model gets right through
# the default (plain-first) adapter, with what a right answer contains.
KNOWN = {"What is the capital of France?": "Paris", "Who wrote Hamlet?": "Shakespeare",
         "In what year did the Second World War end?": "1945", "What is the capital of Japan?": "Tokyo",
         "Which planet is known as the Red Planet?": "Mars"}


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture(scope="module")
def local_lm() -> Iterator[str]:
    with local_lm_server() as url:
        yield url


@pytest.fixture(scope="module")
def local_client(own_redis: str, local_lm: str) -> Iterator[Client]:
    extra = {"STAGECOACH_LM_MODEL": LOCAL_MODEL, "STAGECOACH_LM_CACHE": "false"}
    fleet = Fleet(worker_env(own_redis, local_lm, CATALOG, **extra),
                  Path(tempfile.mkdtemp(prefix="stagecoach-local-")))
    for name in load_catalog(CATALOG).stages:
        fleet.start(f"local-{name}", [stage_queue(name)])
    fleet.start("local-routing", [ROUTING_QUEUE])
    try:
        fleet.wait_ready()
        yield client_for(own_redis, local_lm, CATALOG, model=LOCAL_MODEL)
    finally:
        fleet.stop()


def test_bundled_gguf_is_found_without_importing_its_package() -> None:
    assert gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path().stat().st_size > 50_000_000


def test_qa_with_the_real_local_model(local_client: Client) -> None:
    result = local_client.submit("qa", {"question": "What is the capital of France?"}).get(timeout=240)
    assert result.state == "succeeded", result.error
    assert isinstance(result.answer["answer"], str) and result.answer["answer"].strip()
    assert isinstance(result.answer["confidence"], float)
    terms = result.fields["key_terms"]
    assert isinstance(terms, list) and terms and all(isinstance(t, str) and t.strip() for t in terms)
    assert [t.stage for t in result.timings] == ["key_terms", "answer"]
    assert all(u.completion_tokens > 0 for u in result.usage.values())


def test_digest_with_the_real_local_model(local_client: Client) -> None:
    document = "Photosynthesis converts light energy into chemical energy in plants, releasing oxygen."
    result = local_client.submit("digest", {"document": document}).get(timeout=240)
    assert result.state == "succeeded", result.error
    assert result.answer["summary"].strip() and result.answer["headline"].strip()
    assert result.answer["tags"] and all(isinstance(t, str) for t in result.answer["tags"])


def test_the_default_path_answers_known_questions_right(local_client: Client) -> None:
    """qa through the fleet on SmolLM2 with the local model's default adapter: plain answers, read into the
    contract. At temperature 0 the answers are stable, but llama.cpp batches parallel requests, which can
    change a token; one miss in five is allowed, and every answer is printed."""
    handles = {question: local_client.submit("qa", {"question": question}) for question in KNOWN}
    results = {question: handle.get(timeout=600) for question, handle in handles.items()}
    right = []
    for question, result in results.items():
        assert result.state == "succeeded", (question, result.error)
        answer = result.answer["answer"]
        print(f"{question} -> {answer!r} (confidence {result.answer['confidence']})")
        assert isinstance(answer, str) and answer.strip() and isinstance(result.answer["confidence"], float)
        right.append(KNOWN[question].lower() in answer.lower())
    assert sum(right) >= len(KNOWN) - 1, right


def test_a_reply_cut_at_max_tokens_is_a_clear_stage_error_on_the_real_model(local_lm: str) -> None:
    spec = load_catalog(CATALOG).stages["summarize"]
    document = "The Rhine flows from the Swiss Alps through Germany and the Netherlands to the North Sea."
    runner = StageRunner(spec, LMSettings(model=LOCAL_MODEL, api_base=local_lm, max_tokens=4, cache=False))
    with pytest.raises(PermanentStageError, match=r"cut at max_tokens=4 \(finish_reason 'length'\)"):
        runner.run({"document": document})
