"""The monitor's state in Redis: counters, capped runtime samples, rolling time series, capped error
examples and per-job traces. Everything is bounded (lists trimmed, series and traces expire), and
nothing lives in the monitor process, so a restarted monitor carries on where it stopped.

Keys (prefix `contracts.names.MONITOR_KEY_PREFIX`):
  agg:{stage|pipeline}:NAME          hash of counters (runs, succeeded, failed, fail:KIND, retries, ...)
  samples:{stage|pipeline}:NAME      latest runtimes (seconds), newest first
  waits:{stage|pipeline}:NAME        latest queue waits (previous stage ended, or job submitted -> started)
  series:{stage|pipeline}:NAME:T     one time bucket {runs, errors, seconds}, expires with the window
  errors:GROUP:KIND                  latest error examples (JSON), newest first
  names:{stage|pipeline}, names:errors   what exists
  trace:JOB, jobs                    a job's ordered events; the latest `traces` jobs by time (older ones deleted)
  evicted                            jobs that fell out of `jobs` lately (their late events are dropped)
"""

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from contracts.connections import redis_client
from contracts.names import MonitorKeys, monitor_key
from monitor.batch import Batch
from monitor.report import Counts, ErrorExample, ErrorGroup, Figures, Point, Report, Series
from monitor.settings import MonitorSettings
from monitor.stats import summarize

KINDS = ("stage", "pipeline")
# One job's trace events (a batch's `TRACE` command): the job joins the index (scored by its first event)
# unless it was evicted lately; jobs past the bound leave it and their trace lists are deleted in the same
# step; the events are appended only to a job the index holds. So every trace list belongs to an indexed
# job, and a late event of an evicted job never leaves an orphan behind (the number of traces, and so
# their memory, stays bounded whatever the number of jobs).
TRACE_LUA = """
local function trace(index, evicted, key, job, score, traces, per_trace, ttl, prefix, now, evicted_kept, ...)
  if redis.call('ZSCORE', evicted, job) then return end
  redis.call('ZADD', index, 'NX', score, job)
  local over = redis.call('ZCARD', index) - tonumber(traces)
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', index, 0, over - 1)) do
      redis.call('DEL', prefix .. old)
      redis.call('ZADD', evicted, now, old)
    end
    redis.call('ZREMRANGEBYRANK', index, 0, over - 1)
    redis.call('ZREMRANGEBYRANK', evicted, 0, -tonumber(evicted_kept) - 1)
    redis.call('EXPIRE', evicted, ttl)
  end
  redis.call('EXPIRE', index, ttl)
  if not redis.call('ZSCORE', index, job) then return end
  redis.call('RPUSH', key, ...)
  redis.call('LTRIM', key, -tonumber(per_trace), -1)
  redis.call('EXPIRE', key, ttl)
end
"""
COUNTERS = tuple(f for f in Counts.model_fields if f != "failures")

# Apply a batch of the monitor's writes and acknowledge the stream entries it came from, atomically, and only
# if this consumer still owns each of them: a replica that was slow to commit may have lost an entry to
# another's XAUTOCLAIM, and then that one counts it. So a crash before the commit leaves the entries pending
# (another replica or the next start counts them) and one after it leaves them counted and acknowledged:
# every entry is counted once. KEYS stream; ARGV group, consumer, the entry ids (JSON list), the commands
# (JSON list of lists of strings) -> the entries this consumer lost (then nothing was written)
_COMMIT = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local ids, commands = cjson.decode(ARGV[3]), cjson.decode(ARGV[4])
local lost = {}
for _, id in ipairs(ids) do
  if #redis.call('XPENDING', stream, group, id, id, 1, consumer) == 0 then lost[#lost + 1] = id end
end
if #lost > 0 then return lost end
""" + TRACE_LUA + """
for _, command in ipairs(commands) do
  if command[1] == 'TRACE' then trace(unpack(command, 2)) else redis.call(unpack(command)) end
