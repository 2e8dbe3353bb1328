"""Throwaway fleets for tests and benchmarks: a private Redis, the test LM, worker subprocesses.

Everything here is started on free ports and stopped by its context manager or `Fleet.stop`, so
a suite or a benchmark never touches a Redis or a worker it did not start. `stagecoach up`
starts Redis the same way (`cli.stack`).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli import stack
from cli.workercmd import Autoscale, WorkerCommand, stage_worker_name
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from workers.factory import create_runtime
from workers.settings import CacheSettings, LMSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CELERY = str(Path(PYTHON).with_name("celery"))
TEST_LM_MODEL = "openai/test-lm"

free_port = stack.free_port
reachable = stack.redis_reachable


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def process(cmd: list[str], ready: Callable[[], bool], what: str, timeout: float = 60) -> Iterator[None]:
    """A subprocess that must become ready (and stay alive) within `timeout`; stopped on exit."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _alive(proc, what) and ready(), timeout, what)
        yield
    finally:
        stop_process(proc)


def stop_process(proc: "subprocess.Popen[Any]", sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """Signal `proc` (terminate by default) and wait `grace` seconds for it; then kill it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _alive(proc: subprocess.Popen[bytes], what: str) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
    return True


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of its own on a free port: its data is nobody else's, and it dies with us."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cmd = [stack.redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", tempfile.mkdtemp(prefix="stagecoach-redis-")]
    with process(cmd, lambda: reachable(url), f"redis-server on port {port}", timeout=20):
        yield url


@contextmanager
def test_lm_server(*args: str) -> Iterator[str]:
    """The deterministic test LM server (`workers.testlm`); yields its OpenAI base URL."""
    port = free_port()
    with process([PYTHON, "-m", "workers.testlm", "--port", str(port), *args],
                 lambda: http_ok(f"http://127.0.0.1:{port}/health"), "test LM server", timeout=20):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def local_lm_server() -> Iterator[str]:
    """The bundled SmolLM2 server (`workers.local_lm`) on a free port; yields its OpenAI base URL."""
    port = free_port()
    with process([PYTHON, "-m", "workers.local_lm", "--port", str(port)],
                 lambda: http_ok(f"http://127.0.0.1:{port}/v1/models"), "SmolLM2 server"):
        yield f"http://127.0.0.1:{port}/v1"


def client_for(redis_url: str, lm_url: str, catalog: list[Path], model: str = TEST_LM_MODEL,
               shared_cache: bool = False) -> Client:
    """A client with the same settings the workers of a fleet get (`shared_cache`: whether the fleet's is on)."""
    settings = Settings(broker_url=redis_url, catalog=catalog,
                        lm=LMSettings(model=model, api_base=lm_url, cache=False),
                        cache=CacheSettings(enabled=shared_cache))
    return Client(create_runtime(settings))


def worker_env(redis_url: str, lm_url: str, catalog: list[Path], **extra: str) -> dict[str, str]:
    """The environment of a fleet's workers: this process's, minus any STAGECOACH_ setting of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGECOACH_")}
    env.update({
        "STAGECOACH_BROKER_URL": redis_url,
        "STAGECOACH_LM_MODEL": TEST_LM_MODEL,
        "STAGECOACH_LM_API_BASE": lm_url,
        "STAGECOACH_LM_CACHE": "false",
        "STAGECOACH_CACHE_ENABLED": "false",  # every job reaches the LM unless a fleet turns the shared cache on
        "STAGECOACH_CATALOG": json.dumps([str(p) for p in catalog]),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    return env


@dataclass
class Worker:
    name: str
    queues: list[str]
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)


@dataclass
class Fleet:
    """Celery worker subprocesses sharing one environment (broker, LM, catalog)."""

    env: dict[str, str]
    logdir: Path
    workers: list[Worker] = field(default_factory=list)

    def start(self, name: str, queues: list[str], pool: str = "threads", concurrency: int = 4,
              extra: list[str] | None = None, autoscale: Autoscale | None = None) -> Worker:
        log = self.logdir / f"{name}.log"
        command = WorkerCommand(name, tuple(queues), pool=pool, concurrency=concurrency, autoscale=autoscale,
                                logfile=str(log), program=CELERY, extra=tuple(extra or ()))
        with open(self.logdir / f"{name}.err", "wb") as err:
            proc = subprocess.Popen(command.argv(), cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=err)
        worker = Worker(name, queues, proc, log)
        self.workers.append(worker)
        return worker

    def start_per_stage(self, stages: Iterable[str], concurrency: int = 4, routing_concurrency: int = 8) -> None:
        """One worker `stage-<name>` per stage queue and the routing worker, as `stagecoach up` runs them."""
        for stage in stages:
            self.start(stage_worker_name(stage), [stage_queue(stage)], concurrency=concurrency)
        self.start("routing", [ROUTING_QUEUE], concurrency=routing_concurrency)

    def wait_ready(self, timeout: float = 300) -> None:
        for worker in self.workers:
            wait_until(lambda w=worker: self._ready(w), timeout, f"worker {worker.name}")  # type: ignore[misc]

    def _ready(self, worker: Worker) -> bool:
        if worker.proc.poll() is not None:
            err = (self.logdir / f"{worker.name}.err").read_text(errors="replace")
            raise RuntimeError(f"worker {worker.name} exited: {err[-3000:]}\n{worker.log_text()[-2000:]}")
        return " ready." in worker.log_text()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
