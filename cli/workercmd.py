"""The one builder of a Celery worker's command line, used by `stagecoach up` (cli/stack.py), the test and
benchmark fleets (cli/fleet.py) and the deployment renderers (cli/compose.py, cli/k8s.py).

`argv()` is for subprocess (and a Kubernetes container's `command`), `text()` for a compose `command:`
string; both come from the same fields, so a worker started on this machine, in compose and in a cluster
consumes the same queues with the same pool.
"""

import shlex
from dataclasses import dataclass

from contracts.names import DEFAULT_QUEUE, ROUTING_QUEUE, WEBHOOK_QUEUE, service_name, stage_queue

APP = "workers.app"
ROUTING_QUEUES = (ROUTING_QUEUE, DEFAULT_QUEUE)  # the routing worker also serves clients that name no queue


@dataclass(frozen=True)
class Autoscale:
    """Celery's own pool autoscaling: between `low` and `high` pool slots (threads or processes)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high or self.high < 1:
            raise ValueError(f"autoscale {self.low}..{self.high}: expected 0 <= MIN <= MAX and MAX >= 1")

    @property
    def option(self) -> str:
        return f"{self.high},{self.low}"  # Celery's order: --autoscale=MAX,MIN


@dataclass(frozen=True)
class WorkerCommand:
    """`celery -A workers.app worker` serving `queues`, named `<name>@<host>` so each replica has its own name."""

    name: str
    queues: tuple[str, ...]
    pool: str = "threads"
    concurrency: int = 4
    autoscale: Autoscale | None = None
    host: str = "%h"
    loglevel: str = "INFO"
    logfile: str | None = None
    program: str = "celery"
    extra: tuple[str, ...] = ()

    @property
    def node(self) -> str:
        return f"{self.name}@{self.host}"

    def argv(self) -> list[str]:
        # no gossip or mingle: Stagecoach's workers never ask each other anything, and both cost every
        # worker a round of broadcast traffic per peer at start and while running
        args = [self.program, "-A", APP, "worker", "-Q", ",".join(self.queues), "-n", self.node,
                "--pool", self.pool, *self._pool_size(), "--loglevel", self.loglevel,
                "--without-gossip", "--without-mingle"]
        if self.logfile is not None:
            args += ["--logfile", self.logfile]
        return args + list(self.extra)

    def text(self) -> str:
        return shlex.join(self.argv())

    def _pool_size(self) -> list[str]:
        if self.autoscale is not None:
            return ["--autoscale", self.autoscale.option]
        return ["--concurrency", str(self.concurrency)]


def stage_worker_name(ref: str, index: int = 1) -> str:
    """`stage-<ref>` for the first worker of a stage queue, `stage-<ref>-2`, `-3`... for others; a
    versioned ref `answer@1` gives `stage-answer-v1` (`@` separates Celery's node name from its host)."""
    base = f"stage-{service_name(ref)}"
    return base if index == 1 else f"{base}-{index}"


def stage_worker(ref: str, index: int = 1, *, pool: str = "threads", concurrency: int = 4,
                 autoscale: Autoscale | None = None, program: str = "celery") -> WorkerCommand:
    """The worker of one stage queue (a stage ref: `answer` or `answer@1`)."""
    return WorkerCommand(stage_worker_name(ref, index), (stage_queue(ref),), pool=pool, concurrency=concurrency,
                         autoscale=autoscale, program=program)


def routing_worker(*, pool: str = "threads", concurrency: int = 8, program: str = "celery") -> WorkerCommand:
    return WorkerCommand("routing", ROUTING_QUEUES, pool=pool, concurrency=concurrency, program=program)


def webhook_worker(*, pool: str = "threads", concurrency: int = 8, program: str = "celery") -> WorkerCommand:
    """The worker of completion webhooks (I/O-bound: waiting on receivers), never a stage worker."""
    return WorkerCommand("webhook", (WEBHOOK_QUEUE,), pool=pool, concurrency=concurrency, program=program)
