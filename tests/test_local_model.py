"""End to end with the REAL default LM: SmolLM2-135M served by llama.cpp (workers.local_lm).

Private Redis (its own server) so these workers never take jobs from the session's test-LM fleet,
which serves the same stage queues.
"""

import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from contracts.catalog import load_catalog
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from tests.services import PYTHON, ROOT, Fleet, _http_ok, free_port, reachable, redis_binary, wait_until, worker_env
from workers.factory import create_app
from workers.local_lm import gguf_path
from workers.settings import LOCAL_MODEL, LMSettings, Settings

CATALOG = [ROOT / "pipelines" / "qa.yaml", ROOT / "pipelines" / "digest.yaml"]


@contextmanager
def process(cmd: list[str], ready: Callable[[], bool], what: str) -> Iterator[None]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is None and ready(), 60, what)
        yield
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", tempfile.mkdtemp(prefix="stagecoach-redis-")]
    with process(cmd, lambda: reachable(url), "private redis-server"):
        yield url


@pytest.fixture(scope="module")
def local_lm() -> Iterator[str]:
    port = free_port()
    with process([PYTHON, "-m", "workers.local_lm", "--port", str(port)],
                 lambda: _http_ok(f"http://127.0.0.1:{port}/v1/models"), "SmolLM2 server"):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def local_client(private_redis: str, local_lm: str) -> Iterator[Client]:
    extra = {"STAGECOACH_LM_MODEL": LOCAL_MODEL, "STAGECOACH_LM_CACHE": "false"}
    fleet = Fleet(worker_env(private_redis, local_lm, CATALOG, **extra),
                  Path(tempfile.mkdtemp(prefix="stagecoach-local-")))
    for name in load_catalog(CATALOG).stages:
        fleet.start(f"local-{name}", [stage_queue(name)])
    fleet.start("local-routing", [ROUTING_QUEUE])
    try:
        fleet.wait_ready()
        settings = Settings(broker_url=private_redis, catalog=CATALOG,
                            lm=LMSettings(model=LOCAL_MODEL, api_base=local_lm))
        yield Client(create_app(settings))
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