end
if #ids > 0 then redis.call('XACK', stream, group, unpack(ids)) end
return lost
"""


class Store:
    def __init__(self, client: redis.Redis, settings: MonitorSettings) -> None:
        self.r = client
        self.settings = settings
        self._commit = client.register_script(_COMMIT)

    @classmethod
    def connect(cls, settings: MonitorSettings) -> "Store":
        return cls(redis_client(settings.store, settings.sentinel, decode_responses=True), settings)

    # --- writing -------------------------------------------------------------------------------

    def commit(self, batch: Batch, stream: str = "", group: str = "", consumer: str = "",
               entries: Sequence[str] = ()) -> list[str]:
        """Apply `batch` and acknowledge the stream `entries` it came from, in one atomic step, if `consumer`
        still owns every one of them; otherwise write nothing and return the entries it lost (another
        replica claimed them: it counts them). Without entries, just apply the batch."""
        args = [group, consumer, json.dumps(list(entries)), json.dumps(batch.commands())]
        lost = self._commit(keys=[stream or monitor_key("none")], args=args)
        return [str(e) for e in lost]

    def bucket(self, at: float) -> int:
        return int(at // self.settings.bucket_seconds * self.settings.bucket_seconds)

    def clear(self) -> None:
        """Delete every monitor key (`stagecoach monitor reset`)."""
        for key in self.r.scan_iter(match=monitor_key("*"), count=500):
            self.r.delete(key)

    # --- reading -------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(str(n) for n in self.r.smembers(monitor_key(MonitorKeys.NAMES, kind)))

    def figures(self, kind: str, name: str, now: float) -> Figures:
        raw = {str(k): float(v) for k, v in self.r.hgetall(monitor_key(MonitorKeys.AGG, kind, name)).items()}
        counts = {f: int(raw.get(f, 0)) for f in COUNTERS}
        failures = {k[5:]: int(v) for k, v in raw.items() if k.startswith("fail:")}
        return Figures(name=name, **counts, failures=failures,
                       runtime=self._summary(MonitorKeys.SAMPLES, kind, name),
                       queue_wait=self._summary(MonitorKeys.WAITS, kind, name),
                       throughput_per_min=self._last_minute(kind, name, now))

    def _summary(self, what: str, kind: str, name: str) -> Any:
        values = [float(v) for v in self.r.lrange(monitor_key(what, kind, name), 0, -1)]
        return summarize(values) if values else None

    def _last_minute(self, kind: str, name: str, now: float) -> float:
        points = self.points(kind, name, now, max(1, 60 // self.settings.bucket_seconds))
        return float(sum(p.runs for p in points)) * 60 / max(60, self.settings.bucket_seconds)

    def points(self, kind: str, name: str, now: float, buckets: int) -> list[Point]:
        step = self.settings.bucket_seconds
        starts = [self.bucket(now) - step * i for i in reversed(range(buckets))]
        pipe = self.r.pipeline(transaction=False)
        for start in starts:
            pipe.hgetall(monitor_key(MonitorKeys.SERIES, kind, name, str(start)))
        return [_point(start, raw) for start, raw in zip(starts, pipe.execute(), strict=True)]

    def error_groups(self) -> list[ErrorGroup]:
        counts = {str(k): int(v) for k, v in self.r.hgetall(monitor_key(MonitorKeys.ERROR_COUNTS)).items()}
        groups = []
        for joined, count in sorted(counts.items()):
            group, kind = joined.split("\x1f")
            raw = self.r.lrange(monitor_key(MonitorKeys.ERRORS, group, kind), 0, -1)
            latest = [ErrorExample.model_validate_json(item) for item in raw]
            groups.append(ErrorGroup(stage=group, kind=kind, count=count, latest=latest))
        return groups

    def report(self, now: float | None = None) -> Report:
        now = now or time.time()
        return Report(generated_at=now,
                      stages=[self.figures("stage", n, now) for n in self.names("stage")],
                      pipelines=[self.figures("pipeline", n, now) for n in self.names("pipeline")],
                      stage_pipelines=[self.figures("pair", n, now) for n in self.names("pair")],
                      pipeline_versions=[self.figures("version", n, now) for n in self.names("version")],
                      errors=self.error_groups())

    def series(self, buckets: int = 60, now: float | None = None) -> Series:
        now = now or time.time()
        buckets = min(buckets, self.settings.window_buckets)
        return Series(bucket_seconds=self.settings.bucket_seconds,
                      stages={n: self.points("stage", n, now, buckets) for n in self.names("stage")},
                      pipelines={n: self.points("pipeline", n, now, buckets) for n in self.names("pipeline")})

    def trace(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.r.lrange(monitor_key(MonitorKeys.TRACE, job_id), 0, -1)]

    def jobs(self, limit: int = 50) -> list[str]:
        return [str(j) for j in self.r.zrevrange(monitor_key(MonitorKeys.JOBS), 0, limit - 1)]


def _point(start: int, raw: dict[str, str]) -> Point:
    data = {str(k): float(v) for k, v in raw.items()}
    timed = data.get("timed", 0)
    return Point(t=start, runs=int(data.get("runs", 0)), errors=int(data.get("errors", 0)),
                 mean_seconds=data["seconds"] / timed if timed else None)
