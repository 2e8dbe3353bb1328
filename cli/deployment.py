"""What every deployment renderer (compose: cli/compose.py, Kubernetes: cli/k8s.py) deploys, walked once
from the catalog: the routing worker, the webhook worker and one worker per stage queue (versioned stages
too), each with its command from the one worker-command builder, plus the service commands and ports they share. The
renderers differ only in the format they write.
"""

import math
from dataclasses import dataclass

from cli.workercmd import WorkerCommand, routing_worker, stage_worker, webhook_worker
from contracts.catalog import Catalog
from contracts.names import service_name
from contracts.specs import Limits, ScaleSpec, StageSpec
from workers.factory import longest_hard_limit
from workers.settings import Settings

MONITOR_PORT = 8095
API_PORT = 8000
FLOWER_PORT = 5555
LM_PORT = 8090
DATA_DIR = "/data"  # where a container finds data that stages read (the HotPotQA corpus), mounted read-only
HOTPOTQA_FILE = "hotpotqa_dev_hard_200.jsonl"
# after a worker's last call ends: acks, result writes, closing its connections
SHUTDOWN_MARGIN_SECONDS = 30

FLOWER_COMMAND = f"celery -A workers.app flower --port={FLOWER_PORT}"
MONITOR_COMMAND = "stagecoach monitor"
API_COMMAND = "stagecoach api"
WATCHDOG_COMMAND = "stagecoach watchdog"
LM_COMMAND = f"python -m workers.local_lm --host 0.0.0.0 --port {LM_PORT}"


@dataclass(frozen=True)
class WorkerService:
    """One worker deployment: `worker-<ref>` (`worker-answer-v1` for `answer@1`) or `routing`."""

    name: str
    command: WorkerCommand
    spec: StageSpec | None = None  # None: the routing worker
    hard_limit: float = 0.0  # seconds the longest task it runs may take, kill grace included

    @property
    def scale(self) -> ScaleSpec:
        return self.spec.scale if self.spec is not None else ScaleSpec()

    @property
    def queue(self) -> str:
        return self.command.queues[0]

    @property
    def grace_seconds(self) -> int:
        """How long a stop may take: the running call finishes (or hits its own limit), then the margin."""
        return math.ceil(self.hard_limit) + SHUTDOWN_MARGIN_SECONDS


ROUTING_CONCURRENCY = 8  # routing tasks only compile and send: light, many at once
WEBHOOK_CONCURRENCY = 8  # deliveries wait on receivers: I/O-bound
WEBHOOK_LIMIT = 60.0  # seconds a delivery may take, beyond its own timeout (STAGECOACH_WEBHOOK_TIMEOUT)


def worker_services(catalog: Catalog, settings: Settings) -> list[WorkerService]:
    """The routing worker, the webhook worker, then one worker per stage ref in name order (pool and
    concurrency: the settings')."""
    longest = longest_hard_limit(settings, catalog)
    services = [WorkerService("routing", routing_worker(concurrency=ROUTING_CONCURRENCY), None, longest),
                WorkerService("webhook", webhook_worker(concurrency=WEBHOOK_CONCURRENCY), None, WEBHOOK_LIMIT)]
    for ref in sorted(catalog.stages):
        spec = catalog.stages[ref]
        command = stage_worker(ref, pool=settings.pool, concurrency=settings.concurrency)
        hard = Limits.stage(spec, settings.stage_time_limit).hard
        services.append(WorkerService(f"worker-{service_name(ref)}", command, spec, hard))
    return services
