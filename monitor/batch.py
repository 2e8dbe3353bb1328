"""A batch of the monitor's writes: what many events change in the store, summed before it is sent.

The consumer reads events from the fleet stream in batches (hundreds at a time); each event adds to
a `Batch` here instead of writing at once, so a thousand stage calls of one stage become one counter
increment per field, one LPUSH of their runtimes, one write per time bucket. `Store.commit` sends a
batch as one Lua call together with the XACK of the stream entries it came from (monitor/store.py).
"""

import time
from collections import defaultdict
from functools import lru_cache
from typing import Any

from contracts.names import MonitorKeys
from contracts.names import monitor_key as _monitor_key
from monitor.report import ErrorExample
from monitor.settings import MonitorSettings

# a job evicted from the trace index is remembered among the latest EVICTED_PER_TRACE x `traces` evicted
# jobs, long enough for a burst's queued jobs to run: their events come after they fell out
EVICTED_PER_TRACE = 10
monitor_key = lru_cache(maxsize=8192)(_monitor_key)  # a batch names the same few keys thousands of times
Command = list[str]  # one Redis command, every argument a string (decoded by the commit script's cjson)


class Batch:
    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.names: dict[str, set[str]] = defaultdict(set)
        self.amounts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.samples: dict[str, list[float]] = defaultdict(list)  # oldest first
        self.buckets: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.examples: dict[str, list[str]] = defaultdict(list)  # oldest first
        self.error_counts: dict[str, int] = defaultdict(int)
        self.traces: dict[str, list[tuple[float, str]]] = defaultdict(list)  # job -> (time, entry JSON)

    def count(self, kind: str, name: str, **amounts: float) -> None:
        self.names[monitor_key(MonitorKeys.NAMES, kind)].add(name)
        counters = self.amounts[monitor_key(MonitorKeys.AGG, kind, name)]
        for field, amount in amounts.items():
            if amount:
                counters[field] += amount

    def sample(self, what: str, kind: str, name: str, seconds: float) -> None:
        self.samples[monitor_key(what, kind, name)].append(seconds)

    def tick(self, kind: str, name: str, at: float, error: bool, seconds: float | None) -> None:
        """One run into the time series bucket of `at`."""
        bucket = self.buckets[monitor_key(MonitorKeys.SERIES, kind, name, str(self.bucket(at)))]
        bucket["runs"] += 1
        if error:
            bucket["errors"] += 1
        if seconds is not None:
            bucket["seconds"] += seconds
            bucket["timed"] += 1

    def error_example(self, group: str, kind: str, example: ErrorExample) -> None:
        self.error_counts[f"{group}\x1f{kind}"] += 1
        self.examples[monitor_key(MonitorKeys.ERRORS, group, kind)].append(example.model_dump_json())

    def trace_event(self, job_id: str, at: float, entry: str) -> None:
        """`entry`: the trace event as JSON (see monitor/consumer.py: trace_entry)."""
        self.traces[job_id].append((at, entry))

    def bucket(self, at: float) -> int:
        return int(at // self.settings.bucket_seconds * self.settings.bucket_seconds)

    def __bool__(self) -> bool:
        return bool(self.names or self.samples or self.buckets or self.examples or self.traces)

    def commands(self) -> list[Command]:
        """The Redis commands that apply the batch, in an order that keeps every list capped."""
        raw = [*self._counters(), *self._samples(), *self._series(), *self._errors(), *self._traces()]
        return [[str(arg) for arg in command] for command in raw]

    def _counters(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = [("SADD", key, *sorted(members)) for key, members in self.names.items()]
        for key, counters in self.amounts.items():
            out += [("HINCRBYFLOAT", key, field, repr(amount)) for field, amount in counters.items() if amount]
        return out

    def _samples(self) -> list[tuple[Any, ...]]:
        keep = self.settings.samples
        out: list[tuple[Any, ...]] = []
        for key, values in self.samples.items():
            out += [("LPUSH", key, *(repr(v) for v in values[-keep:])), ("LTRIM", key, 0, keep - 1)]
        return out

    def _series(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for key, fields in self.buckets.items():
            out += [(("HINCRBYFLOAT" if field == "seconds" else "HINCRBY"), key, field,
                     repr(value) if field == "seconds" else int(value)) for field, value in fields.items()]
            out.append(("EXPIRE", key, self.settings.window_seconds))
        return out

    def _errors(self) -> list[tuple[Any, ...]]:
        keep = self.settings.error_examples
        out: list[tuple[Any, ...]] = []
        if self.error_counts:
            out.append(("SADD", monitor_key(MonitorKeys.NAMES, "errors"), *sorted(self.error_counts)))
        counts = monitor_key(MonitorKeys.ERROR_COUNTS)
        out += [("HINCRBY", counts, joined, n) for joined, n in self.error_counts.items()]
        for key, examples in self.examples.items():
            out += [("LPUSH", key, *examples[-keep:]), ("LTRIM", key, 0, keep - 1)]
        return out

    def _traces(self) -> list[tuple[Any, ...]]:
        """One TRACE command per job (monitor/store.py: TRACE_LUA keeps the index and the lists bounded)."""
        settings = self.settings
        now = time.time()
        index, evicted = monitor_key(MonitorKeys.JOBS), monitor_key(MonitorKeys.EVICTED)
        return [("TRACE", index, evicted, monitor_key(MonitorKeys.TRACE, job_id), job_id,
                 repr(min(at for at, _ in entries)), settings.traces, settings.trace_events, settings.trace_ttl,
                 monitor_key(MonitorKeys.TRACE, ""), repr(now), EVICTED_PER_TRACE * settings.traces,
                 *(entry for _, entry in entries[-settings.trace_events:]))
                for job_id, entries in self.traces.items()]
