"""Build the runtime (Celery app, settings, catalog, job store) from settings; `workers.app` holds the
instance workers run.

Every setting here has a reason:
- JSON only: pickle over a broker lets anyone who can write to Redis run code in the workers.
- acks_late + reject_on_worker_lost: a worker dying mid-stage leaves the message for redelivery.
- prefetch 1: LM-bound stages are long; a worker must not hoard messages others could serve.
- visibility_timeout above the longest stage, or Redis redelivers a message still being worked.
- result_expires so the backend does not grow without bound.
"""

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from contracts.catalog import Catalog, load_catalog
from contracts.connections import is_sentinel
from contracts.names import ROUTING_QUEUE, STAGE_PREFIX, WEBHOOK_QUEUE, WEBHOOK_TASK, stage_queue
from contracts.priority import MAX_PRIORITY, PRIORITY_STEPS, REDIS_PRIORITY_SEPARATOR
from contracts.specs import Limits
from workers.ledger import Ledger
from workers.runtime import Runtime
from workers.settings import Settings
from workers.tasks import register_stage_tasks
from workers.webhook_task import register_webhook_task

Plugin = Callable[[Runtime], None]


def create_runtime(settings: Settings | None = None, catalog: Catalog | None = None,
                   plugins: Sequence[Plugin] = ()) -> Runtime:
    """The app with every stage task registered, then each of `plugins` and of `settings.plugins` (import
    paths) called with the runtime: the composition root (workers/app.py) passes the routing tasks."""
    settings = settings or Settings()
    catalog = catalog or load_catalog(settings.catalog)
    app = Celery("stagecoach", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(celery_config(settings, catalog))
    shorter_reprs(app)
    runtime = Runtime(app, settings, catalog, Ledger.from_settings(app, settings, catalog))
    register_stage_tasks(app, catalog.stages, settings, runtime.ledger)
    register_webhook_task(app, settings, runtime.jobs)
    for plugin in [*plugins, *(_load_plugin(path) for path in settings.plugins)]:
        plugin(runtime)
    return runtime


def visibility_timeout(settings: Settings, catalog: Catalog) -> int:
    """Seconds before Redis hands an unacked message to another consumer: the setting, else the longest
    stage's hard limit + 60. Lower is safe (a duplicate of a running step is dropped by its claim) but
    then the watchdog, not Redis, recovers a killed worker's job; see docs/reliability.md."""
    if settings.visibility_timeout is not None:
        return settings.visibility_timeout
    return int(longest_hard_limit(settings, catalog)) + 60


def longest_hard_limit(settings: Settings, catalog: Catalog) -> float:
    """The longest hard limit of any stage (contracts/specs.py: Limits), or the default's."""
    stages = catalog.stages.values()
    return max([Limits.stage(spec, settings.stage_time_limit).hard for spec in stages]
               or [Limits.of(settings.stage_time_limit).hard])


def soft_shutdown_seconds(settings: Settings, catalog: Catalog) -> float:
    """How long a cold shutdown lets running tasks finish before handing them back: the setting, else the
    longest stage's hard limit (a stage call that can still succeed is not thrown away)."""
    if settings.soft_shutdown_seconds is not None:
        return settings.soft_shutdown_seconds
    return longest_hard_limit(settings, catalog)


# Celery writes a repr of every task's args and kwargs into its message (what Flower shows) and of
# every return value into the worker's log. An envelope is a nested document: at Celery's default of
# 1024 characters, these reprs cost a stage more CPU than its own bookkeeping (bench/profile.py).
# 256 characters still show the job id, which every envelope starts with.
REPR_CHARS = 256


def shorter_reprs(app: Celery) -> None:
    app.amqp.argsrepr_maxsize = REPR_CHARS
    app.amqp.kwargsrepr_maxsize = REPR_CHARS
    app.Task.resultrepr_maxsize = REPR_CHARS


def publish_retry_policy(seconds: float) -> dict[str, float]:
    """kombu's retry policy for publishing, spread over about `seconds` (pauses of 0.2 s growing to 2 s)."""
    return {"max_retries": max(3, int(seconds / 2) + 2), "interval_start": 0.2, "interval_step": 0.5,
            "interval_max": 2.0}


def celery_config(settings: Settings, catalog: Catalog) -> dict[str, Any]:
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # a worker takes a message only when a pool slot is free, so a queue's length is its waiting work
        # (what KEDA scales on) and a stopping worker holds nothing it has not started (Redis broker only)
        "worker_disable_prefetch": settings.broker_is_redis,
        # a cold shutdown (Kubernetes' SIGTERM with REMAP_SIGTERM=SIGQUIT) lets running stage calls finish,
        # then hands back what is left; an idle worker stops at once
        "worker_soft_shutdown_timeout": soft_shutdown_seconds(settings, catalog),
        "worker_enable_soft_shutdown_on_idle": False,
        "result_expires": settings.result_expires,
        # a Redis restart must not drop a finished task's result (nor the job's): retry storing it
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        # the next step of a chain is published after a stage returns; while Redis restarts, retry it
        # (for about STAGECOACH_PUBLISH_RETRY_SECONDS) rather than fail the job on a publish error
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_retry_policy(settings.publish_retry_seconds),
        # Celery's defaults, kept on purpose: a stored result holds the return value alone (extended
        # results repeated the task's args, a whole envelope, in every write) and no STARTED write
        # precedes it (job progress lives in the job's status record, workers/jobs.py)
        "result_extended": False,
        "task_track_started": False,
        # priorities (contracts/priority.py): the job's first messages carry it, every later one inherits it
        # from the task that sends it; on Redis one list per priority step, on RabbitMQ priority queues
        "task_inherit_parent_priority": True,
        **redis_connection_config(settings, visibility_timeout(settings, catalog)),
        "broker_connection_retry_on_startup": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_queues": [*(stage_queue_of(stage_queue(name)) for name in catalog.stages),
                        Queue(ROUTING_QUEUE), Queue(WEBHOOK_QUEUE)],  # type: ignore[no-untyped-call]
        "task_routes": (route_task,),
        "task_default_queue": ROUTING_QUEUE,
        "worker_hijack_root_logger": False,
        "worker_consumer": "workers.consumer:PoisonProofConsumer",  # screens every message (poison-proof)
    }


