"""RabbitMQ as broker, Redis as result backend: a representative part of the end-to-end suite (a sequence,
a map, a parallel chord, an ensemble, a retry) on a fleet of its own, on a RabbitMQ vhost of its own
(created here, deleted afterwards with the queues this module declared in it), plus `stagecoach up`
and the Node.js client on the same broker.

RabbitMQ must run at 127.0.0.1:5672 (user guest; Debian's rabbitmq-server, started on this machine
kind); without it these tests fail naming what is missing, they never skip.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.stack import broker_reachable
from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from tests.services import ROOT, Fleet, private_redis, worker_env
from tests.test_node_client import (
    node_client,  # noqa: F401  (fixture: npm ci, then the node command)
    run_node,
)
from workers.factory import create_runtime
from workers.settings import LMSettings, Settings

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
CATALOG = [ROOT / "pipelines"]
STAGES = ["key_terms", "answer", "define", "summarize", "tone", "entities", "solver"]
STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        pytest.fail("rabbitmqctl not found: RabbitMQ tests need Debian's rabbitmq-server running at "
                    f"{RABBIT_HOST}:{RABBIT_PORT}", pytrace=False)
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
    return done


def _port_open() -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((RABBIT_HOST, RABBIT_PORT)) == 0


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """A vhost of this module's own: nothing in it but what these tests declare, all deleted at the end."""
    if not _port_open():
        pytest.fail(f"RabbitMQ is not reachable at {RABBIT_HOST}:{RABBIT_PORT}: start rabbitmq-server "
                    "(Debian package rabbitmq-server, user guest)", pytrace=False)
    vhost = f"stagecoach-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
        assert broker_reachable(url), f"cannot connect to {url}"
        yield url
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def backend_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture(scope="module")
def rabbit_fleet(amqp_url: str, backend_url: str, lm_url: str) -> Iterator[Fleet]:
    env = worker_env(amqp_url, lm_url, CATALOG, STAGECOACH_RESULT_BACKEND=backend_url)
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-rabbit-")))
    for stage in STAGES:
        fleet.start(f"rabbit-{stage}", [stage_queue(stage)], concurrency=4)
    fleet.start("rabbit-routing", [ROUTING_QUEUE], concurrency=8)
    try:
        fleet.wait_ready(180)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def rabbit(amqp_url: str, backend_url: str, lm_url: str, rabbit_fleet: Fleet) -> Client:
    settings = Settings(broker_url=amqp_url, result_backend=backend_url, catalog=CATALOG,
                        lm=LMSettings(model="openai/test-lm", api_base=lm_url, cache=False))
    return Client(create_runtime(settings))


def run(client: Client, pipeline: str, inputs: dict[str, object]) -> JobResult:
    result = client.submit(pipeline, inputs).get(timeout=120)
    assert result.state == "succeeded", result.error
    return result


def test_the_broker_really_is_rabbitmq(rabbit: Client, amqp_url: str) -> None:
    assert rabbit.app.connection().transport.driver_type == "amqp"
    vhost = amqp_url.rsplit("/", 1)[1]
    queues = rabbitmqctl("list_queues", "-p", vhost, "name", "--quiet").stdout.split()
    assert {ROUTING_QUEUE, *(stage_queue(s) for s in STAGES)} <= set(queues)


def test_sequence(rabbit: Client) -> None:
    result = run(rabbit, "qa", {"question": "Over AMQP?"})
    assert result.answer["answer"] == "answer of <Over AMQP?>"
    assert [t.worker.split("@")[0] for t in result.timings] == ["rabbit-key_terms", "rabbit-answer"]


def test_map(rabbit: Client) -> None:
    result = run(rabbit, "patterns_map", {"question": "How do tides depend on the moon?"})
    terms = result.answer["key_terms"]
    assert terms and result.answer["definitions"] == [f"definition of <{t}>" for t in terms[:8]]


