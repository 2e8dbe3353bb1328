"""Real services for tests: each session gets its own redis-server on a free port, the test LM
server and Celery worker subprocesses (the fleet helpers live in `cli.fleet`, shared with bench/).

`STAGECOACH_TEST_REDIS_URL` points the suite at a Redis of your choosing instead; the suite then
uses that database as its own. When no redis-server can be started the tests fail; they never
skip, so CI cannot pass without a broker.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.fleet import (
    CELERY,
    PYTHON,
    ROOT,
    Fleet,
    Worker,
    free_port,
    http_ok,
    private_redis,
    reachable,
    test_lm_server,
    wait_until,
)
from cli.fleet import client_for as _client_for
from cli.fleet import worker_env as _worker_env
from routing.client import Client

__all__ = ["CELERY", "PYTHON", "ROOT", "Fleet", "Worker", "free_port", "http_ok", "private_redis", "reachable",
           "wait_until"]

TEST_PIPELINES = ROOT / "tests" / "pipelines"
HOTPOTQA_DEFAULT = ROOT.parent / "shared" / "data" / "hotpotqa_dev_hard_200.jsonl"


def hotpotqa_path() -> Path:
    """The HotPotQA slice: STAGECOACH_HOTPOTQA_PATH, else ../shared/data beside the repo."""
    return Path(os.environ.get("STAGECOACH_HOTPOTQA_PATH") or HOTPOTQA_DEFAULT).resolve()


def default_catalog() -> list[Path]:
    return [ROOT / "pipelines", TEST_PIPELINES]


@contextmanager
def redis_server() -> Iterator[str]:
    """This session's Redis: a private server, unless STAGECOACH_TEST_REDIS_URL names one."""
    if os.environ.get("STAGECOACH_TEST_REDIS_URL"):
        if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # two sessions would share the database
            raise RuntimeError("STAGECOACH_TEST_REDIS_URL names one database for the whole suite: run the "
                               "sessions one at a time (make test TEST_WORKERS=0)")
        yield os.environ["STAGECOACH_TEST_REDIS_URL"]
        return
    with private_redis() as url:
        yield url


test_lm = test_lm_server


@contextmanager
def per_stage_fleet(env: dict[str, str], logdir: Path, stages: list[str]) -> Iterator[Fleet]:
    """One worker per stage queue, ready, stopped on the way out."""
    fleet = Fleet(env, logdir)
    fleet.start_per_stage(stages)
    try:
        fleet.wait_ready()
        yield fleet
    finally:
        fleet.stop()


def client_for(redis_url: str, lm_url: str, catalog: list[Path] | None = None) -> Client:
    return _client_for(redis_url, lm_url, catalog or default_catalog())


def worker_env(redis_url: str, lm_url: str, catalog: list[Path] | None = None, **extra: str) -> dict[str, str]:
    """A test fleet's environment; its workers read the HotPotQA slice where the tests do."""
    extra = {"STAGECOACH_HOTPOTQA_PATH": str(hotpotqa_path()), **extra}
    return _worker_env(redis_url, lm_url, catalog or default_catalog(), **extra)
