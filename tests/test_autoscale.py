"""`stagecoach up --autoscale key_terms=1..4` (issue 20): that stage's worker runs Celery's own pool autoscaler;
a burst on its queue grows the pool and the pool shrinks back once the queue is idle, while the other stage's
worker keeps its fixed pool. Observed through the worker's pool processes, not through timing (`inspect stats`
cannot answer for these workers today: kombu's broker info holds the screening transport's class, which JSON
cannot encode)."""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.inputs import InputError
from cli.up import parse_autoscale_option
from routing.client import Client
from tests.services import ROOT, free_port, worker_env
from tests.services import test_lm as lm_server
from tests.test_scaling import read_until
from workers.factory import create_runtime
from workers.settings import LMSettings, Settings

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
CATALOG = [ROOT / "pipelines" / "qa.yaml"]
BURST = 16


@pytest.fixture
def autoscaled_stack(tmp_path: Path) -> Iterator[tuple[str, str, dict[str, int]]]:
    """`stagecoach up --autoscale key_terms=1..4`; an idle pool slot is given back after 2 s (Celery's
    AUTOSCALE_KEEPALIVE, 30 s by default). Yields the broker, the LM and the services' pids."""
    with lm_server("--latency-ms", "400") as lm:
        env = worker_env(f"redis://127.0.0.1:{free_port()}/0", lm, CATALOG, STAGECOACH_FLOWER_PORT=str(free_port()),
                         STAGECOACH_CONCURRENCY="1", AUTOSCALE_KEEPALIVE="2")
        proc = subprocess.Popen([STAGECOACH, "up", "--autoscale", "key_terms=1..4"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            read_until(proc, "stack ready")
            state = json.loads((tmp_path / ".stagecoach" / "stack.json").read_text())
            yield state["broker_url"], lm, state["pids"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def pool_processes(pid: int) -> int:
    """The size of a prefork worker's pool: its main process's children (one per pool process)."""
    return len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def wait_pool(pid: int, done: Any, timeout: float, what: str) -> list[int]:
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(pool_processes(pid))
        if done(seen[-1]):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{what}: pool sizes seen {seen}")


def test_a_burst_grows_the_autoscaled_pool_and_it_shrinks_after(
        autoscaled_stack: tuple[str, str, dict[str, int]]) -> None:
    broker, lm, pids = autoscaled_stack
    key_terms, answer = pids["stage-key_terms"], pids["stage-answer"]
    assert "--autoscale" in command_line(key_terms) and "--autoscale" not in command_line(answer)
    assert wait_pool(key_terms, lambda size: size == 1, 30, "one pool process at rest") == [1]
    settings = Settings(broker_url=broker, catalog=CATALOG, lm=LMSettings(model="openai/test-lm", api_base=lm))
    client = Client(create_runtime(settings))
    handles = [client.submit("qa", {"question": f"Autoscale burst {i}?"}) for i in range(BURST)]
    grown = wait_pool(key_terms, lambda size: size >= 3, 90, "the pool growing under the burst")
    results = [handle.get(timeout=180) for handle in handles]
    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    shrunk = wait_pool(key_terms, lambda size: size == 1, 90, "the pool shrinking once idle")
    assert pool_processes(answer) == 0 and command_line(answer)[command_line(answer).index("--concurrency") + 1] == "1"
    by_worker = {t.worker.split("@")[0] for r in results for t in r.timings}
    assert by_worker == {"stage-key_terms", "stage-answer"}  # the other stage kept its one fixed worker
    print(f"AUTOSCALE pool sizes: grew to {max(grown)}, then {shrunk[-1]}")


@pytest.mark.parametrize("text", ["key_terms", "key_terms=4", "key_terms=1..x", "=1..2"])
def test_a_bad_autoscale_option_names_the_item(text: str) -> None:
    with pytest.raises(InputError, match=f"--autoscale: autoscale '{text}': expected STAGE=MIN..MAX"):
        parse_autoscale_option(text)


def test_autoscale_env_and_an_unknown_stage(tmp_path: Path) -> None:
    assert Settings(autoscale="key_terms=1..8").autoscale == {"key_terms": (1, 8)}  # type: ignore[arg-type]
    env = worker_env(f"redis://127.0.0.1:{free_port()}/0", "http://127.0.0.1:9/v1", CATALOG)
    done = subprocess.run([STAGECOACH, "up", "--autoscale", "nope=1..2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "autoscale: unknown stage(s) nope; known stages: answer, key_terms" in done.stderr
    bad = subprocess.run([STAGECOACH, "up"], env={**env, "STAGECOACH_AUTOSCALE": "key_terms=5..2"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "STAGECOACH_AUTOSCALE: expected MIN..MAX" in bad.stderr
