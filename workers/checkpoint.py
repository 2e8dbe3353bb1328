"""Job progress outside the broker: checkpoints, once-only claims, cancellation and the watch index.

A job's checkpoint (hash `stagecoach:checkpoint:<job>`) holds the request it started from, its
generation (0, then +1 per re-dispatch or resume), the latest envelope and each completed stage's
outputs (`done:<path>`); it expires with the job's result. Claims (SET NX) make each
(job, generation, node path, attempt) run once however often the broker delivers it: a
redelivered or re-dispatched message is dropped, or replayed from the checkpoint without an LM
call. The watch index (sorted set: job -> deadline) lets the watchdog find jobs that stopped.
"""

import enum
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from contracts.candidates import TraceStep
from contracts.connections import SentinelSettings, redis_client
from contracts.envelope import Envelope, StageTiming, Usage
from contracts.events import JobFinished, JobQueued, StagecoachEvent, StageStarted
from contracts.names import (
    JOBS_INDEX_KEY,
    QUEUE_PROGRESS_KEY,
    WATCH_KEY,
    cancel_key,
    checkpoint_key,
    claim_key,
    closed_key,
    deliveries_key,
    job_fields_key,
    job_key,
    open_jobs_key,
    pipeline_jobs_key,
)
from contracts.priority import priority_list
from workers.eventlog import APPEND_EACH_LUA, APPEND_LUA, EventLog


class Begin(enum.Enum):
    RUN = "run"  # this delivery runs the step
    DUPLICATE = "duplicate"  # another delivery runs it now, or ran it already
    STALE = "stale"  # the job was re-dispatched since: a newer generation carries it


@dataclass(frozen=True)
class Claim:
    begin: Begin
    key: str
    redeliveries: int = 0


@dataclass(frozen=True)
class StoredResult:
    """A task result as Celery's Redis backend stores it (key, encoded meta, expiry in seconds; 0 for
    none), for a script that writes it together with other state."""

    key: str
    value: str | bytes
    ttl: int


@dataclass(frozen=True)
class Close:
    """What closing a job writes in one script: its final status, its JobResult stored as Celery stores a
    result, and its JobFinished event; for a succeeded job, the step claims it ran (`claims`, node path and
    attempt per generation: `Checkpoints.claims_of`) whose keys then expire early with its checkpoint."""

    status: dict[str, str]
    stored: StoredResult
    finished: JobFinished
    claims: tuple[str, ...] = ()

    @property
    def succeeded(self) -> bool:
        return self.finished.state == "succeeded"


@dataclass(frozen=True)
class Closed:
    """A close's reply: whether this delivery closed the job, the door it came in by (client or run) and
    the completion webhook its request named (JSON, "" for none), read in the close's own round trip."""

    closed: bool
    door: str = ""
    webhook: str = ""


@dataclass(frozen=True)
class Begun:
    """A stage step's start, read in the same round trip as its claim: whether an operator cancelled
    the job, and the step's outputs if an earlier generation completed it."""

    claim: Claim
    cancelled: bool = False
    done: "Done | None" = None


@dataclass(frozen=True)
class Done:
    """A completed stage as the checkpoint keeps it, enough to replay it without the LM."""

    outputs: dict[str, Any]
    timing: StageTiming
    usage: Usage | None
    trace: list[TraceStep] | None = None  # a candidate's run (optimisation): replayed with the outputs

    def dump(self) -> str:
        trace = [step.model_dump(mode="json") for step in self.trace] if self.trace is not None else None
        return json.dumps({"outputs": self.outputs, "timing": self.timing.model_dump(mode="json"),
                           "usage": self.usage.model_dump(mode="json") if self.usage else None, "trace": trace})

    @classmethod
    def load(cls, raw: bytes | str) -> "Done":
        data = json.loads(raw)
        usage = Usage.model_validate(data["usage"]) if data.get("usage") else None
        trace = [TraceStep.model_validate(s) for s in data["trace"]] if data.get("trace") is not None else None
        return cls(data["outputs"], StageTiming.model_validate(data["timing"]), usage, trace)


