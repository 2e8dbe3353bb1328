"""GET /healthz: Redis reachable, and how many workers consume each queue (asked of the workers, cached)."""

import threading
import time

from celery import Celery

from api.models import Health
from contracts.names import ROUTING_QUEUE, WEBHOOK_QUEUE, stage_queue
from monitor.queues import depth_reader
from workers.runtime import Runtime

CENSUS_SECONDS = 10.0  # how long one answer of the workers is reused (asking takes a broadcast round)
REPLY_SECONDS = 1.0


class Census:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.queues = [*map(stage_queue, runtime.catalog.stages), ROUTING_QUEUE, WEBHOOK_QUEUE]
        self.depths = depth_reader(runtime.settings.broker_url, runtime.settings.sentinel)
        self._lock = threading.Lock()
        self._taken = 0.0
        self._workers: dict[str, int] = {}

    def health(self) -> Health:
        redis_ok = _ping(self.runtime)
        if not redis_ok:
            return Health(redis=False, workers={})
        return Health(redis=True, workers=self.workers(), queues=self.depths(self.queues))

    def workers(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._taken > CENSUS_SECONDS:
                self._workers = consumers(self.runtime.app, self.queues)
                self._taken = time.monotonic()
            return dict(self._workers)


def consumers(app: Celery, queues: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(queues, 0)
    replies = app.control.inspect(timeout=REPLY_SECONDS).active_queues() or {}
    for consumed in replies.values():
        for queue in consumed or []:
            name = str(queue.get("name", ""))
            if name in counts:
                counts[name] += 1
    return counts


def _ping(runtime: Runtime) -> bool:
    try:
        return bool(runtime.ledger.jobs.client.ping())
    except Exception:
        return False
