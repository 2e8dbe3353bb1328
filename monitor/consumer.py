"""The event consumer: Stagecoach's events (contracts/events.py) from the fleet's event stream into the store.

The workers append every job's events to one Redis stream (`contracts.names.EVENTS_STREAM`) in the round
trips they make anyway (workers/eventlog.py). The monitor reads it through a consumer group
(`contracts.names.MONITOR_GROUP`): a batch of entries (XREADGROUP) is summed into one batch of writes
(monitor/batch.py), committed together with the XACK of its entries in one atomic step (`Store.commit`). So:
- a monitor that was down catches up from where its group stopped (the stream keeps the latest
  STAGECOACH_EVENTS_MAXLEN events: one down for longer than that loses the oldest, and counts them as
  `trimmed`);
- replicas share the stream: each entry goes to one of them; entries a replica read and never committed
  (it died) stay pending, and another takes them over after `claim_idle_seconds` (XAUTOCLAIM). The commit
  checks the replica still owns its entries, so each event is counted once.

What each event adds to the store:
  JobQueued     the job's trace
  StageStarted  the stage's queue wait (`waited`: previous stage ended, or job submitted -> this step started;
                the job's first step is also the pipeline's wait), the trace
  StageOutcome  per stage, pipeline and stage x pipeline counters, runtimes, time series, error examples, trace
  DecisionMade  the trace
  JobFinished   per pipeline counters, runtimes, time series, error examples, trace
Celery's task events are Flower's, not the monitor's: a stage task that crashes ends its job through the
job ledger, whose events count it (so replicas never count one twice).
"""

import logging
import threading
import time
from typing import Any

import redis
from pydantic import ValidationError

from contracts.events import (
    DecisionMade,
    JobFinished,
    JobQueued,
    StagecoachEvent,
    StageOutcome,
    StageStarted,
    event_name,
    parse_event,
)
from contracts.fields import problems_of
from contracts.names import EVENTS_STREAM, MONITOR_GROUP, MonitorKeys
from monitor.batch import Batch
from monitor.report import PAIR, ErrorExample
from monitor.settings import MonitorSettings
from monitor.store import Store

log = logging.getLogger(__name__)
RECONNECT_SECONDS = 2.0
TRIM_SECONDS = 5.0  # how often read entries are trimmed off the stream
Entry = tuple[str, dict[str, Any] | None]  # (entry id, fields; None for an entry trimmed while pending)


