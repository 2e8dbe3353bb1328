"""Security (issue 9): the LM API key never reaches envelopes, results, checkpoints, dead letters,
traces or logs; the Redis password travels in the URL and stays out of logs and errors. (JSON only:
pickle, YAML and msgpack are refused in tests/test_reliability_poison.py.) Real Redis and workers."""

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contracts.names import ROUTING_QUEUE
from routing.client import Client
from tests.reliability_kit import RestartableRedis, catalog_paths, qa_fleet, restartable_redis, run_message, wait_for
from tests.services import Fleet, worker_env
from workers.factory import create_runtime
from workers.settings import LMSettings, Settings

API_KEY = "sk-canary-" + uuid.uuid4().hex
PASSWORD = "pw-" + uuid.uuid4().hex[:12]
STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))


@pytest.fixture(scope="module")
def server() -> Iterator[RestartableRedis]:
    with restartable_redis(PASSWORD) as running:
        yield running


@pytest.fixture(scope="module")
def fleet(server: RestartableRedis, lm_url: str) -> Iterator[Fleet]:
    shared = ("rel_summarize", "rel_headline")
    with qa_fleet(server.url, lm_url, shared=shared, STAGECOACH_LM_API_KEY=API_KEY) as workers:
        yield workers


@pytest.fixture(scope="module")
def client(server: RestartableRedis, lm_url: str, fleet: Fleet) -> Client:
    settings = Settings(broker_url=server.url, catalog=catalog_paths(),
                        lm=LMSettings(model="openai/test-lm", api_base=lm_url, api_key=API_KEY, cache=False))
    return Client(create_runtime(settings))


def everything_in_redis(url: str) -> str:
    """Every key and value of the private Redis, as text."""
    db = redis.Redis.from_url(url)
    parts = []
    for key in db.scan_iter(count=500):
        kind = db.type(key).decode()
        value = {"string": lambda k: db.get(k), "hash": lambda k: db.hgetall(k), "list": lambda k: db.lrange(k, 0, -1),
                 "zset": lambda k: db.zrange(k, 0, -1), "set": lambda k: db.smembers(k)}.get(kind, lambda k: b"")(key)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def test_password_in_the_url_works_and_the_api_key_leaks_nowhere(server: RestartableRedis, fleet: Fleet,
                                                                   client: Client) -> None:
    good = client.submit("qa", {"question": "Secrets safe?"}).get(timeout=60)
    assert good.ok
    failed = client.submit("rel_two", {"document": "d", "hint": "[[lm:status=401]] unauthorised"}).get(timeout=60)
    assert failed.state == "failed"  # an auth error from the LM: its message must not carry the key either
    db = redis.Redis.from_url(server.url)
    db.lpush(ROUTING_QUEUE, json.dumps({**run_message(uuid.uuid4().hex, {"pipeline": "qa"}), "content-type": "x"}))
    wait_for(lambda: db.llen("stagecoach:deadletters"), 30, "a dead letter")
    texts = [good.model_dump_json(), failed.model_dump_json(), everything_in_redis(server.url)]
    texts += [w.log_text() + (fleet.logdir / f"{w.name}.err").read_text(errors="replace") for w in fleet.workers]
    assert all(API_KEY not in text for text in texts)
    assert all(PASSWORD not in text for text in texts[3:])  # worker logs mask the broker password


def test_errors_name_the_broker_without_its_password(server: RestartableRedis, lm_url: str) -> None:
    wrong = server.url.replace(PASSWORD, "not-the-password")
    done = subprocess.run([STAGECOACH, "dead-letters"], env=worker_env(wrong, lm_url), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 4
    assert f"127.0.0.1:{server.port}" in done.stderr and "not-the-password" not in done.stderr
