"""The one place for queue names, task names and Redis key prefixes.

Task names are stable strings so that any Celery client, in any language, can enqueue by name.

A stage's *ref* is its name for the latest (or only) version and `name@version` for every other
version, so `stage.answer` keeps naming the current version while `stage.answer@1` serves jobs
pinned to an older one. `@` is a plain character to Celery task names and Redis queue keys.
"""

STAGE_PREFIX = "stage."
ROUTING_QUEUE = "pipeline.routing"
DEFAULT_QUEUE = "celery"  # Celery's default queue: where clients that name no queue send (the routing worker serves it)
VERSION_SEPARATOR = "@"

# adjacent fusible stages of a sequence, run in turn by one task on the first stage's queue
FUSED_TASK = "stage.fused"
MAX_FUSED_STEPS = 8  # the compiler fuses at most this many stages into one task

# completion webhooks: delivered by tasks on a queue of their own, never by a stage worker
WEBHOOK_QUEUE = "webhook.delivery"
WEBHOOK_TASK = "webhook.deliver"

RUN_TASK = "pipeline.run"
FINISH_TASK = "pipeline.finish"
LOOP_NEXT_TASK = "pipeline.loop.next"  # a loop's check after each iteration
MAP_GATHER_TASK = "pipeline.map.gather"  # the chord body of a map
FANIN_TASK = "pipeline.fanin"  # the chord body of a parallel group or an ensemble
RESCUE_SUFFIX = ".rescue"  # a chord body's errback: `<body>.rescue`
FINISH_ID_SUFFIX = "-finish"  # the task that closes a job started by `pipeline.run`: `<job id>-finish`

KEY_PREFIX = "stagecoach:"
JOB_KEY_PREFIX = KEY_PREFIX + "job:"
CACHE_KEY_PREFIX = KEY_PREFIX + "cache:"
MONITOR_KEY_PREFIX = KEY_PREFIX + "monitor:"
DEAD_LETTER_KEY = KEY_PREFIX + "deadletters"  # list of JSON DeadLetter entries, newest first
CHECKPOINT_KEY_PREFIX = KEY_PREFIX + "checkpoint:"
CLAIM_KEY_PREFIX = KEY_PREFIX + "claim:"
CANCEL_KEY_PREFIX = KEY_PREFIX + "cancel:"
RATE_KEY_PREFIX = KEY_PREFIX + "rate:"
# hash: a queue's Redis list -> the latest progress time (previous stage's end, or submit) of a message started
# from it; the watchdog tells a job waiting behind a backlog from a lost one by it
QUEUE_PROGRESS_KEY = KEY_PREFIX + "queues:started"
WATCH_KEY = KEY_PREFIX + "watch"  # sorted set: unfinished job id -> deadline of its next progress
JOBS_INDEX_KEY = KEY_PREFIX + "jobs"  # sorted set: job id -> submit time (listing, newest first; trimmed by age)
TOKENS_KEY = KEY_PREFIX + "tokens"  # hash: SHA-256 of an API token -> its record (name, scopes, pipelines)
API_KEY_PREFIX = KEY_PREFIX + "api:"  # the HTTP API's own keys: idempotency records, rate windows


CANDIDATE_KEY_PREFIX = KEY_PREFIX + "candidate:"  # optimisation: candidate stage states by sha256

CACHE_ENTRY_PREFIX = CACHE_KEY_PREFIX + "entry:"
CACHE_STATS_PREFIX = CACHE_KEY_PREFIX + "stats:"
CACHE_LRU_KEY = CACHE_KEY_PREFIX + "lru"  # sorted set: entry key -> last use (unix seconds)
CACHE_SIZES_KEY = CACHE_KEY_PREFIX + "sizes"  # hash: entry key -> bytes
CACHE_TOTAL_KEY = CACHE_KEY_PREFIX + "bytes"  # total bytes of live entries


def versioned(name: str, version: str) -> str:
    """`name@version`: how requests, specs and cache keys name one version of a stage or pipeline."""
    return f"{name}{VERSION_SEPARATOR}{version}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """`answer@2` -> ("answer", "2"); `answer` -> ("answer", None)."""
    name, sep, version = ref.partition(VERSION_SEPARATOR)
    return name, (version if sep else None)


def stage_task(stage: str) -> str:
    """Celery task name of a stage ref (`answer`, or `answer@1` for a version that is not the latest)."""
    return STAGE_PREFIX + stage


def stage_queue(stage: str) -> str:
    """Queue a stage's task is routed to; one queue per stage version so each scales on its own."""
    return STAGE_PREFIX + stage


def service_name(ref: str) -> str:
    """A worker / compose service name for a stage ref: `@` is Celery's node-name separator and is not
    allowed in compose service names, so `answer@1` becomes `answer-v1`."""
    return ref.replace(VERSION_SEPARATOR, "-v")


def routing_task(kind: str) -> str:
    """Celery task name of the routing task that decides a runtime node (branch, loop, map...)."""
    return f"pipeline.{kind}"


def rescue_task(body_task: str) -> str:
    """The errback of a chord body: resends the body when a member raised (routing/chords.py)."""
    return body_task + RESCUE_SUFFIX


def finish_task_id(job_id: str) -> str:
    """Task id of the task that closes a job started by `pipeline.run`: the run task has the job id, so
    Flower shows `pipeline.run` under the job id and the closing task beside it."""
    return job_id + FINISH_ID_SUFFIX


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