def stage_queue_of(name: str) -> Queue:
    """A stage queue as declared: on RabbitMQ a priority queue (`x-max-priority`; Redis ignores the argument).
    The routing queue is not: clients in other languages (celery-node) declare it when they publish
    `pipeline.run`, without arguments, and RabbitMQ refuses a declaration whose arguments differ."""
    return Queue(name, queue_arguments={"x-max-priority": MAX_PRIORITY})  # type: ignore[no-untyped-call]


def redis_connection_config(settings: Settings, visibility: int) -> dict[str, Any]:
    """The broker's transport options (the visibility timeout; kombu's Redis priority steps, one list per
    priority: contracts/priority.py), and with Redis Sentinel (sentinel:// URLs) what kombu's sentinel
    transport and Celery's sentinel result backend need: the master's name and how to reach the sentinels
    (contracts/connections.py; the same settings every Stagecoach Redis client uses)."""
    options = {"visibility_timeout": visibility, "priority_steps": PRIORITY_STEPS, "sep": REDIS_PRIORITY_SEPARATOR}
    config: dict[str, Any] = {"broker_transport_options": options}
    if is_sentinel(settings.broker_url):
        config["broker_transport_options"].update(settings.sentinel.transport_options())
        if settings.sentinel.tls:
            config["broker_use_ssl"] = settings.sentinel.certificate_options()
    if is_sentinel(settings.backend_url):
        config["result_backend_transport_options"] = settings.sentinel.transport_options()
        if settings.sentinel.tls:
            config["redis_backend_use_ssl"] = settings.sentinel.certificate_options()
    return config


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str]:
    """stage.<name> goes to its own queue, webhook deliveries to theirs; every routing task to the routing queue."""
    if name.startswith(STAGE_PREFIX):
        return {"queue": name}
    if name == WEBHOOK_TASK:
        return {"queue": WEBHOOK_QUEUE}
    return {"queue": ROUTING_QUEUE}


def _load_plugin(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