# what a broker outage raises (redis-py, kombu): callers ride it out instead of failing the job
BROKER_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError)

log = logging.getLogger(__name__)


@contextmanager
def outage_requeues(what: str) -> Iterator[None]:
    """Broker trouble inside a step (a Redis restart; or a soft limit hit while blocked on Redis) hands
    the message back instead of failing the job: the redelivered copy takes over its own claim, and
    anything the step completed is replayed from the checkpoint."""
    try:
        yield
    except (*BROKER_DOWN, SoftTimeLimitExceeded) as error:
        log.warning("%s: broker unavailable (%s: %s); message handed back", what, type(error).__name__, error)
        raise Reject(f"broker unavailable: {error}", requeue=True) from None


# Record a stage's first completion, count it and append its events (only the first time, so a repeated
# save appends nothing twice): KEYS checkpoint, job status, job event stream, fleet event stream;
# ARGV field, value, per-job bound, fleet bound, ttl, then per event: type, JSON, on the fleet stream (0/1)
_FIRST_DONE = APPEND_EACH_LUA + """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'stages_done', 1)
  append_each(KEYS[3], KEYS[4], 3)
  return 1
end
return 0
"""

# A step's claim done, with the events of a step that completed no stage (failed, skipped, retried) appended
# once: KEYS claim, job event stream, fleet event stream; ARGV ttl, per-job bound, fleet bound, then per
# event: type, JSON, on the fleet stream (0/1)
_COMPLETE = APPEND_EACH_LUA + """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 8) ~= 'running:' then return 0 end
redis.call('SET', KEYS[1], 'done', 'EX', ARGV[1])
append_each(KEYS[2], KEYS[3], 2)
return 1
"""


# The start of a stage step in one round trip (it runs on every stage call, so round trips count):
# KEYS checkpoint, claim, deliveries, cancel, watch, job status, job event stream, fleet event stream, the
#      queues' progress
# ARGV generation, owner, claim ttl, ttl, redelivered (0/1), done field, deadline, job id, the event's
#      bounds, type and JSON (StageStarted), the Redis list the message came from ('' when unknown), the
#      message's progress time (its job's previous stage end, or submit), now, then field/value pairs of the
#      job's status for a step that runs
# -> {begin, deliveries, cancelled (0/1), done record or false}
_BEGIN = APPEND_LUA + """
if ARGV[13] ~= '' then  -- the watchdog tells a job waiting in a queue from a lost one by this (routing/recovery.py)
  local seen = tonumber(redis.call('HGET', KEYS[9], ARGV[13]) or '0')
  if tonumber(ARGV[14]) > seen then redis.call('HSET', KEYS[9], ARGV[13], ARGV[14]) end
  redis.call('EXPIRE', KEYS[9], ARGV[4])
end
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if tonumber(ARGV[1]) < generation then return {'stale', 0, 0, false} end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'progress_at', ARGV[15]) end
local deliveries = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
local owner = 'running:' .. ARGV[2]
local claimed = redis.call('SET', KEYS[2], owner, 'NX', 'EX', ARGV[3])
if not claimed and ARGV[5] == '1' and redis.call('GET', KEYS[2]) == owner then
  claimed = redis.call('SET', KEYS[2], owner, 'XX', 'EX', ARGV[3])
end
if not claimed then return {'duplicate', deliveries, 0, false} end
local cancelled = redis.call('EXISTS', KEYS[4])
local done = redis.call('HGET', KEYS[1], ARGV[6])
if cancelled == 0 and not done then
  redis.call('ZADD', KEYS[5], 'XX', ARGV[7], ARGV[8])
  append(KEYS[7], KEYS[8], ARGV[9], ARGV[10], ARGV[4], ARGV[11], ARGV[12])
  if #ARGV > 15 then
    redis.call('HSET', KEYS[6], unpack(ARGV, 16))
    redis.call('EXPIRE', KEYS[6], ARGV[4])
  end
end
return {'run', deliveries, cancelled, done}
"""

