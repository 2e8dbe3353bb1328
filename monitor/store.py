"""The monitor's state in Redis: counters, capped runtime samples, rolling time series, capped error
examples and per-job traces. Everything is bounded (lists trimmed, series and traces expire), and
nothing lives in the monitor process, so a restarted monitor carries on where it stopped.

Keys (prefix `contracts.names.MONITOR_KEY_PREFIX`):
  agg:{stage|pipeline}:NAME          hash of counters (runs, succeeded, failed, fail:KIND, retries, ...)
  samples:{stage|pipeline}:NAME      latest runtimes (seconds), newest first
  waits:{stage|pipeline}:NAME        latest queue waits (sent -> started)
  series:{stage|pipeline}:NAME:T     one time bucket {runs, errors, seconds}, expires with the window
  errors:GROUP:KIND                  latest error examples (JSON), newest first
  names:{stage|pipeline}, names:errors   what exists
  task:UUID                          what the events of one Celery task said (name, job, sent time)
  trace:JOB, jobs                    a job's ordered events; the latest jobs by time
  evicted                            jobs that fell out of `jobs` lately (their late events are dropped)
"""

import json
import time
from typing import Any

import redis

from contracts.names import monitor_key
from monitor.report import Counts, ErrorExample, ErrorGroup, Figures, Point, Report, Series
from monitor.settings import MonitorSettings
from monitor.stats import summarize

KINDS = ("stage", "pipeline")
TASK_TTL = 24 * 3600
COUNTERS = tuple(f for f in Counts.model_fields if f != "failures")
# a job evicted from the index is remembered among the latest EVICTED_PER_TRACE x `traces` evicted jobs,
# long enough for a burst's queued jobs to run: their events come after they fell out
EVICTED_PER_TRACE = 10

# One trace event, atomically: the job joins the index (scored by the first event seen) unless it was
# evicted lately; jobs past the bound leave it and their trace lists are deleted in the same step; the
# event is appended only to a job the index holds. So every trace list belongs to an indexed job, and a
# late event of an evicted job (or two, from concurrent writers) can never leave an orphan behind.
# KEYS: index, evicted, this job's trace. ARGV: job, score, event, traces, events per trace, TTL,
# trace key prefix, now, evicted jobs kept.
_TRACE_EVENT = """
local job = ARGV[1]
if redis.call('ZSCORE', KEYS[2], job) then return 0 end
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], job)
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do
    redis.call('DEL', ARGV[7] .. old)
    redis.call('ZADD', KEYS[2], ARGV[8], old)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[9]) - 1)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
if not redis.call('ZSCORE', KEYS[1], job) then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[5]), -1)
redis.call('EXPIRE', KEYS[3], ARGV[6])
return 1
"""


