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
from typing import Any

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from contracts.catalog import Catalog, load_catalog
from contracts.names import ROUTING_QUEUE, STAGE_PREFIX, stage_queue
from workers.jobs import JobStore
from workers.runtime import Runtime
from workers.settings import Settings
from workers.tasks import register_stage_tasks


def create_runtime(settings: Settings | None = None, catalog: Catalog | None = None) -> Runtime:
    """The app with every stage task and, through `settings.plugins`, the routing tasks registered."""
    settings = settings or Settings()
    catalog = catalog or load_catalog(settings.catalog)
    app = Celery("stagecoach", broker=settings.broker_url, backend=settings.backend_url)
    app.conf.update(celery_config(settings, catalog))
    runtime = Runtime(app, settings, catalog, JobStore.from_url(settings.backend_url, settings.result_expires))
    register_stage_tasks(app, catalog.stages, settings, runtime.jobs)
    for plugin in settings.plugins:
        _load_plugin(plugin)(runtime)
    return runtime


def celery_config(settings: Settings, catalog: Catalog) -> dict[str, Any]:
    longest = max([s.time_limit or settings.stage_time_limit for s in catalog.stages.values()] or [0.0])
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "result_expires": settings.result_expires,
        "result_extended": True,
        "broker_transport_options": {"visibility_timeout": max(settings.visibility_timeout, int(longest) + 60)},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_track_started": True,
        "task_queues": [Queue(stage_queue(name)) for name in catalog.stages] + [Queue(ROUTING_QUEUE)],  # type: ignore[no-untyped-call]
        "task_routes": (route_task,),
        "task_default_queue": ROUTING_QUEUE,
        "worker_hijack_root_logger": False,
    }


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str]:
    """stage.<name> goes to its own queue; every routing task goes to the routing queue."""
    if name.startswith(STAGE_PREFIX):
        return {"queue": name}
    return {"queue": ROUTING_QUEUE}


def _load_plugin(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
