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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from contracts.candidates import TraceStep
from contracts.envelope import Envelope, StageTiming, Usage
from contracts.names import WATCH_KEY, cancel_key, checkpoint_key, claim_key, job_fields_key, job_key


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


# KEYS checkpoint, job status; ARGV field, value: record a stage's first completion and count it
_FIRST_DONE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'stages_done', 1)
  return 1
end
return 0
"""


# The start of a stage step in one round trip (it runs on every stage call, so round trips count):
# KEYS checkpoint, claim, deliveries, cancel, watch, job status
# ARGV generation, owner, claim ttl, ttl, redelivered (0/1), done field, deadline, job id, then
#      field/value pairs of the job's status for a step that runs
# -> {begin, deliveries, cancelled (0/1), done record or false}
_BEGIN = """
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if tonumber(ARGV[1]) < generation then return {'stale', 0, 0, false} end
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
  if #ARGV > 8 then
    redis.call('HSET', KEYS[6], unpack(ARGV, 9))
    redis.call('EXPIRE', KEYS[6], ARGV[4])
  end
end
return {'run', deliveries, cancelled, done}
"""

# Close a job once, its result stored with its final status: KEYS finish claim, checkpoint, watch,
# job status, result; ARGV generation, ttl, job id, now, result record, result ttl (0: none), then
# field/value pairs of the job's final status -> 'run' | 'stale' | 'duplicate'
_CLOSE = """
local generation = tonumber(redis.call('HGET', KEYS[2], 'generation') or '0')
if tonumber(ARGV[1]) < generation then return 'stale' end
if not redis.call('SET', KEYS[1], 'done', 'NX', 'EX', ARGV[2]) then return 'duplicate' end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], 'finished_at', ARGV[4])
redis.call('HSET', KEYS[4], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[4], ARGV[2])
if tonumber(ARGV[6]) > 0 then
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[6])
else
  redis.call('SET', KEYS[5], ARGV[5])