class Store:
    def __init__(self, client: redis.Redis, settings: MonitorSettings) -> None:
        self.r = client
        self.settings = settings
        self._trace_event = client.register_script(_TRACE_EVENT)

    @classmethod
    def connect(cls, settings: MonitorSettings) -> "Store":
        return cls(redis.Redis.from_url(settings.store, decode_responses=True), settings)

    # --- writing -------------------------------------------------------------------------------

    def count(self, kind: str, name: str, **amounts: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(monitor_key("names", kind), name)
        for field, amount in amounts.items():
            if amount:
                pipe.hincrbyfloat(monitor_key("agg", kind, name), field, amount)
        pipe.execute()

    def sample(self, what: str, kind: str, name: str, seconds: float) -> None:
        key = monitor_key(what, kind, name)
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(key, seconds)
        pipe.ltrim(key, 0, self.settings.samples - 1)
        pipe.execute()

    def tick(self, kind: str, name: str, at: float, error: bool, seconds: float | None) -> None:
        """One run into the time series bucket of `at`."""
        key = monitor_key("series", kind, name, str(self.bucket(at)))
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(key, "runs", 1)
        if error:
            pipe.hincrby(key, "errors", 1)
        if seconds is not None:
            pipe.hincrbyfloat(key, "seconds", seconds)
            pipe.hincrby(key, "timed", 1)
        pipe.expire(key, self.settings.window_seconds)
        pipe.execute()

    def error_example(self, group: str, kind: str, example: ErrorExample) -> None:
        key = monitor_key("errors", group, kind)
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(monitor_key("names", "errors"), f"{group}\x1f{kind}")
        pipe.hincrby(monitor_key("errorcounts"), f"{group}\x1f{kind}", 1)
        pipe.lpush(key, example.model_dump_json())
        pipe.ltrim(key, 0, self.settings.error_examples - 1)
        pipe.execute()

    def remember_task(self, uuid: str, fields: dict[str, Any]) -> None:
        key = monitor_key("task", uuid)
        values = {k: json.dumps(v) for k, v in fields.items() if v is not None}
        if values:
            pipe = self.r.pipeline(transaction=False)
            for field, value in values.items():
                pipe.hset(key, field, value)
            pipe.expire(key, TASK_TTL)
            pipe.execute()

    def task(self, uuid: str) -> dict[str, Any]:
        raw = self.r.hgetall(monitor_key("task", uuid))
        return {str(k): json.loads(v) for k, v in raw.items()}

    def trace_event(self, job_id: str, event: dict[str, Any]) -> bool:
        """Append an event to the job's trace (at most `trace_events` kept, the latest); False when the job
        is not among the latest `traces` jobs, or fell out of them lately (see _TRACE_EVENT)."""
        settings = self.settings
        keys = [monitor_key("jobs"), monitor_key("evicted"), monitor_key("trace", job_id)]
        args: list[str | int | float] = [
            job_id, float(event.get("timestamp") or time.time()), json.dumps(event, default=str), settings.traces,
            settings.trace_events, settings.trace_ttl, monitor_key("trace", ""), time.time(),
            EVICTED_PER_TRACE * settings.traces]
        return bool(self._trace_event(keys=keys, args=args))

    def bucket(self, at: float) -> int:
        return int(at // self.settings.bucket_seconds * self.settings.bucket_seconds)

    def clear(self) -> None:
        """Delete every monitor key (`stagecoach monitor reset`)."""
        for key in self.r.scan_iter(match=monitor_key("*"), count=500):
            self.r.delete(key)

    # --- reading -------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(str(n) for n in self.r.smembers(monitor_key("names", kind)))

    def figures(self, kind: str, name: str, now: float) -> Figures:
        raw = {str(k): float(v) for k, v in self.r.hgetall(monitor_key("agg", kind, name)).items()}
        counts = {f: int(raw.get(f, 0)) for f in COUNTERS}
        failures = {k[5:]: int(v) for k, v in raw.items() if k.startswith("fail:")}
        return Figures(name=name, **counts, failures=failures,
                       runtime=self._summary("samples", kind, name),
                       queue_wait=self._summary("waits", kind, name),
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
            pipe.hgetall(monitor_key("series", kind, name, str(start)))
        return [_point(start, raw) for start, raw in zip(starts, pipe.execute(), strict=True)]

    def error_groups(self) -> list[ErrorGroup]:
        counts = {str(k): int(v) for k, v in self.r.hgetall(monitor_key("errorcounts")).items()}
        groups = []
        for joined, count in sorted(counts.items()):
            group, kind = joined.split("\x1f")
            raw = self.r.lrange(monitor_key("errors", group, kind), 0, -1)
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
        return [json.loads(item) for item in self.r.lrange(monitor_key("trace", job_id), 0, -1)]

    def jobs(self, limit: int = 50) -> list[str]:
        return [str(j) for j in self.r.zrevrange(monitor_key("jobs"), 0, limit - 1)]


def _point(start: int, raw: dict[str, str]) -> Point:
    data = {str(k): float(v) for k, v in raw.items()}
    timed = data.get("timed", 0)
    return Point(t=start, runs=int(data.get("runs", 0)), errors=int(data.get("errors", 0)),
                 mean_seconds=data["seconds"] / timed if timed else None)