class Consumer:
    """One replica of the monitor's consumer: reads the fleet stream in its group, commits to the store."""

    def __init__(self, store: Store, settings: MonitorSettings) -> None:
        self.store = store
        self.r: Any = store.r  # the event log's Redis is the store's (one atomic commit needs one server)
        self.settings = settings
        self.name = settings.consumer_name
        self.stopped = threading.Event()
        self.live = threading.Event()  # in the group and reading: events from now on are counted
        self.seen = 0  # events this replica counted since it started
        self.malformed = 0  # entries that did not match their model (logged, acknowledged, skipped)
        self.trimmed = 0  # entries trimmed off the stream before any replica counted them (lost)
        self._next_claim = 0.0
        self._next_trim = 0.0

    @classmethod
    def connect(cls, settings: MonitorSettings) -> "Consumer":
        return cls(Store.connect(settings), settings)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stop(); rides out a Redis that goes away."""
        while not self.stopped.is_set():
            try:
                self.join()
                self.record(self.read("0"))  # what this name read before a restart and never committed
                self.live.set()
                while not self.stopped.is_set():
                    self.step()
            except redis.RedisError:
                self.live.clear()
                if self.stopped.is_set():
                    return
                log.warning("event stream lost; reconnecting", exc_info=True)
                self.stopped.wait(RECONNECT_SECONDS)

    def stop(self) -> None:
        self.stopped.set()

    def join(self) -> None:
        """The group on the stream, created at the stream's start the first time (the events it still holds
        are counted: a monitor started after the fleet misses nothing the stream kept)."""
        try:
            self.r.xgroup_create(EVENTS_STREAM, MONITOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def step(self) -> int:
        """One read (waiting up to `block_ms` for new events) and its commit; now and then, entries of a dead
        replica taken over and read entries trimmed. Returns the events counted."""
        now = time.monotonic()
        counted = 0
        if now >= self._next_claim:
            counted += self.claim()
            self._next_claim = now + max(1.0, self.settings.claim_idle_seconds / 2)
        counted += self.record(self.read(">"))
        if self.settings.trim_acked and now >= self._next_trim:
            self.trim()
            self._next_trim = now + TRIM_SECONDS
        return counted

    def drain(self) -> int:
        """Count everything the stream holds for this group now, then return (tests, benchmarks)."""
        self.join()
        total = self.record(self.read("0"))
        while entries := self.read(">", block=False):
            total += self.record(entries)
        return total

    def read(self, start: str, block: bool = True) -> list[Entry]:
        """`>`: entries no replica has read; `0`: this replica's own pending entries."""
        wait = self.settings.block_ms if start == ">" and block else None
        reply = self.r.xreadgroup(MONITOR_GROUP, self.name, {EVENTS_STREAM: start}, count=self.settings.batch,
                                  block=wait)
        return [(str(i), f) for i, f in reply[0][1]] if reply else []

    # --- counting ------------------------------------------------------------------------------

    def record(self, entries: list[Entry]) -> int:
        """Count `entries` once: summed into one batch, committed with their XACK. Entries another replica
        took over meanwhile are left to it (the batch is summed again without them)."""
        ids = [entry_id for entry_id, _ in entries]
        while ids:
            keep = set(ids)
            batch = Batch(self.settings)
            malformed = sum(not self.handle(batch, fields) for entry_id, fields in entries if entry_id in keep)
            lost = self.store.commit(batch, EVENTS_STREAM, MONITOR_GROUP, self.name, ids)
            if not lost:
                self.seen += len(ids)
                self.malformed += malformed
                return len(ids)
            log.info("%d events were taken over by another replica; they count there", len(lost))
            ids = [entry_id for entry_id in ids if entry_id not in set(lost)]
        return 0

    def handle(self, batch: Batch, fields: dict[str, Any] | None) -> bool:
        """One entry into the batch; False for one that is not a Stagecoach event (logged, skipped)."""
        if fields is None:  # trimmed off the stream while pending: nothing left to count
            return True
        try:
            event = parse_event(str(fields["type"]), fields["data"])
        except (KeyError, ValidationError) as error:
            problems = "; ".join(str(p) for p in problems_of(error))[:500] if isinstance(error, ValidationError) \
                else f"unknown or missing type {error}"
            log.warning("malformed %s event skipped: %s", fields.get("type"), problems)
            return False
        on_event(batch, event, str(fields["data"]))
        return True

    # --- the group's upkeep --------------------------------------------------------------------

    def claim(self) -> int:
        """Take over entries other replicas read and did not commit within `claim_idle_seconds` (they died),
        and count them; entries trimmed off the stream meanwhile are acknowledged and counted as lost."""
        idle_ms = int(self.settings.claim_idle_seconds * 1000)
        start, counted = "0-0", 0
        while True:
            reply = self.r.xautoclaim(EVENTS_STREAM, MONITOR_GROUP, self.name, idle_ms, start_id=start,
                                      count=self.settings.batch)
            start, entries, deleted = str(reply[0]), reply[1], (reply[2] if len(reply) > 2 else [])
            counted += self.record([(str(i), f) for i, f in entries])
            if deleted:
                self.r.xack(EVENTS_STREAM, MONITOR_GROUP, *deleted)
                self.trimmed += len(deleted)
            if start == "0-0":
                break
        self._forget_idle_replicas()
        return counted

    def _forget_idle_replicas(self) -> None:
        """Replicas that left nothing pending and were idle for ten claim periods leave the group."""
        limit = self.settings.claim_idle_seconds * 10_000
        for consumer in self.r.xinfo_consumers(EVENTS_STREAM, MONITOR_GROUP):
            if consumer["name"] != self.name and not consumer["pending"] and consumer["idle"] > limit:
                self.r.xgroup_delconsumer(EVENTS_STREAM, MONITOR_GROUP, consumer["name"])

    def trim(self) -> None:
        """Drop entries every group on the stream has read and acknowledged: the stream then holds the
        backlog (MAXLEN still bounds it while no monitor reads)."""
        floors = []
        for group in self.r.xinfo_groups(EVENTS_STREAM):
            if group["pending"]:
                floors.append(str(self.r.xpending(EVENTS_STREAM, group["name"])["min"]))
            else:
                floors.append(str(group["last-delivered-id"]))
        if floors:
            self.r.xtrim(EVENTS_STREAM, minid=min(floors, key=_stream_id), approximate=True)

    def status(self) -> dict[str, Any]:
        """What /api/health shows: events counted here, the group's lag (entries not yet read by any replica)
        and pending (read, not yet committed), malformed and trimmed entries."""
        found = {"events": self.seen, "malformed": self.malformed, "trimmed": self.trimmed,
                 "live": self.live.is_set(), "consumer": self.name, "lag": None, "pending": None}
        try:
            for group in self.r.xinfo_groups(EVENTS_STREAM):
                if group["name"] == MONITOR_GROUP:
                    found.update(lag=group.get("lag"), pending=group["pending"])
        except redis.RedisError:
            pass
        return found