end
redis.call('PUBLISH', KEYS[5], ARGV[5])
return 'run'
"""


def delivery(task: Task) -> tuple[str, bool]:
    """Who delivers this step (the task id) and whether the broker handed the message back."""
    info = task.request.delivery_info or {}
    return str(task.request.id), bool(info.get("redelivered"))


class Checkpoints:
    def __init__(self, client: redis.Redis, ttl: int, stall_seconds: float) -> None:
        self.client = client
        self.ttl = ttl
        self.stall = stall_seconds
        self._first_done = client.register_script(_FIRST_DONE)
        self._begin = client.register_script(_BEGIN)
        self._close = client.register_script(_CLOSE)

    @classmethod
    def from_url(cls, url: str, ttl: int, stall_seconds: float) -> "Checkpoints":
        return cls(redis.Redis.from_url(url), ttl, stall_seconds)

    # --- the job ------------------------------------------------------------------------------

    def started(self, job_id: str, pipeline: str, request: dict[str, Any],
                pipe: "redis.client.Pipeline | None" = None) -> None:
        """Record what the job started from (first time only) and watch it; with `pipe`, queued on
        the caller's pipeline (the client sends it with the job's queued status, one round trip)."""
        key = checkpoint_key(job_id)
        own = pipe is None
        pipe = self.client.pipeline() if pipe is None else pipe
        pipe.hsetnx(key, "request", json.dumps(request))
        pipe.hsetnx(key, "pipeline", pipeline)
        pipe.hsetnx(key, "generation", 0)
        pipe.hset(key, "updated_at", time.time())
        pipe.expire(key, self.ttl)
        pipe.zadd(WATCH_KEY, {job_id: time.time() + self.stall})
        if own:
            pipe.execute()

    def request(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.hget(checkpoint_key(job_id), "request")
        return json.loads(raw) if raw else None

    def generation(self, job_id: str) -> int:
        raw = self.client.hget(checkpoint_key(job_id), "generation")
        return int(raw) if raw else 0

    def next_generation(self, job_id: str) -> int:
        return int(self.client.hincrby(checkpoint_key(job_id), "generation", 1))

    def finished(self, job_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.zrem(WATCH_KEY, job_id)
        pipe.hset(checkpoint_key(job_id), "finished_at", time.time())
        pipe.execute()

    def is_finished(self, job_id: str) -> bool:
        return bool(self.client.hexists(checkpoint_key(job_id), "finished_at"))

    def reopen(self, job_id: str) -> None:
        """Watch a finished job again (resume)."""
        pipe = self.client.pipeline()
        pipe.hdel(checkpoint_key(job_id), "finished_at")
        pipe.zadd(WATCH_KEY, {job_id: time.time() + self.stall})
        pipe.execute()

    def stalled(self, now: float | None = None) -> list[str]:
        """Jobs past their deadline of progress."""
        found = self.client.zrangebyscore(WATCH_KEY, "-inf", now or time.time())
        return [j.decode() if isinstance(j, bytes) else str(j) for j in found]

    def push_deadline(self, job_id: str, deadline: float) -> None:
        self.client.zadd(WATCH_KEY, {job_id: deadline}, xx=True)  # xx: a finished job stays unwatched

    # --- once-only steps ---------------------------------------------------------------------------

    def claim(self, job: Envelope, step: str, ttl: float, owner: str, redelivered: bool = False) -> Claim:
        """Claim (job, generation, step) for the message `owner` (its task id); `step` names the node
        path and attempt. The broker handing the same message back (`redelivered`: its consumer died,
        or the visibility timeout passed) takes over its own claim; any other copy is a duplicate."""
        if job.generation < self.generation(job.job_id):
            return Claim(Begin.STALE, "")
        key = claim_key(job.job_id, f"{job.generation}:{step}")
        pipe = self.client.pipeline()
        pipe.incr(key + ":deliveries")
        pipe.expire(key + ":deliveries", self.ttl)
        pipe.set(key, f"running:{owner}", nx=True, ex=max(int(ttl), 1))
        deliveries, _, claimed = pipe.execute()
        if not claimed and redelivered and self._take_over(key, owner, ttl):
            claimed = True
        return Claim(Begin.RUN if claimed else Begin.DUPLICATE, key, max(int(deliveries) - 1, 0))

    def _take_over(self, key: str, owner: str, ttl: float) -> bool:
        held = self.client.get(key)
        if held is None or (held.decode() if isinstance(held, bytes) else held) != f"running:{owner}":
            return False  # done already, or held by another copy
        return bool(self.client.set(key, f"running:{owner}", xx=True, ex=max(int(ttl), 1)))

    def begin(self, job: Envelope, step: str, path: str, ttl: float, owner: str, redelivered: bool,
              deadline: float, status: dict[str, str]) -> Begun:
        """`claim` for a stage step, plus what the step needs to know before it runs (cancelled? done by an
        earlier generation?), and for a step that runs: its deadline in the watch index and `status`
        (encoded job-status fields) written. One round trip."""
        key = claim_key(job.job_id, f"{job.generation}:{step}")
        keys = [checkpoint_key(job.job_id), key, key + ":deliveries", cancel_key(job.job_id), WATCH_KEY,
                job_key(job.job_id)]
        args: list[Any] = [job.generation, owner, max(int(ttl), 1), self.ttl, int(redelivered), f"done:{path}",
                           deadline, job.job_id]
        for field, value in status.items():
            args += [field, value]
        begin, deliveries, cancelled, done = self._begin(keys=keys, args=args)
        outcome = Begin(begin.decode() if isinstance(begin, bytes) else begin)
        claim = Claim(outcome, key if outcome is Begin.RUN else "", max(int(deliveries) - 1, 0))
        return Begun(claim, bool(cancelled), Done.load(done) if done else None)

    def close(self, job: Envelope, status: dict[str, str], stored: StoredResult,
              pipe: "redis.client.Pipeline | None" = None) -> bool:
        """Claim the job's finish, mark it finished (checkpoint, watch index, `status`) and store its
        result, in one atomic step; False for a duplicate or a stale generation: another delivery
        answers for the job. With `pipe`, queued there (the caller reads the outcome with `closed`)."""
        claim = claim_key(job.job_id, f"{job.generation}:finish")
        keys = [claim, checkpoint_key(job.job_id), WATCH_KEY, job_key(job.job_id), stored.key]
        args: list[Any] = [job.generation, self.ttl, job.job_id, time.time(), stored.value, stored.ttl]
        for field, value in status.items():
            args += [field, value]
        if pipe is not None:
            queue_script(pipe, self._close, keys, args)
            return True
        return closed(self._close(keys=keys, args=args))

    def claimed_start(self, job: Envelope, pipe: "redis.client.Pipeline") -> None:
        """The start of the job claimed done, on the caller's pipeline: a client that sent the job's
        chain itself; a `pipeline.run` for the same job id then starts nothing."""
        pipe.set(claim_key(job.job_id, f"{job.generation}:run"), "done", ex=self.ttl)

    def complete(self, claim: Claim) -> None:
        if claim.key:
            self.client.set(claim.key, "done", ex=self.ttl)

    # --- stage checkpoints -------------------------------------------------------------------------

    def save(self, job: Envelope, path: str, done: Done, claim: Claim | None = None,
             close: tuple[dict[str, str], StoredResult] | None = None, publish: dict[str, Any] | None = None) -> bool:
        """The envelope after a stage and the stage's outputs for replay; the job's deadline moves on.
        The job's `stages_done` counts the stage in the same atomic step, once however often it ran.
        In the same round trip: the step's `claim` completed, the answer fields it made final published
        (`publish`, as JobStore.publish), and with `close` (the job's final status and result) the job
        closed as `close` does; returns whether it closed (True when not asked to)."""
        key = checkpoint_key(job.job_id)

        def build(pipe: "redis.client.Pipeline") -> None:
            queue_script(pipe, self._first_done, [key, job_key(job.job_id)], [f"done:{path}", done.dump()])
            pipe.hset(key, mapping={"envelope": job.model_dump_json(), "node": path, "updated_at": time.time()})
            pipe.expire(key, self.ttl)
            pipe.zadd(WATCH_KEY, {job.job_id: time.time() + self.stall}, xx=True)
            if publish:
                pipe.hset(job_fields_key(job.job_id), mapping={k: json.dumps(v) for k, v in publish.items()})
                pipe.expire(job_fields_key(job.job_id), self.ttl)
            if claim is not None and claim.key:
                pipe.set(claim.key, "done", ex=self.ttl)
            if close is not None:  # last: every write before it is idempotent if a redelivery repeats it
                self.close(job, *close, pipe=pipe)

        replies = execute_with_scripts(self.client, build, [self._first_done, self._close])
        return closed(replies[-1]) if close is not None else True

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


def queue_script(pipe: "redis.client.Pipeline", script: Any, keys: list[str], args: list[Any]) -> None:
    """A script on a pipeline by its sha alone: redis-py's own way asks SCRIPT EXISTS first, a second
    round trip on every execute (see `execute_with_scripts`)."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def execute_with_scripts(client: redis.Redis, build: Callable[["redis.client.Pipeline"], None],
                         scripts: list[Any]) -> list[Any]:
    """One round trip for a pipeline that `build` fills, scripts queued with `queue_script`. A Redis that
    lost its script cache (restarted) answers NOSCRIPT: the scripts are loaded and the pipeline sent
    again, which is safe because every command these pipelines hold is idempotent."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        try:
            return pipe.execute()  # type: ignore[no-any-return]
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            for script in scripts:
                client.script_load(script.script)
    raise AssertionError("unreachable")


def closed(reply: Any) -> bool:
    """Whether a `_CLOSE` reply says this delivery closed the job."""
    return (reply.decode() if isinstance(reply, bytes) else reply) == "run"
