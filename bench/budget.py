"""What Redis holds, by key prefix: keys, bytes (MEMORY USAGE) and keys without a TTL.

A key's prefix is the key with its ids folded (`stagecoach:checkpoint:<id>`, `stagecoach:claim:<id>:<step>`),
so the budget of one job is the sum over the prefixes its keys fall in. Used by the `scale` benchmark
(what 10,000 jobs leave) and tests/test_redis_bounds.py (the small-N version).
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

_ID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}(-finish)?")
_STEP = re.compile(r":\d+:[^:]+$|:\d+:[^:]+(?=:deliveries$)")
_BUCKET = re.compile(r":\d{6,}$")


def prefix(key: str) -> str:
    folded = _ID.sub("<id>", key)
    folded = _STEP.sub(":<step>", folded)
    return _BUCKET.sub(":<t>", folded)


@dataclass
class Usage:
    keys: int = 0
    bytes: int = 0
    no_ttl: int = 0


@dataclass
class Budget:
    by_prefix: dict[str, Usage] = field(default_factory=dict)

    @property
    def keys(self) -> int:
        return sum(u.keys for u in self.by_prefix.values())

    @property
    def bytes(self) -> int:
        return sum(u.bytes for u in self.by_prefix.values())

    def per_job(self, jobs: int) -> dict[str, float]:
        """Bytes per job by prefix, for the prefixes that hold a job id."""
        return {p: u.bytes / jobs for p, u in sorted(self.by_prefix.items()) if "<id>" in p}

    def without_ttl(self) -> dict[str, int]:
        return {p: u.no_ttl for p, u in sorted(self.by_prefix.items()) if u.no_ttl}

    def table(self, jobs: int) -> str:
        lines = ["| prefix | keys | bytes | bytes per job | keys without TTL |", "|---|---|---|---|---|"]
        for name, usage in sorted(self.by_prefix.items(), key=lambda item: -item[1].bytes):
            lines.append(f"| `{name}` | {usage.keys} | {usage.bytes} | {usage.bytes / jobs:.0f} | {usage.no_ttl} |")
        return "\n".join(lines)


def measure(client: redis.Redis, keys: Iterable[str] | None = None) -> Budget:
    """The budget of `keys` (default: every key), read in pipelined batches."""
    found = [k.decode() if isinstance(k, bytes) else str(k) for k in (keys or client.scan_iter(count=1000))]
    budget = Budget()
    for start in range(0, len(found), 500):
        chunk = found[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
            pipe.ttl(key)
        replies = pipe.execute()
        for key, size, ttl in zip(chunk, replies[::2], replies[1::2], strict=True):
            if size is None:  # expired meanwhile
                continue
            usage = budget.by_prefix.setdefault(prefix(key), Usage())
            usage.keys += 1
            usage.bytes += int(size)
            usage.no_ttl += int(ttl == -1)
    return budget
