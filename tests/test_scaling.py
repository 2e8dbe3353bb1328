"""Several workers on one stage queue: `stagecoach up --workers key_terms=2` starts two processes on
`stage.key_terms`, and a burst of jobs is shared between them (StageTiming.worker names the worker)."""

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.inputs import InputError
from cli.up import parse_worker_counts
from routing.client import Client
from tests.services import ROOT, free_port, worker_env
from tests.services import test_lm as lm_server
from workers.factory import create_runtime
from workers.settings import LMSettings, Settings

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
CATALOG = [ROOT / "pipelines" / "qa.yaml"]
BURST = 12


@pytest.fixture(scope="module")
def slow_lm() -> Iterator[str]:
    """A test LM taking 300 ms a call, so a burst keeps both workers of a queue busy."""
    with lm_server("--latency-ms", "300") as url:
        yield url


@pytest.fixture
def scaled_stack(slow_lm: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`stagecoach up --workers key_terms=2` with a Redis it starts itself; one task at a time per worker."""
    broker = f"redis://127.0.0.1:{free_port()}/0"
    env = worker_env(broker, slow_lm, CATALOG, STAGECOACH_FLOWER_PORT=str(free_port()), STAGECOACH_CONCURRENCY="1")
    proc = subprocess.Popen([STAGECOACH, "up", "--workers", "key_terms=2"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        table = read_until(proc, "stack ready")
        yield table, json.loads((tmp_path / ".stagecoach" / "stack.json").read_text())["broker_url"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def read_until(proc: subprocess.Popen[str], marker: str) -> str:
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when `up` exits; it gives up by itself after its ready timeout
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} from stagecoach up:\n{''.join(seen)}")


def test_two_workers_on_one_stage_queue_share_a_burst(scaled_stack: tuple[str, str], slow_lm: str) -> None:
    table, broker = scaled_stack
    assert "stage-key_terms-2" in table and table.count("stage.key_terms") == 2
    settings = Settings(broker_url=broker, catalog=CATALOG, lm=LMSettings(model="openai/test-lm", api_base=slow_lm))
    client = Client(create_runtime(settings))
    handles = [client.submit("qa", {"question": f"Burst question {i}?"}) for i in range(BURST)]
    results = [handle.get(timeout=180) for handle in handles]
    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    by_worker = Counter(t.worker.split("@")[0] for r in results for t in r.timings if t.stage == "key_terms")
    assert set(by_worker) == {"stage-key_terms", "stage-key_terms-2"}, by_worker
    assert sum(by_worker.values()) == BURST
    answers = Counter(t.worker.split("@")[0] for r in results for t in r.timings if t.stage == "answer")
    assert set(answers) == {"stage-answer"}  # the other stage still has one worker


@pytest.mark.parametrize(
    ("text", "expected"),
    [("retrieve=3,synthesize=2", {"retrieve": 3, "synthesize": 2}), ("key_terms=1", {"key_terms": 1}), ("", {})],
)
def test_worker_counts_parse(text: str, expected: dict[str, int]) -> None:
    assert parse_worker_counts(text) == expected


@pytest.mark.parametrize("text", ["retrieve", "retrieve=0", "retrieve=x", "=2"])
def test_bad_worker_counts_name_the_item(text: str) -> None:
    with pytest.raises(InputError, match=f"--workers '{text}': expected STAGE=N"):
        parse_worker_counts(text)


def test_up_rejects_an_unknown_stage_before_starting_anything(tmp_path: Path) -> None:
    env = worker_env(f"redis://127.0.0.1:{free_port()}/0", "http://127.0.0.1:9/v1", CATALOG)
    done = subprocess.run([STAGECOACH, "up", "--workers", "nope=2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "workers: unknown stage(s) nope; known stages: answer, key_terms" in done.stderr
    assert not (tmp_path / ".stagecoach").exists()  # nothing was started
