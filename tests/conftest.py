"""Session fixtures: real Redis, the test LM server, and one worker subprocess per stage queue."""

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from contracts.catalog import Catalog, load_catalog
from routing.client import Client
from tests import services
from tests.services import Fleet, client_for, default_catalog, hotpotqa_path, redis_server, test_lm, worker_env

# The longest modules go first: `make test` runs two pytest workers (xdist, one module per worker at a time,
# in collection order: --no-loadscope-reorder), and a long module started last would run alone at the end.
LONG_MODULES = ("test_bench_smoke.py", "test_examples.py", "test_multihop_local.py", "test_local_model.py",
                "test_api.py", "test_optimize_resume.py", "test_rabbitmq.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)
    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def lm_url() -> Iterator[str]:
    with test_lm() as url:
        yield url


@pytest.fixture(scope="session")
def hotpotqa() -> Path:
    """The HotPotQA benchmark slice; a clear failure (never a skip) when it is not there."""
    path = hotpotqa_path()
    if not path.is_file():
        pytest.fail(f"HotPotQA slice not found at {path}: put the project's shared/ folder beside the repository "
                    "or set STAGECOACH_HOTPOTQA_PATH to the file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog(default_catalog())


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A redis-server of this test module's own (for worker setups the session fleet must not see)."""
    with services.private_redis() as url:
        yield url


@pytest.fixture(scope="session")
def fleet(redis_url: str, lm_url: str, catalog: Catalog) -> Iterator[Fleet]:
    """One worker per stage queue plus the routing worker, for the whole session."""
    logdir = Path(tempfile.mkdtemp(prefix="stagecoach-workers-"))
    fleet = Fleet(worker_env(redis_url, lm_url), logdir)
    fleet.start_per_stage(catalog.stages)
    try:
        fleet.wait_ready()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="session")
def session_client(redis_url: str, lm_url: str) -> Client:
    """A client of the session's Redis (no fleet needed to build one)."""
    return client_for(redis_url, lm_url)


@pytest.fixture(scope="session")
def app(session_client: Client) -> Celery:
    return session_client.app


@pytest.fixture(scope="session")
def client(session_client: Client, fleet: Fleet) -> Client:
    return session_client


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]
