"""The cache store itself against a private redis-server: byte bound, LRU order, TTL, clear, keys.

No workers: these drive `StageCache` directly, the way the stage runner does.
"""

from collections.abc import Iterator

import litellm
import pytest
import redis

from contracts.envelope import Usage
from contracts.names import CACHE_KEY_PREFIX
from contracts.specs import StageSpec
from tests import services
from workers.cache import StageCache, cache_digest, cacheable
from workers.cost import price
from workers.settings import CacheSettings

USAGE = Usage(prompt_tokens=10, completion_tokens=2, calls=1)
SPEC = StageSpec.model_validate({"name": "probe", "module": "examples.basic:Summarize",
                                 "inputs": {"document": "str"}, "outputs": {"summary": "str"}})
LM = {"model": "openai/test-lm", "api_base": "http://x/v1", "temperature": 0.0, "max_tokens": 100,
      "rollout_id": None, "adapter": "SchemaJSONAdapter", "structured": True}


@pytest.fixture()
def client() -> Iterator[redis.Redis]:
    with services.private_redis() as url:
        yield redis.Redis.from_url(url)


def entry(index: int) -> dict[str, str]:
    return {"summary": f"summary {index} " + "x" * 200}


def test_a_stored_entry_is_served_with_its_usage(client: redis.Redis) -> None:
    cache = StageCache(client, CacheSettings())
    assert cache.get("probe@1", "d1") is None
    cache.put("probe@1", "d1", entry(1), USAGE)
    hit = cache.get("probe@1", "d1")
    assert hit is not None and hit.outputs == entry(1) and hit.usage == USAGE
    stats = {s.stage: s for s in cache.report().stages}["probe@1"]
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.hit_rate == 0.5


def test_total_size_is_bounded_by_evicting_the_least_recently_used(client: redis.Redis) -> None:
    probe = StageCache(client, CacheSettings())
    probe.put("probe@1", "size", entry(0), USAGE)
    one = probe.report().total_bytes
    probe.clear()
    cache = StageCache(client, CacheSettings(max_bytes=3 * one + 10))  # room for three entries
    for index in range(3):
        cache.put("probe@1", f"d{index}", entry(index), USAGE)
    assert cache.get("probe@1", "d0") is not None  # d0 used again: d1 is now the oldest
    evicted = cache.put("probe@1", "d3", entry(3), USAGE)
    report = cache.report()
    assert evicted >= 1
    assert report.total_bytes <= report.max_bytes
    assert cache.get("probe@1", "d1") is None
    assert cache.get("probe@1", "d0") is not None and cache.get("probe@1", "d3") is not None
    stats = report.stages[0]
    assert stats.evictions == evicted and stats.entries == 4 - evicted
    assert stats.bytes == report.total_bytes


def test_expired_entries_leave_the_accounting(client: redis.Redis) -> None:
    cache = StageCache(client, CacheSettings())
    cache.put("probe@1", "short", entry(1), USAGE, ttl=1)
    cache.put("probe@1", "long", entry(2), USAGE)
    services.wait_until(lambda: not client.exists(f"{CACHE_KEY_PREFIX}entry:probe@1:short"), 10, "expiry")
    report = cache.report()
    stats = report.stages[0]
    assert (stats.entries, stats.expired, stats.evictions) == (1, 1, 0)
    assert report.total_bytes == stats.bytes > 0


def test_an_oversized_entry_is_not_stored(client: redis.Redis) -> None:
    cache = StageCache(client, CacheSettings(max_entry_bytes=100))
    cache.put("probe@1", "big", entry(1), USAGE)
    assert cache.get("probe@1", "big") is None
    assert cache.report().total_bytes == 0


def test_clear_removes_one_stage_or_version_and_nothing_else(client: redis.Redis) -> None:
    client.set("unrelated", "kept")
    cache = StageCache(client, CacheSettings())
    for stage in ("probe@1", "probe@2", "other@1"):
        cache.put(stage, "d", entry(1), USAGE)
    assert cache.clear("probe@1") == 1
    assert [s.stage for s in cache.report().stages] == ["other@1", "probe@2"]
    assert cache.clear("probe") == 1
    assert cache.clear() == 1
    assert cache.report().total_bytes == 0
    assert [k.decode() for k in client.keys("*")] == ["unrelated"]


def test_key_covers_version_state_lm_and_inputs() -> None:
    base = cache_digest(SPEC, LM, {"document": "a"})
    assert base == cache_digest(SPEC, dict(reversed(list(LM.items()))), {"document": "a"})  # canonical
    changed = [
        cache_digest(SPEC.model_copy(update={"version": "2"}), LM, {"document": "a"}),
        cache_digest(SPEC.model_copy(update={"state_digest": "abc"}), LM, {"document": "a"}),
        cache_digest(SPEC, {**LM, "model": "openai/other"}, {"document": "a"}),
        cache_digest(SPEC, {**LM, "temperature": 0.1}, {"document": "a"}),
        cache_digest(SPEC, {**LM, "max_tokens": 99}, {"document": "a"}),
        cache_digest(SPEC, {**LM, "api_base": "http://y/v1"}, {"document": "a"}),
        cache_digest(SPEC, {**LM, "adapter": "JSONAdapter"}, {"document": "a"}),
        cache_digest(SPEC, LM, {"document": "b"}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_sampling_is_cached_only_when_allowed() -> None:
    hot = {**LM, "temperature": 0.7}
    assert cacheable(SPEC, LM)
    assert not cacheable(SPEC, hot)
    assert cacheable(SPEC, {**hot, "rollout_id": 3})
    assert cacheable(SPEC.model_copy(update={"cache": SPEC.cache.model_copy(update={"sampled": True})}), hot)
    assert not cacheable(SPEC.model_copy(update={"cache": SPEC.cache.model_copy(update={"enabled": False})}), LM)


def test_unreachable_redis_means_uncached_not_failed() -> None:
    cache = StageCache(redis.Redis(port=services.free_port(), socket_connect_timeout=0.2), CacheSettings())
    assert cache.get("probe@1", "d") is None
    assert cache.put("probe@1", "d", entry(1), USAGE) == 0


def test_prices_come_from_litellms_local_map() -> None:
    expected = sum(litellm.cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=1000, completion_tokens=200))
    assert price("openai/gpt-4o-mini", 1000, 200) == pytest.approx(expected)
    assert price("openai/test-lm", 1000, 200) is None
