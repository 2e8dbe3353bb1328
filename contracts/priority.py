"""Job priorities: 0 (the default, lowest) to 9 (most urgent), on every stage message of the job.

Brokers disagree on direction: RabbitMQ serves higher numbers first (queues declared with
`x-max-priority`), kombu's Redis transport serves lower numbers first (one list per priority step,
BRPOP'd in step order). A job's priority is mapped to the broker's number here, once; every other
part of the job's messages inherits it (Celery's `task_inherit_parent_priority`).

PRIORITY_STEPS is kombu's Redis `priority_steps`: one Redis list per step and queue (`queue_lists`).
Whatever measures a queue on Redis (the monitor, the backlog check, autoscaler triggers) sums them.
"""

MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 0
PRIORITY_STEPS = list(range(MIN_PRIORITY, MAX_PRIORITY + 1))  # a list per priority: no two levels share one
REDIS_PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis transport: `<queue><sep><step>` (step 0: the queue itself)


def broker_priority(priority: int | None, redis_broker: bool) -> int:
    """Celery's message priority for a job priority (None: the default)."""
    level = DEFAULT_PRIORITY if priority is None else priority
    return MAX_PRIORITY - level if redis_broker else level


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue, most urgent first (Redis broker)."""
    return [queue if step == 0 else f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def priority_list(queue: str, priority: int | None) -> str:
    """The Redis list kombu keeps for `queue`'s messages of broker priority `priority` (None: the default)."""
    step = min(max(priority or 0, PRIORITY_STEPS[0]), PRIORITY_STEPS[-1])
    return queue_lists(queue)[step]
