"""The stage cache: one Redis store shared by every worker of every stage, on every machine.

An entry is a stage's validated outputs plus the usage the original LM calls cost, keyed by a
sha256 over canonical JSON of everything that determines the answer: stage name and version,
module, saved-state digest, output contract, LM identity and sampling settings, the adapter and
the validated inputs. Entries expire `ttl` seconds after their last use; the total size is
bounded by evicting the least recently used entries (a sorted set of last-use times plus byte
accounting, updated atomically by Lua scripts). Per stage version a hash counts hits, misses,
evictions, expiries, entries and bytes. A Redis failure never fails a stage: it runs uncached.

The scripts touch keys derived from their arguments, which a single Redis server allows (not a
Redis Cluster); the broker is a single server anyway.
"""

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel

from contracts.candidates import TraceStep
from contracts.connections import SentinelSettings, redis_client
from contracts.envelope import Usage
from contracts.names import (
    CACHE_ENTRY_PREFIX,
    CACHE_LRU_KEY,
    CACHE_SIZES_KEY,
    CACHE_STATS_PREFIX,
    CACHE_TOTAL_KEY,
    cache_entry_key,
    cache_entry_pattern,
    cache_stats_key,
)
from contracts.specs import StageSpec
from workers.settings import CacheSettings

log = logging.getLogger(__name__)
SWEEP_BATCH = 500

# forget one entry: drop it and its accounting; `reason` (or, for "auto", whether it was still
# alive) names the counter it adds to
_FORGET = """
local function forget(key, reason)
  local size = tonumber(redis.call('HGET', KEYS[2], key) or '0')
  local stage = string.match(string.sub(key, string.len(ARGV[1]) + 1), '^(.*):[^:]*$')
  local stats = ARGV[2] .. stage
  local live = redis.call('DEL', key)
  if reason == 'auto' then
    if live == 1 then reason = 'evictions' else reason = 'expired' end
  end
  local known = redis.call('ZREM', KEYS[1], key)
  redis.call('HDEL', KEYS[2], key)
  if known == 1 then
    redis.call('DECRBY', KEYS[3], size)
    redis.call('HINCRBY', stats, 'bytes', -size)
    redis.call('HINCRBY', stats, 'entries', -1)
    redis.call('HINCRBY', stats, reason, 1)
  end
  return reason
end
"""

# KEYS: lru, sizes, total, entry, stats; ARGV: entry prefix, stats prefix, value, ttl, now, max bytes
_PUT = _FORGET + """
local size = string.len(ARGV[3])
local old = redis.call('HGET', KEYS[2], KEYS[4])
redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[5], KEYS[4])
redis.call('HSET', KEYS[2], KEYS[4], size)
redis.call('INCRBY', KEYS[3], size - tonumber(old or '0'))
redis.call('HINCRBY', KEYS[5], 'bytes', size - tonumber(old or '0'))
if not old then redis.call('HINCRBY', KEYS[5], 'entries', 1) end
local evicted = 0
while tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[6]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest or oldest == KEYS[4] then break end
  if forget(oldest, 'auto') == 'evictions' then evicted = evicted + 1 end
end
return evicted
"""

# KEYS: entry, lru, stats; ARGV: now, ttl. A hit refreshes the entry's TTL and its last use.
_GET = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
  redis.call('HINCRBY', KEYS[3], 'hits', 1)
else
  redis.call('HINCRBY', KEYS[3], 'misses', 1)