def _stream_id(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


# --- what each event counts --------------------------------------------------------------------------

def on_event(batch: Batch, event: StagecoachEvent, data: str) -> None:
    at = event.at
    if isinstance(event, StageOutcome):
        at = event.at + (event.elapsed or 0.0)
        on_stage_outcome(batch, event, at)
    elif isinstance(event, StageStarted):
        on_stage_started(batch, event)
    elif isinstance(event, JobFinished):
        on_job_finished(batch, event)
    if isinstance(event, (StageOutcome, StageStarted, JobFinished, JobQueued, DecisionMade)):
        batch.trace_event(event.job_id, at, trace_entry(event, at, data))


def trace_entry(event: StagecoachEvent, at: float, data: str) -> str:
    """The trace's copy of an event: its JSON as the stream holds it, with `type` (`stage-outcome`, ...) and
    `timestamp` in front, built without parsing it again."""
    kind = event_name(event).removeprefix("stagecoach-")
    return f'{{"type": "{kind}", "timestamp": {at!r}, {data.strip()[1:]}'


def on_stage_started(batch: Batch, event: StageStarted) -> None:
    if event.waited is None:
        return
    batch.sample(MonitorKeys.WAITS, "stage", event.stage, event.waited)
    if event.first:
        batch.sample(MonitorKeys.WAITS, "pipeline", event.pipeline, event.waited)


def on_stage_outcome(batch: Batch, event: StageOutcome, at: float) -> None:
    stage, pipeline = event.stage, event.pipeline
    shared = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
              "cache_hits": 1 if event.cached else 0}
    if event.outcome == "retry":
        batch.count("stage", stage, retries=1)
        batch.count("pipeline", pipeline, retries=1)
    elif event.outcome == "skipped":
        batch.count("stage", stage, skipped=1)
    elif event.outcome == "ok":
        _stage_ok(batch, event, at, shared)
    else:
        _stage_error(batch, event, at, shared)


def _stage_ok(batch: Batch, event: StageOutcome, at: float, shared: dict[str, Any]) -> None:
    stage, pipeline, seconds = event.stage, event.pipeline, event.seconds or 0.0
    sizes = {"input_bytes": event.input_bytes, "output_bytes": event.output_bytes}
    batch.count("stage", stage, runs=1, succeeded=1, **shared, **sizes)
    batch.count("pair", stage + PAIR + pipeline, runs=1, succeeded=1)
    batch.count("pipeline", pipeline, **shared, **sizes)
    batch.sample(MonitorKeys.SAMPLES, "stage", stage, seconds)
    batch.tick("stage", stage, at, False, seconds)


def _stage_error(batch: Batch, event: StageOutcome, at: float, shared: dict[str, Any]) -> None:
    stage, pipeline, kind = event.stage, event.pipeline, event.kind or "stage"
    batch.count("stage", stage, runs=1, failed=1, input_bytes=event.input_bytes, **shared, **{f"fail:{kind}": 1})
    batch.count("pipeline", pipeline, **shared)
    batch.count("pair", stage + PAIR + pipeline, runs=1, failed=1, **{f"fail:{kind}": 1})
    batch.tick("stage", stage, at, True, None)
    example = ErrorExample(job_id=event.job_id, node=event.node, pipeline=pipeline, message=event.message or "", at=at)
    batch.error_example(stage, kind, example)


def on_job_finished(batch: Batch, event: JobFinished) -> None:
    pipeline, at = event.pipeline, event.at
    failed = event.state != "succeeded"
    if failed:
        kind = event.kind or "pipeline"
        batch.count("pipeline", pipeline, runs=1, failed=1, **{f"fail:{kind}": 1})
        example = ErrorExample(job_id=event.job_id, node=event.error_node or "", pipeline=pipeline,
                               message=event.message or "", at=at)
        batch.error_example(f"pipeline:{pipeline}", kind, example)
    else:
        batch.count("pipeline", pipeline, runs=1, succeeded=1)
        batch.sample(MonitorKeys.SAMPLES, "pipeline", pipeline, event.seconds)
    batch.tick("pipeline", pipeline, at, failed, None if failed else event.seconds)
    if event.version:
        version_figures(batch, f"{pipeline}@{event.version}", at, failed, event.seconds)


def version_figures(batch: Batch, name: str, at: float, failed: bool, seconds: float) -> None:
    """The same job counted again per pipeline version (`qa@2`): versions served side by side."""
    batch.count("version", name, runs=1, failed=int(failed), succeeded=int(not failed))
    if not failed:
        batch.sample(MonitorKeys.SAMPLES, "version", name, seconds)
    batch.tick("version", name, at, failed, None if failed else seconds)
