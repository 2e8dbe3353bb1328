"""The shared stage cache on real workers over real Redis.

Fleet A answers a job and fills the cache; it stops. Fleet B starts fresh with an empty DSPy disk
cache of its own (DSPy's cache is on in both fleets, in separate folders, so only the Redis cache
can serve B) and answers the same job without one LM request: the test LM server counts them.
The same module checks the caching policy (opt-out, temperature > 0, rollout ids), cost
estimates from litellm's local price map, and the `stagecoach cache` / `result` commands.

These workers need a catalog and settings the session fleet does not have, so they run against a
private redis-server and a test LM server of their own (its request counts are this module's).
"""

import json
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import litellm
import pytest

from contracts.catalog import load_catalog
from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from tests.services import ROOT, Fleet, client_for, worker_env
from tests.services import test_lm as lm_server

STAGECOACH = str(Path(__import__("sys").executable).with_name("stagecoach"))
QUESTION = "Which river flows through the shared cache?"
DOCUMENT = "Barges drift past the old mill at dawn."
CATALOG = """
stages:
  - {name: cache_off, module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str},
     cache: {enabled: false}}
  - {name: cache_hot, module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str},
     lm: {temperature: 0.7}}
  - {name: cache_hot_ok, module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str},
     lm: {temperature: 0.7}, cache: {sampled: true}}
  - {name: cache_rollout, module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str},
     lm: {temperature: 0.7, rollout_id: 1}}
  - {name: cache_priced, module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str},
     lm: {model: openai/gpt-4o-mini}}
pipelines:
  - name: cache_policy
    inputs: {document: str}
    outputs: [s_off, s_hot, s_hot_ok, s_rollout]
    root:
      - {stage: cache_off, outputs: {summary: s_off}}
      - {stage: cache_hot, outputs: {summary: s_hot}}
      - {stage: cache_hot_ok, outputs: {summary: s_hot_ok}}
      - {stage: cache_rollout, outputs: {summary: s_rollout}}
  - name: cache_priced
    inputs: {document: str}
    outputs: [summary]
    root: [cache_priced]
"""


@pytest.fixture(scope="module")
def own_lm() -> Iterator[str]:
    with lm_server() as url:
        yield url


@pytest.fixture(scope="module")
def catalog_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cache-catalog")
    (folder / "cache.yaml").write_text(CATALOG)
    return [ROOT / "pipelines", folder / "cache.yaml"]


def start_fleet(name: str, redis_url: str, lm_url: str, catalog: list[Path], dspy_dir: Path) -> Fleet:
    """One worker on every stage queue and the routing queue, DSPy's own cache in `dspy_dir`."""
    env = worker_env(redis_url, lm_url, catalog=catalog, STAGECOACH_CACHE_ENABLED="true",
                     STAGECOACH_LM_CACHE="true", DSPY_CACHEDIR=str(dspy_dir))
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix=f"stagecoach-cache-{name}-")))
    queues = [stage_queue(ref) for ref in load_catalog(catalog).stages] + [ROUTING_QUEUE]
    fleet.start(name, queues, concurrency=4)
    fleet.wait_ready()
    return fleet


def lm_requests(lm_url: str) -> int:
    with urllib.request.urlopen(lm_url.removesuffix("/v1") + "/stats", timeout=5) as response:
        return int(json.load(response)["counts"].get("requests", 0))


@pytest.fixture(scope="module")
def client(private_redis: str, own_lm: str, catalog_paths: list[Path]) -> Client:
    return client_for(private_redis, own_lm, catalog_paths)