# Start a job once, before its first message is sent: KEYS checkpoint, start claim, job status, watch, job
# event stream, fleet event stream, job index, the pipeline's job index, the pipeline's open jobs; ARGV owner,
# redelivered (0/1), claim value ('running:<owner>', or 'done:<owner>' for a sender never redelivered), claim
# ttl, ttl, request, pipeline, door, pinned spec, deadline, job id, the event's bounds, type and JSON
# (JobQueued), submit time, oldest submit time kept in the indexes, the webhook's JSON ('' for none), then the
# job's status field/value pairs -> 'run' | 'duplicate'
_START = APPEND_LUA + """
local owner = 'running:' .. ARGV[1]
local held = redis.call('GET', KEYS[2])
if held == ARGV[3] then return 'run' end  -- this very start, sent again (its reply was lost): done already
local claimed = redis.call('SET', KEYS[2], ARGV[3], 'NX', 'EX', ARGV[4])
if not claimed and ARGV[2] == '1' and held == owner then
  claimed = redis.call('SET', KEYS[2], owner, 'XX', 'EX', ARGV[4])
end
if not claimed then return 'duplicate' end
redis.call('HSETNX', KEYS[1], 'request', ARGV[6])
redis.call('HSETNX', KEYS[1], 'pipeline', ARGV[7])
redis.call('HSETNX', KEYS[1], 'door', ARGV[8])
redis.call('HSETNX', KEYS[1], 'spec', ARGV[9])
redis.call('HSETNX', KEYS[1], 'generation', 0)
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[18] ~= '' then redis.call('HSETNX', KEYS[1], 'webhook', ARGV[18]) end
if redis.call('HEXISTS', KEYS[3], 'state') == 0 then  -- a job that began already is never set back to queued
  redis.call('HSET', KEYS[3], unpack(ARGV, 19))
end
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[10], ARGV[11])
append(KEYS[5], KEYS[6], ARGV[12], ARGV[13], ARGV[5], ARGV[14], ARGV[15])
for i = 7, 9 do
  redis.call('ZADD', KEYS[i], ARGV[16], ARGV[11])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. ARGV[17])
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
return 'run'
"""

# Close a job once per generation, its result stored with its final status, and out of its pipeline's open
# jobs: KEYS closed marker, checkpoint, watch, job status, result, job event stream, fleet event stream,
# published fields, then the job's claim and delivery-counter keys; ARGV generation ('' for the current one),
# ttl, job id, now, result record, result ttl (0: none), the event's bounds, type and JSON (JobFinished), what
# a succeeded job's records are kept (0: a failed job, kept for the ttl), what the job's event stream is kept,
# prefix of the open-jobs keys, then the final status field/value pairs -> {'run' | 'stale' | 'duplicate', door}
# A succeeded job keeps its result and status; its checkpoint, claims, delivery counters, close marker and
# published fields only serve a redelivery of one of its messages, so they go once none can come.
_CLOSE = APPEND_LUA + """
local current = tonumber(redis.call('HGET', KEYS[2], 'generation') or '0')
local door = redis.call('HGET', KEYS[2], 'door') or ''
local webhook = redis.call('HGET', KEYS[2], 'webhook') or ''
local generation = current
if ARGV[1] ~= '' then generation = tonumber(ARGV[1]) end
if generation < current then return {'stale', door, webhook} end
local closed = redis.call('GET', KEYS[1])
if closed and tonumber(closed) >= generation then return {'duplicate', door, webhook} end
local keep = tonumber(ARGV[11])
redis.call('SET', KEYS[1], generation, 'EX', keep > 0 and keep or ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'finished_at', ARGV[4]) end
local pipeline = redis.call('HGET', KEYS[2], 'pipeline')
if pipeline then redis.call('ZREM', ARGV[13] .. pipeline, ARGV[3]) end
redis.call('HSET', KEYS[4], unpack(ARGV, 14))
redis.call('EXPIRE', KEYS[4], ARGV[2])
if tonumber(ARGV[6]) > 0 then
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[6])
else
  redis.call('SET', KEYS[5], ARGV[5])
end
redis.call('PUBLISH', KEYS[5], ARGV[5])
append(KEYS[6], KEYS[7], ARGV[7], ARGV[8], ARGV[2], ARGV[9], ARGV[10])
redis.call('EXPIRE', KEYS[6], ARGV[12])
if keep > 0 then
  redis.call('EXPIRE', KEYS[2], keep)
  for i = 8, #KEYS do redis.call('EXPIRE', KEYS[i], keep) end
end
return {'run', door, webhook}
"""


