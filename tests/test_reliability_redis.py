"""Workers and clients ride out a Redis restart (issue 9), and `stagecoach up` restarts a worker
that died, saying so. A private redis-server with AOF that the tests stop and start again."""

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from routing.client import Client
from routing.errors import BrokerUnavailableError
from tests.reliability_kit import RestartableRedis, qa_fleet, restartable_redis, wait_for
from tests.services import ROOT, Fleet, client_for, free_port, worker_env
from workers.factory import create_runtime
from workers.settings import LMSettings, Settings

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))


@pytest.fixture(scope="module")
def server() -> Iterator[RestartableRedis]:
    with restartable_redis() as running:
        yield running


@pytest.fixture(scope="module")
def fleet(server: RestartableRedis, lm_url: str) -> Iterator[Fleet]:
    with qa_fleet(server.url, lm_url, STAGECOACH_WATCHDOG_STALL_SECONDS="5") as workers:
        yield workers


def test_client_and_workers_ride_out_a_redis_restart(server: RestartableRedis, fleet: Fleet, lm_url: str) -> None:
    client = client_for(server.url, lm_url)
    assert client.submit("qa", {"question": "Before?"}).get(timeout=60).ok
    server.stop()
    restart = threading.Timer(3.0, server.start)
    restart.start()
    try:
        handle = client.submit("qa", {"question": "During the outage?"})  # retried until Redis is back
    finally:
        restart.join()
    assert handle.get(timeout=120).answer["answer"] == "answer of <During the outage?>"
    assert all(worker.proc.poll() is None for worker in fleet.workers)


def test_client_gives_up_naming_the_broker(server: RestartableRedis, lm_url: str) -> None:
    settings = Settings(broker_url=server.url, publish_retry_seconds=1.5,
                        lm=LMSettings(model="openai/test-lm", api_base=lm_url))
    client = Client(create_runtime(settings))
    server.stop()
    try:
        with pytest.raises(BrokerUnavailableError) as caught:
            client.submit("qa", {"question": "Nobody home?"})
    finally:
        server.start()
    message = str(caught.value)
    assert f"broker at {server.url}" in message and "STAGECOACH_PUBLISH_RETRY_SECONDS" in message


def test_up_restarts_a_worker_that_died_and_says_so(lm_url: str, tmp_path: Path) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"
    env = worker_env(broker, lm_url, catalog=[ROOT / "pipelines" / "qa.yaml"], STAGECOACH_FLOWER_PORT=str(free_port()))
    proc = subprocess.Popen([STAGECOACH, "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: "stack ready" in "".join(seen), 150, "stagecoach up ready")
        pids = json.loads((tmp_path / ".stagecoach" / "stack.json").read_text())["pids"]
        os.kill(pids["stage-answer"], signal.SIGKILL)
        wait_for(lambda: "restarted stage-answer" in "".join(seen), 30, "the restart notice")
        assert "stage-answer exited (code -9)" in "".join(seen)
        settings = Settings(broker_url=broker, catalog=[ROOT / "pipelines" / "qa.yaml"],
                            lm=LMSettings(model="openai/test-lm", api_base=lm_url))
        result = Client(create_runtime(settings)).submit("qa", {"question": "Still served?"}).get(timeout=90)
        assert result.answer["answer"] == "answer of <Still served?>"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