@pytest.fixture(scope="module")
def warmed(private_redis: str, own_lm: str, catalog_paths: list[Path], client: Client,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[JobResult, int]:
    """Fleet A answers the question once (filling the cache) and stops; its LM request count."""
    fleet = start_fleet("fleet-a", private_redis, own_lm, catalog_paths, tmp_path_factory.mktemp("dspy-a"))
    try:
        before = lm_requests(own_lm)
        first = client.submit("qa", {"question": QUESTION}).get(timeout=90)
        return first, lm_requests(own_lm) - before
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def fleet_b(private_redis: str, own_lm: str, catalog_paths: list[Path], warmed: tuple[JobResult, int],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    dspy_dir = tmp_path_factory.mktemp("dspy-b")
    assert not any(dspy_dir.iterdir())  # nothing DSPy could replay
    fleet = start_fleet("fleet-b", private_redis, own_lm, catalog_paths, dspy_dir)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def replayed(client: Client, own_lm: str, fleet_b: Fleet) -> tuple[JobResult, int]:
    before = lm_requests(own_lm)
    second = client.submit("qa", {"question": QUESTION}).get(timeout=90)
    return second, lm_requests(own_lm) - before


def stagecoach(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**worker_env(redis_url, "http://127.0.0.1:9/v1"), "STAGECOACH_CACHE_ENABLED": "true"}
    return subprocess.run([STAGECOACH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_first_job_calls_the_lm_and_is_not_cached(warmed: tuple[JobResult, int]) -> None:
    first, requests = warmed
    assert first.state == "succeeded", first.error
    assert requests == 2  # key_terms and answer
    assert [t.cached for t in first.timings] == [False, False]
    assert first.usage["answer"].calls == 1
    assert first.cached_usage == {}


def test_fresh_fleet_answers_from_the_shared_cache_without_lm_requests(
    warmed: tuple[JobResult, int], replayed: tuple[JobResult, int]
) -> None:
    first, _ = warmed
    second, requests = replayed
    assert second.state == "succeeded", second.error
    assert requests == 0
    assert second.answer == first.answer
    assert [(t.cached, t.cache) for t in second.timings] == [(True, "shared"), (True, "shared")]
    assert {t.worker.split("@")[0] for t in second.timings} == {"fleet-b"}
    assert second.cached_stages == ["key_terms", "answer"]


def test_a_hit_reports_the_stored_usage_as_served_from_cache(
    warmed: tuple[JobResult, int], replayed: tuple[JobResult, int]
) -> None:
    first, _ = warmed
    second, _ = replayed
    assert all(u.calls == 0 for u in second.usage.values())  # nothing spent again
    assert second.total_usage.calls == 0
    assert second.cached_usage == first.usage


def test_result_command_says_the_answer_came_from_the_cache(
    private_redis: str, replayed: tuple[JobResult, int]
) -> None:
    second, _ = replayed
    shown = stagecoach(private_redis, "result", second.job_id)
    assert shown.returncode == 0, shown.stderr
    assert "served from the shared cache (no LM call): key_terms, answer" in shown.stdout
    assert "from cache" in shown.stdout and "1 calls" in shown.stdout
    as_json = json.loads(stagecoach(private_redis, "result", second.job_id, "--json").stdout)
    assert [t["cached"] for t in as_json["timings"]] == [True, True]
    assert as_json["cached_usage"]["answer"]["calls"] == 1


def test_cache_stats_count_hits_and_misses_per_stage(private_redis: str, replayed: tuple[JobResult, int]) -> None:
    shown = stagecoach(private_redis, "cache", "stats", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    by_stage = {s["stage"]: s for s in report["stages"]}
    for stage in ("key_terms@1", "answer@1"):
        assert by_stage[stage]["misses"] >= 1 and by_stage[stage]["hits"] >= 1
        assert by_stage[stage]["entries"] >= 1 and by_stage[stage]["bytes"] > 0
    assert report["total_bytes"] == sum(s["bytes"] for s in report["stages"])
    table = stagecoach(private_redis, "cache", "stats")
    assert "hit rate" in table.stdout and "key_terms@1" in table.stdout


def test_clearing_one_stage_makes_only_it_call_the_lm_again(
    private_redis: str, own_lm: str, client: Client, replayed: tuple[JobResult, int]
) -> None:
    cleared = stagecoach(private_redis, "cache", "clear", "key_terms")
    assert cleared.returncode == 0, cleared.stderr
    assert "removed 1 cache entries of key_terms" in cleared.stdout
    before = lm_requests(own_lm)
    third = client.submit("qa", {"question": QUESTION}).get(timeout=90)
    assert lm_requests(own_lm) - before == 1  # key_terms again; answer's inputs are unchanged: a hit
    assert [t.cached for t in third.timings] == [False, True]


def test_policy_opt_out_and_sampling(own_lm: str, client: Client, fleet_b: Fleet) -> None:
    runs = [client.submit("cache_policy", {"document": DOCUMENT}).get(timeout=90) for _ in range(2)]
    assert all(r.state == "succeeded" for r in runs), [r.error for r in runs]
    # DSPy's own cache is on in these workers, and it is visible too: cache_hot_ok sends the very request
    # cache_hot just sent (same prompt and temperature), which DSPy replays in the same process
    assert {t.stage: t.cache for t in runs[0].timings} == {"cache_off": None, "cache_hot": None,
                                                           "cache_hot_ok": "dspy", "cache_rollout": None}
    # the second time, what the shared cache may not keep DSPy replays (no usage recorded, none claimed)
    served = {t.stage: t.cache for t in runs[1].timings}
    assert served == {"cache_off": "dspy", "cache_hot": "dspy", "cache_hot_ok": "shared", "cache_rollout": "shared"}
    assert all(t.cached for t in runs[1].timings)
    assert runs[1].usage["cache_off"].calls == 0 and "cache_off" not in runs[1].cached_usage


def test_cost_is_estimated_where_the_local_price_map_knows_the_model(client: Client, fleet_b: Fleet) -> None:
    result = client.submit("cache_priced", {"document": DOCUMENT + " priced"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    used = result.usage["cache_priced"]
    prices = litellm.model_cost["gpt-4o-mini"]
    expected = used.prompt_tokens * prices["input_cost_per_token"] + used.completion_tokens * prices[
        "output_cost_per_token"]
    assert used.cost_usd == pytest.approx(expected)
    assert used.unpriced == []
    assert result.total_usage.cost_usd == pytest.approx(expected)


def test_unknown_price_gives_no_cost_and_names_the_model(warmed: tuple[JobResult, int], private_redis: str) -> None:
    first, _ = warmed
    assert first.usage["answer"].cost_usd is None
    assert first.usage["answer"].unpriced == ["openai/test-lm"]
    shown = stagecoach(private_redis, "result", first.job_id)
    assert "unknown (no local price for openai/test-lm)" in shown.stdout