# Stagecoach's own events (contracts/events.py), by type name: on the event log's Redis streams
STAGE_OUTCOME_EVENT = "stagecoach-stage-outcome"
JOB_FINISHED_EVENT = "stagecoach-job-finished"
JOB_QUEUED_EVENT = "stagecoach-job-queued"
STAGE_STARTED_EVENT = "stagecoach-stage-started"
DECISION_EVENT = "stagecoach-decision"
FIELDS_EVENT = "stagecoach-fields"

# the event log (workers/eventlog.py): every job's events on one bounded stream, read by the monitor
EVENTS_STREAM = KEY_PREFIX + "events"
# the monitor's consumer group on EVENTS_STREAM: its replicas share it, each entry counted by one of them
MONITOR_GROUP = "stagecoach-monitor"


def job_events_key(job_id: str) -> str:
    """A job's own event stream (bounded, expiring with the job): what SSE readers and traces replay."""
    return JOB_KEY_PREFIX + job_id + ":events"


class MonitorKeys:
    """The parts that name the monitor's keys (monitor/store.py documents their layout): a key is
    `monitor_key(PART, ...)`, e.g. `monitor_key(MonitorKeys.AGG, "stage", "answer")`."""

    AGG = "agg"  # hash of counters of one stage, pipeline, version or stage|pipeline pair
    NAMES = "names"  # set of the names of one kind
    SAMPLES = "samples"  # latest runtimes
    WAITS = "waits"  # latest queue waits
    SERIES = "series"  # one time bucket
    ERRORS = "errors"  # latest error examples of a group and kind
    ERROR_COUNTS = "errorcounts"  # hash: group and kind -> count
    TRACE = "trace"  # one job's trace events
    JOBS = "jobs"  # sorted set: the jobs with a trace, by time
    EVICTED = "evicted"  # sorted set: jobs lately dropped from `jobs` (their late events are dropped)
    TASK = "task"  # what one Celery task's events said


def monitor_key(*parts: str) -> str:
    """A key of the monitor's store, e.g. monitor_key("stage", "answer") -> stagecoach:monitor:stage:answer."""
    return MONITOR_KEY_PREFIX + ":".join(parts)


def job_fields_key(job_id: str) -> str:
    """Hash of a job's answer fields published as soon as they are final (before the job ends)."""
    return JOB_KEY_PREFIX + job_id + ":fields"


def cache_entry_key(stage_version: str, digest: str) -> str:
    """One cached stage output; `stage_version` is `name@version` so a stage's entries can be found."""
    return f"{CACHE_ENTRY_PREFIX}{stage_version}:{digest}"


def cache_entry_pattern(stage: str | None) -> str:
    """SCAN pattern for the entries of one stage (`answer`: every version; `answer@1`: one), or all."""
    if stage is None:
        return CACHE_ENTRY_PREFIX + "*"
    return f"{CACHE_ENTRY_PREFIX}{stage}{'' if VERSION_SEPARATOR in stage else VERSION_SEPARATOR + '*'}:*"


def cache_stats_key(stage_version: str) -> str:
    """Hash of hits, misses, evictions, entries and bytes of one stage version."""
    return CACHE_STATS_PREFIX + stage_version


def checkpoint_key(job_id: str) -> str:
    return CHECKPOINT_KEY_PREFIX + job_id


def claim_key(job_id: str, what: str) -> str:
    """SET NX key that makes one (job, node path, attempt) happen once, whoever delivers it."""
    return f"{CLAIM_KEY_PREFIX}{job_id}:{what}"


def deliveries_key(claim: str) -> str:
    """Counter of the broker's deliveries of one claimed step (redeliveries show in its timing)."""
    return claim + ":deliveries"


def closed_key(job_id: str) -> str:
    """The generation that closed the job: a job closes once per generation (a resume opens the next)."""
    return JOB_KEY_PREFIX + job_id + ":closed"


def pipeline_jobs_key(pipeline: str) -> str:
    """Sorted set: job id -> submit time of one pipeline's jobs (listing by pipeline)."""
    return f"{JOBS_INDEX_KEY}:pipeline:{pipeline}"


def open_jobs_key(pipeline: str) -> str:
    """Sorted set: job id -> submit time of one pipeline's jobs not ended yet (its backlog, `max_queued`)."""
    return f"{JOBS_INDEX_KEY}:open:{pipeline}"


def idempotency_key(token: str, key: str) -> str:
    """The job an `Idempotency-Key` of one caller (token name, or "" with auth off) started."""
    return f"{API_KEY_PREFIX}idempotency:{token}:{key}"


def api_rate_key(token: str, minute: int) -> str:
    """Requests of one caller in one minute (the per-token rate limit)."""
    return f"{API_KEY_PREFIX}rate:{token}:{minute}"


def candidate_key(digest: str) -> str:
    """A candidate stage state (JSON) stored once by its sha256 (contracts/candidates.py)."""
    return CANDIDATE_KEY_PREFIX + digest


def backlog_key(job_id: str) -> str:
    """When the watchdog first found this stalled job with a backlog in the queues (it waits, up to a bound)."""
    return JOB_KEY_PREFIX + job_id + ":backlog"


def cancel_key(job_id: str) -> str:
    return CANCEL_KEY_PREFIX + job_id


def rate_key(stage: str, unit: str, window: int) -> str:
    return f"{RATE_KEY_PREFIX}{stage}:{unit}:{window}"


# bench/: the bare Celery chain that per-job overhead is measured against (one queue per stage)
BENCH_BARE_PREFIX = "bench.bare."


def bench_bare_task(stage: str) -> str:
    """Task (and queue) name of the benchmark's bare Celery task for a stage."""
    return BENCH_BARE_PREFIX + stage