end
return value
"""

# KEYS: lru, sizes, total; ARGV: entry prefix, stats prefix, reason, key...
_FORGET_MANY = _FORGET + """
for i = 4, #ARGV do forget(ARGV[i], ARGV[3]) end
return #ARGV - 3
"""


@dataclass(frozen=True)
class CacheHit:
    outputs: dict[str, Any]
    usage: Usage
    stored_at: float
    trace: list[TraceStep] | None = None  # an entry of a candidate's run holds its predictor calls


class StageCacheStats(BaseModel):
    """What `stagecoach cache stats` shows for one stage version."""

    stage: str
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expired: int = 0
    entries: int = 0
    bytes: int = 0

    @property
    def hit_rate(self) -> float | None:
        asked = self.hits + self.misses
        return self.hits / asked if asked else None


class CacheReport(BaseModel):
    stages: list[StageCacheStats]
    total_bytes: int
    max_bytes: int


class StageCache:
    def __init__(self, client: redis.Redis, settings: CacheSettings) -> None:
        self.client = client
        self.settings = settings
        self._put = client.register_script(_PUT)
        self._get = client.register_script(_GET)
        self._forget = client.register_script(_FORGET_MANY)

    @classmethod
    def from_url(cls, url: str, settings: CacheSettings, sentinel: SentinelSettings | None = None) -> "StageCache":
        return cls(redis_client(url, sentinel), settings)

    def get(self, stage: str, digest: str, ttl: int | None = None) -> CacheHit | None:
        """The entry for this stage version and key digest, counting a hit or a miss."""
        keys = [cache_entry_key(stage, digest), CACHE_LRU_KEY, cache_stats_key(stage)]
        try:
            raw = self._get(keys=keys, args=[time.time(), ttl or self.settings.ttl])
        except redis.RedisError as error:
            log.warning("stage cache unreachable, running uncached: %s", error)
            return None
        return _hit(raw) if raw else None

    def put(self, stage: str, digest: str, outputs: dict[str, Any], usage: Usage, ttl: int | None = None,
            trace: list[TraceStep] | None = None) -> int:
        """Store an entry; returns how many older entries were evicted to stay under max_bytes."""
        entry: dict[str, Any] = {"outputs": outputs, "usage": usage.model_dump(mode="json"), "stored_at": time.time()}
        if trace is not None:
            entry["trace"] = [step.model_dump(mode="json") for step in trace]
        value = json.dumps(entry)
        if len(value.encode()) > min(self.settings.max_entry_bytes, self.settings.max_bytes):
            return 0
        keys = [CACHE_LRU_KEY, CACHE_SIZES_KEY, CACHE_TOTAL_KEY, cache_entry_key(stage, digest),
                cache_stats_key(stage)]
        args: list[str | int | float] = [CACHE_ENTRY_PREFIX, CACHE_STATS_PREFIX, value, ttl or self.settings.ttl,
                                         time.time(), self.settings.max_bytes]
        try:
            return int(self._put(keys=keys, args=args))
        except redis.RedisError as error:
            log.warning("stage cache unreachable, result not stored: %s", error)
            return 0

    def report(self) -> CacheReport:
        """Per-stage statistics, after accounting for entries that expired since they were last used."""
        self.sweep()
        stages = [self._stats(key) for key in sorted(self.client.scan_iter(match=CACHE_STATS_PREFIX + "*"))]
        total = int(self.client.get(CACHE_TOTAL_KEY) or 0)
        return CacheReport(stages=stages, total_bytes=total, max_bytes=self.settings.max_bytes)

    def sweep(self) -> int:
        """Forget entries whose TTL ran out (Redis dropped the value; the accounting is ours)."""
        members = [_text(m) for m in self.client.zrange(CACHE_LRU_KEY, 0, -1)]  # type: ignore[arg-type]
        gone = 0
        for start in range(0, len(members), SWEEP_BATCH):
            batch = members[start:start + SWEEP_BATCH]
            pipe = self.client.pipeline()
            for key in batch:
                pipe.exists(key)
            expired = [key for key, alive in zip(batch, pipe.execute(), strict=True) if not alive]
            gone += self._forget_keys(expired, "expired")
        return gone

    def clear(self, stage: str | None = None) -> int:
        """Delete the entries (and statistics) of one stage (`answer`: every version), or all."""
        pattern = cache_entry_pattern(stage)
        known = [_text(m) for m, _ in self.client.zscan_iter(CACHE_LRU_KEY, match=pattern)]
        self._forget_keys(known, "cleared")
        strays = list(self.client.scan_iter(match=pattern))
        if strays:
            self.client.delete(*strays)
        stats = list(self.client.scan_iter(match=_stats_pattern(stage)))
        if stats:
            self.client.delete(*stats)
        if stage is None:
            self.client.delete(CACHE_LRU_KEY, CACHE_SIZES_KEY, CACHE_TOTAL_KEY)
        return len(set(known) | {_text(s) for s in strays})

    def _forget_keys(self, keys: list[str], reason: str) -> int:
        for start in range(0, len(keys), SWEEP_BATCH):
            batch = keys[start:start + SWEEP_BATCH]
            self._forget(keys=[CACHE_LRU_KEY, CACHE_SIZES_KEY, CACHE_TOTAL_KEY],
                         args=[CACHE_ENTRY_PREFIX, CACHE_STATS_PREFIX, reason, *batch])
        return len(keys)

    def _stats(self, key: bytes | str) -> StageCacheStats:
        raw = {_text(k): int(v) for k, v in self.client.hgetall(key).items()}
        known = {name: raw[name] for name in StageCacheStats.model_fields if name in raw}
        return StageCacheStats(stage=_text(key)[len(CACHE_STATS_PREFIX):], **known)


def _hit(raw: bytes | str) -> CacheHit | None:
    try:
        data = json.loads(raw)
        trace = [TraceStep.model_validate(step) for step in data["trace"]] if "trace" in data else None
        return CacheHit(data["outputs"], Usage.model_validate(data["usage"]), float(data["stored_at"]), trace)
    except (ValueError, KeyError, TypeError):
        return None  # an entry we cannot read is a miss; the fresh result overwrites it


def _stats_pattern(stage: str | None) -> str:
    if stage is None:
        return CACHE_STATS_PREFIX + "*"
    return cache_stats_key(stage) if "@" in stage else cache_stats_key(stage + "@*")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cache_digest(spec: StageSpec, lm_identity: dict[str, Any], inputs: dict[str, Any],
                 candidate: str | None = None) -> str:
    """sha256 of canonical JSON over everything that determines a stage's answer. `candidate`: an
    optimiser's candidate state digest (or "base"), which replaces the saved state's."""
    material: dict[str, Any] = {
        "stage": spec.name,
        "version": spec.version,
        "module": spec.module,
        "program": spec.program,
        "options": spec.options,
        "state": spec.state_digest,
        "outputs": {name: field.model_dump(mode="json") for name, field in spec.outputs.items()},
        "lm": lm_identity,
        "inputs": inputs,
    }
    if candidate is not None:
        material["candidate"] = candidate  # an entry that also holds the run's trace
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cacheable(spec: StageSpec, lm_identity: dict[str, Any]) -> bool:
    """Sampling at temperature > 0 varies between calls: cached only when the spec accepts that or
    a rollout id makes the call deterministic."""
    if not spec.cache.enabled:
        return False
    sampled = float(lm_identity.get("temperature") or 0.0) > 0
    return not sampled or spec.cache.sampled or lm_identity.get("rollout_id") is not None
