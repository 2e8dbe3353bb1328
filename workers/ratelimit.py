"""Per-stage rate limits shared by every worker of a stage: a sliding window kept in Redis.

Each stage call takes one slot (calls) or checks the tokens used in the window (tokens, recorded
after the call from the LM's usage). A worker over the limit waits until the window frees a
slot, logs that it is throttling, and the wait is recorded in the stage's timing.
"""

import logging
import time
import uuid

import redis

from contracts.names import rate_key
from contracts.specs import RateLimit

log = logging.getLogger(__name__)
MAX_SLEEP = 2.0  # re-check at least this often while throttled

# KEYS[1] window set; ARGV now, window, limit, cost, member. Members are "<id>:<cost>" scored by time.
# Returns "0" when admitted (the cost recorded), else the seconds until the oldest entry leaves.
_ACQUIRE = """
local key, now, window = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
local used = 0
for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
local fits = (cost > 0 and used + cost <= limit) or (cost == 0 and used < limit)
if fits or used == 0 then
  if cost > 0 then redis.call('ZADD', key, now, ARGV[5] .. ':' .. cost) end
  redis.call('EXPIRE', key, math.ceil(window) + 1)
  return '0'
end
return tostring(tonumber(entries[2]) + window - now)
"""


class RateLimiter:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)

    def wait_turn(self, stage: str, limit: RateLimit) -> float:
        """Block until the stage may call its LM; returns the seconds spent waiting."""
        started = time.monotonic()
        for unit, allowed, cost in (("calls", limit.calls, 1), ("tokens", limit.tokens, 0)):
            if allowed is not None:
                self._wait(stage, unit, allowed, cost, limit.per_seconds)
        return time.monotonic() - started

    def spent(self, stage: str, limit: RateLimit, tokens: int) -> None:
        """Record the tokens a call used (token limits are checked before the next call)."""
        if limit.tokens is not None and tokens > 0:
            key = rate_key(stage, "tokens", int(limit.per_seconds))
            self.client.zadd(key, {f"{uuid.uuid4().hex}:{tokens}": time.time()})
            self.client.expire(key, int(limit.per_seconds) + 1)

    def _wait(self, stage: str, unit: str, allowed: int, cost: int, window: float) -> None:
        key = rate_key(stage, unit, int(window))
        while True:
            raw = self._acquire(keys=[key], args=[time.time(), window, allowed, cost, uuid.uuid4().hex])
            wait = float(raw.decode() if isinstance(raw, bytes) else raw)
            if wait <= 0:
                return
            log.warning("stage %s throttled: %s limit %d per %gs reached; waiting %.1fs", stage, unit, allowed,
                        window, wait)
            time.sleep(min(max(wait, 0.05), MAX_SLEEP))