def test_parallel_chord(rabbit: Client) -> None:
    result = run(rabbit, "parallel_analysis", {"document": "Barges carry coal on the Rhine."})
    assert set(result.answer) == {"summary", "tone", "entities"}
    assert {t.stage for t in result.timings} == {"summarize", "tone", "entities"}


def test_ensemble(rabbit: Client) -> None:
    result = run(rabbit, "ensemble_qa", {"question": "What is the capital of France?"})
    assert len([t for t in result.timings if t.stage == "solver"]) == 5
    assert result.answer["answer"] and 0 <= result.answer["confidence"] <= 1


def test_retry(rabbit: Client) -> None:
    """A transient LM error in each stage (the marker is in both prompts): each stage task is retried
    through RabbitMQ and the job succeeds."""
    question = f"Retried {uuid.uuid4().hex[:8]} [[lm:fail_first=1]]"
    result = run(rabbit, "qa", {"question": question})
    assert [(t.stage, t.attempts) for t in result.timings] == [("key_terms", 2), ("answer", 2)]
    assert [(e.stage, e.kind, e.retryable) for e in result.errors] == [("key_terms", "lm", True),
                                                                       ("answer", "lm", True)]


def test_node_client_over_amqp(node_client: list[str], amqp_url: str, backend_url: str,  # noqa: F811
                               rabbit: Client) -> None:
    done = run_node(node_client, amqp_url, "qa", json.dumps({"question": "From Node over AMQP?"}),
                    STAGECOACH_RESULT_BACKEND=backend_url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["answer"]["answer"] == "answer of <From Node over AMQP?>"


def test_stagecoach_up_with_rabbitmq(amqp_url: str, backend_url: str, lm_url: str, tmp_path: Path) -> None:
    """`stagecoach up` on RabbitMQ: it starts no broker, uses the Redis result backend, serves jobs."""
    env = worker_env(amqp_url, lm_url, [ROOT / "pipelines" / "qa.yaml"], STAGECOACH_RESULT_BACKEND=backend_url,
                     STAGECOACH_FLOWER_PORT=str(_free_port()))
    proc = subprocess.Popen([STAGECOACH, "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        table = _read_until(proc, "stack ready")
        state = json.loads((tmp_path / ".stagecoach" / "stack.json").read_text())
        assert "redis" not in state["pids"] and "monitor" in state["pids"]
        assert "broker: amqp://guest:***@" in table
        done = subprocess.run([STAGECOACH, "submit", "qa", "-i", "question=Up on RabbitMQ?", "--wait", "--json"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["answer"]["answer"] == "answer of <Up on RabbitMQ?>"
        with urllib.request.urlopen(f"{state['monitor_url']}/api/queues", timeout=30) as response:
            depths = json.loads(response.read())  # the monitor reads queue depths from RabbitMQ
        assert depths == {"stage.key_terms": 0, "stage.answer": 0, "pipeline.routing": 0}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_rabbitmq_password_setting_reaches_the_broker(amqp_url: str, backend_url: str) -> None:
    """What the compose file does: a broker URL with a user and no password, STAGECOACH_RABBITMQ_PASSWORD."""
    without_password = amqp_url.replace("guest:guest@", "guest@")
    right = Settings(broker_url=without_password, result_backend=backend_url, rabbitmq_password="guest")  # type: ignore[arg-type]
    wrong = Settings(broker_url=without_password, result_backend=backend_url, rabbitmq_password="nope")  # type: ignore[arg-type]
    assert right.broker_url == amqp_url and broker_reachable(right.broker_url)
    assert not broker_reachable(wrong.broker_url)


def test_an_amqp_broker_without_a_redis_backend_is_a_clear_error(amqp_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGECOACH_")}
    env["STAGECOACH_BROKER_URL"] = amqp_url
    done = subprocess.run([STAGECOACH, "up"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "STAGECOACH_RESULT_BACKEND must be a redis://, rediss:// or sentinel:// URL" in " ".join(done.stderr.split())


def _free_port() -> int:
    from cli.stack import free_port

    return free_port()


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when `up` exits; `up` gives up by itself after its ready timeout
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} from stagecoach up:\n{''.join(seen)}")