def delivery(task: Task) -> tuple[str, bool]:
    """Who delivers this step (the task id) and whether the broker handed the message back."""
    info = task.request.delivery_info or {}
    return str(task.request.id), bool(info.get("redelivered"))


def source_list(task: Task) -> str:
    """The Redis list the broker took this message from: kombu keeps one per queue and priority step, named by
    the routing key (the queue) and the message's priority ('' when the delivery does not say)."""
    info = task.request.delivery_info or {}
    queue = info.get("routing_key")
    if not queue:
        return ""
    return priority_list(str(queue), int(info.get("priority") or 0))


@dataclass(frozen=True)
class Start:
    """What a job starts from, as the ledger records it before the job's first message is sent."""

    request: dict[str, Any]  # the request as received (the watchdog and `resume` start again from it)
    spec: dict[str, Any]  # the pipeline as the job runs it, every version pinned (resumed on the same)
    door: str  # who started it: "client" (the Python client) or "run" (a `pipeline.run` task)
    webhook: dict[str, Any] | None = None  # the completion webhook the request names (read back at the close)


class Checkpoints:
    """The Redis side of the job ledger (workers/ledger.py): scripts and keys; nothing else calls it."""

    def __init__(self, client: redis.Redis, ttl: int, stall_seconds: float, events: EventLog | None = None,
                 keep: "Keep | None" = None) -> None:
        self.client = client
        self.ttl = ttl
        self.stall = stall_seconds
        self.events = events or EventLog(client, ttl)
        self.keep = keep or Keep(ttl, ttl)
        self._first_done = client.register_script(_FIRST_DONE)
        self._complete = client.register_script(_COMPLETE)
        self._begin = client.register_script(_BEGIN)
        self._start = client.register_script(_START)
        self._close = client.register_script(_CLOSE)

    @classmethod
    def from_url(cls, url: str, ttl: int, stall_seconds: float,
                 sentinel: SentinelSettings | None = None) -> "Checkpoints":
        return cls(redis_client(url, sentinel), ttl, stall_seconds)

    # --- the job ------------------------------------------------------------------------------

    def start(self, job: Envelope, start: Start, status: dict[str, str], owner: str, redelivered: bool,
              final: bool, queued: JobQueued) -> Callable[[], Claim]:
        """Record the job's start (first time only), its queued status, its watch deadline and its `queued`
        event, and claim the start for `owner` (unique per attempt to start: sent again after a lost reply,
        the same start answers `run`); `final`: the claim is done at once (a sender that is never
        redelivered). The script is sent now; the returned function reads its reply, so a caller may send
        the job's first message meanwhile (one round trip saved on every job)."""
        key = claim_key(job.job_id, f"{job.generation}:run")
        keys = [checkpoint_key(job.job_id), key, job_key(job.job_id), WATCH_KEY,
                *self.events.script_keys(job.job_id), JOBS_INDEX_KEY, pipeline_jobs_key(job.pipeline),
                open_jobs_key(job.pipeline)]
        value = f"done:{owner}" if final else f"running:{owner}"
        ttl = self.ttl if final else max(int(self.stall), 1)
        now = time.time()
        args: list[Any] = [owner, int(redelivered), value, ttl, self.ttl, json.dumps(start.request), job.pipeline,
                           start.door, json.dumps(start.spec), now + self.stall, job.job_id,
                           *self.events.script_args(queued), job.submitted_at or now, now - self.ttl,
                           json.dumps(start.webhook) if start.webhook else ""]
        for field, encoded_value in status.items():
            args += [field, encoded_value]
        reply = send_script(self.client, self._start, keys, args)

        def claim() -> Claim:
            outcome = _text(reply())
            return Claim(Begin(outcome) if outcome == "run" else Begin.DUPLICATE, key if not final else "")

        return claim

    def request(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.hget(checkpoint_key(job_id), "request")
        return json.loads(raw) if raw else None

    def spec(self, job_id: str) -> dict[str, Any] | None:
        """The pipeline as the job started it, versions pinned (None for a job started before it was kept)."""
        raw = self.client.hget(checkpoint_key(job_id), "spec")
        return json.loads(raw) if raw else None

    def generation(self, job_id: str) -> int:
        raw = self.client.hget(checkpoint_key(job_id), "generation")
        return int(raw) if raw else 0

    def next_generation(self, job_id: str) -> int:
        """The job's generation moved on (a re-dispatch): its first message goes out now, its progress time."""
        pipe = self.client.pipeline()
        pipe.hincrby(checkpoint_key(job_id), "generation", 1)
        pipe.hset(checkpoint_key(job_id), "progress_at", time.time())
        return int(pipe.execute()[0])

    def progress_at(self, job_id: str) -> float:
        """When the job last moved (a step began or was saved, a re-dispatch, else its submit): its current
        message went out no earlier than shortly before this."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(checkpoint_key(job_id), ["progress_at", "updated_at"])
        pipe.hget(job_key(job_id), "submitted_at")
        times, submitted = pipe.execute()
        return max([float(t) for t in times if t] + [float(json.loads(submitted)) if submitted else 0.0])

    def unwatch(self, job_id: str) -> None:
        self.client.zrem(WATCH_KEY, job_id)

    def is_finished(self, job_id: str) -> bool:
        return bool(self.client.hexists(checkpoint_key(job_id), "finished_at"))

    def reopen(self, job_id: str) -> None:
        """An ended job open again: no close marker, not finished, watched (when it has a checkpoint)."""
        pipe = self.client.pipeline()
        pipe.delete(closed_key(job_id))
        pipe.hdel(checkpoint_key(job_id), "finished_at")
        pipe.execute()
        if self.request(job_id) is not None:
            self.client.zadd(WATCH_KEY, {job_id: time.time() + self.stall})
            pipeline = self.client.hget(checkpoint_key(job_id), "pipeline")
            if pipeline:  # open again: part of its pipeline's backlog
                self.client.zadd(open_jobs_key(_text(pipeline)), {job_id: time.time()})

    def stalled(self, now: float | None = None) -> list[str]:
        """Jobs past their deadline of progress."""
        found = self.client.zrangebyscore(WATCH_KEY, "-inf", now or time.time())
        return [_text(j) for j in found]  # type: ignore[arg-type]

    def push_deadline(self, job_id: str, deadline: float) -> None:
        self.client.zadd(WATCH_KEY, {job_id: deadline}, xx=True)  # xx: a finished job stays unwatched

    # --- once-only steps ---------------------------------------------------------------------------

    def begin(self, job: Envelope, step: str, path: str, ttl: float, owner: str, redelivered: bool,
              deadline: float, status: dict[str, str], started: StageStarted, source: str = "") -> Begun:
        """Claim (job, generation, step) for the message `owner` (its task id); `step` names the node path
        and attempt. The broker handing the same message back (`redelivered`: its consumer died, or the
        visibility timeout passed) takes over its own claim; any other copy is a duplicate. Also what
        the step needs to know before it runs (cancelled? done by an earlier generation?), and for a
        step that runs: its deadline in the watch index and `status` (encoded job-status fields)
        written and its `started` event appended. `source`: the Redis list the message came from; the job's
        progress time goes into that list's progress, and the time of this step into the job's checkpoint,
        for the watchdog to tell a job waiting in a queue from a lost one. One round trip."""
        key = claim_key(job.job_id, f"{job.generation}:{step}")
        keys = [checkpoint_key(job.job_id), key, deliveries_key(key), cancel_key(job.job_id), WATCH_KEY,
                job_key(job.job_id), *self.events.script_keys(job.job_id), QUEUE_PROGRESS_KEY]
        args: list[Any] = [job.generation, owner, max(int(ttl), 1), self.ttl, int(redelivered), f"done:{path}",
                           deadline, job.job_id, *self.events.script_args(started), source, job.moved_at,
                           started.at]
        for field, value in status.items():
            args += [field, value]
        begin, deliveries, cancelled, done = self._begin(keys=keys, args=args)
        outcome = Begin(_text(begin))
        claim = Claim(outcome, key if outcome is Begin.RUN else "", max(int(deliveries) - 1, 0))
        return Begun(claim, bool(cancelled), Done.load(done) if done else None)

    def close(self, job_id: str, generation: int | None, ending: Close) -> Closed:
        """Close the job once per generation (None: whichever is current), marking it finished (checkpoint,
        watch index, status), storing its result and appending its JobFinished event in one atomic step.
        Returns whether it closed (False for a duplicate or a stale generation: another delivery
        answers for the job)."""
        replies = execute_with_scripts(self.client, lambda pipe: self.queue_close(pipe, job_id, generation, ending),
                                       [self._close])
        return closed(replies[-1])

    def queue_close(self, pipe: "redis.client.Pipeline", job_id: str, generation: int | None, ending: Close) -> None:
        """`close` queued on the caller's pipeline (the caller reads the reply with `closed`)."""
        claims = [key for claim in ending.claims for key in (claim_key(job_id, claim), deliveries_key(
            claim_key(job_id, claim)))] if ending.succeeded else []
        keys = [closed_key(job_id), checkpoint_key(job_id), WATCH_KEY, job_key(job_id), ending.stored.key,
                *self.events.script_keys(job_id), job_fields_key(job_id), *claims]
        args: list[Any] = ["" if generation is None else generation, self.ttl, job_id, time.time(),
                           ending.stored.value, ending.stored.ttl, *self.events.script_args(ending.finished),
                           self.keep.succeeded if ending.succeeded else 0, self.keep.events, open_jobs_key("")]
        for field, value in ending.status.items():
            args += [field, value]
        queue_script(pipe, self._close, keys, args)

    def complete(self, claim: Claim, job_id: str = "", events: Sequence[StagecoachEvent] = ()) -> None:
        """The step's claim done (a retry or a redelivery of it is a duplicate now), with the `events` of a
        step that completed no stage (failed, cancelled, retried) appended once."""
        if not claim.key:
            return
        keys = [claim.key, *self.events.script_keys(job_id)]
        args = [self.ttl, *self.events.each_args(events)]
        execute_with_scripts(self.client, lambda pipe: queue_script(pipe, self._complete, keys, args),
                             [self._complete])

    # --- stage checkpoints -------------------------------------------------------------------------

    def save(self, job: Envelope, path: str, done: Done, claim: Claim | None = None, close: Close | None = None,
             publish: dict[str, Any] | None = None, events: Sequence[StagecoachEvent] = ()) -> Closed:
        """The envelope after a stage and the stage's outputs for replay; the job's deadline moves on.
        The job's `stages_done` counts the stage and its `events` are appended in the same atomic step,
        once however often it ran. In the same round trip: the step's `claim` completed, the answer
        fields it made final published (`publish`, as JobStore.publish), and with `close` (the job's
        ending) the job closed as `close` does; returns `close`'s reply (closed, when not asked to close)."""
        key = checkpoint_key(job.job_id)
        first_done = [f"done:{path}", done.dump(), *self.events.each_args(events)]

        def build(pipe: "redis.client.Pipeline") -> None:
            queue_script(pipe, self._first_done, [key, job_key(job.job_id), *self.events.script_keys(job.job_id)],
                         first_done)
            pipe.hset(key, mapping={"envelope": job.model_dump_json(), "node": path, "updated_at": time.time()})
            pipe.expire(key, self.ttl)
            pipe.zadd(WATCH_KEY, {job.job_id: time.time() + self.stall}, xx=True)
            if publish:
                pipe.hset(job_fields_key(job.job_id), mapping={k: json.dumps(v) for k, v in publish.items()})
                pipe.expire(job_fields_key(job.job_id), self.ttl)
            if claim is not None and claim.key:
                pipe.set(claim.key, "done", ex=self.ttl)
            if close is not None:  # last: every write before it is idempotent if a redelivery repeats it
                self.queue_close(pipe, job.job_id, job.generation, close)

        replies = execute_with_scripts(self.client, build, [self._first_done, self._close])
        return closed(replies[-1]) if close is not None else Closed(True)

    def envelope(self, job_id: str) -> Envelope | None:
        raw = self.client.hget(checkpoint_key(job_id), "envelope")
        return Envelope.model_validate_json(raw) if raw else None

    # --- cancellation ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        self.client.set(cancel_key(job_id), time.time(), ex=self.ttl)

    def uncancel(self, job_id: str) -> None:
        self.client.delete(cancel_key(job_id))

    def cancelled(self, job_id: str) -> bool:
        return bool(self.client.exists(cancel_key(job_id)))


@dataclass(frozen=True)
class Keep:
    """How long a job's records stay once it ended (seconds). `succeeded`: a succeeded job's checkpoint,
    claims, delivery counters, close marker and published fields (a redelivery of one of its messages is
    dropped while they last); `events`: any ended job's own event stream (an SSE reader that comes back
    within it replays the job). A failed job keeps the rest for the ttl: `stagecoach resume` needs it."""

    succeeded: int
    events: int


def claims_of(generation: int, steps: Sequence[tuple[str, int]]) -> tuple[str, ...]:
    """The claim names (`Checkpoints.begin`'s `step` per generation, and the start's) of a job that ran
    `steps` (node path, attempts), in any generation up to `generation`: keys that do not exist cost nothing."""
    most: dict[str, int] = {}
    for path, attempts in steps:
        most[path] = max(most.get(path, 1), attempts)
    names = [f"{g}:run" for g in range(generation + 1)]
    names += [f"{g}:{path}#{attempt}" for g in range(generation + 1) for path, attempts in most.items()
              for attempt in range(attempts)]
    return tuple(names)


def send_script(client: redis.Redis, script: Any, keys: list[str], args: list[Any]) -> Callable[[], Any]:
    """Send a script now on a connection of its own, and return a function that reads its reply (once):
    the caller overlaps the round trip with its own work. A Redis that lost its script cache (restarted)
    answers NOSCRIPT: then the script is run again, loaded, when the reply is read."""
    pool = client.connection_pool
    connection: Any = pool.get_connection()
    parse: Any = client.parse_response
    try:
        connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
    except BaseException:
        pool.release(connection)
        raise

    def reply() -> Any:
        try:
            return parse(connection, "EVALSHA")
        except redis.exceptions.NoScriptError:
            return script(keys=keys, args=args)
        except BaseException:
            connection.disconnect()  # a half-read reply must not be read by the next user of the connection
            raise
        finally:
            pool.release(connection)

    return reply


def queue_script(pipe: "redis.client.Pipeline", script: Any, keys: list[str], args: list[Any]) -> None:
    """A script on a pipeline by its sha alone: redis-py's own way asks SCRIPT EXISTS first, a second
    round trip on every execute (see `execute_with_scripts`)."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def execute_with_scripts(client: redis.Redis, build: Callable[["redis.client.Pipeline"], None],
                         scripts: list[Any]) -> list[Any]:
    """One round trip for a pipeline that `build` fills, scripts queued with `queue_script`, as one
    MULTI/EXEC transaction: Redis runs all of it or, at maxmemory, refuses all of it (EXEC of deny-oom
    commands is refused whole), so a step is never half-written. A Redis that lost its script cache
    (restarted) answers NOSCRIPT: the scripts are loaded and the pipeline sent again, which is safe
    because every command these pipelines hold is idempotent."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=True)
        build(pipe)
        try:
            return pipe.execute()  # type: ignore[no-any-return]
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            for script in scripts:
                client.script_load(script.script)
    raise AssertionError("unreachable")


def closed(reply: Any) -> Closed:
    outcome, door, webhook = reply
    return Closed(_text(outcome) == "run", _text(door), _text(webhook))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
