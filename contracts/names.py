"""The one place for queue names, task names and Redis key prefixes.

Task names are stable strings so that any Celery client, in any language, can enqueue by name.
"""

STAGE_PREFIX = "stage."
ROUTING_QUEUE = "pipeline.routing"

RUN_TASK = "pipeline.run"
FINISH_TASK = "pipeline.finish"

KEY_PREFIX = "stagecoach:"
JOB_KEY_PREFIX = KEY_PREFIX + "job:"
CACHE_KEY_PREFIX = KEY_PREFIX + "cache:"
MONITOR_KEY_PREFIX = KEY_PREFIX + "monitor:"


def stage_task(stage: str) -> str:
    """Celery task name of a stage."""
    return STAGE_PREFIX + stage


def stage_queue(stage: str) -> str:
    """Queue a stage's task is routed to; one queue per stage so each scales on its own."""
    return STAGE_PREFIX + stage


def routing_task(kind: str) -> str:
    """Celery task name of the routing task that decides a runtime node (branch, loop, map...)."""
    return f"pipeline.{kind}"


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


# Custom Celery events (their own group, not `task-`, so Flower's task states stay Celery's own).
STAGE_OUTCOME_EVENT = "stagecoach-stage-outcome"
JOB_FINISHED_EVENT = "stagecoach-job-finished"


def monitor_key(*parts: str) -> str:
    """A key of the monitor's store, e.g. monitor_key("stage", "answer") -> stagecoach:monitor:stage:answer."""
    return MONITOR_KEY_PREFIX + ":".join(parts)
