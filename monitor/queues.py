"""Messages waiting per queue, on either broker: on Redis the LLENs of the queue's lists (one per priority
step, contracts/priority.py); on RabbitMQ (amqp://) the message count a passive queue declare reports."""

from collections.abc import Callable
from contextlib import suppress

import redis

from contracts.connections import SENTINEL_SCHEME, SentinelSettings, redis_client, scheme_of
from contracts.priority import PRIORITY_STEPS, queue_lists

Depths = Callable[[list[str]], dict[str, int]]


def depth_reader(broker_url: str, sentinel: SentinelSettings | None = None) -> Depths:
    if scheme_of(broker_url) in ("redis", "rediss", SENTINEL_SCHEME):
        return _redis_depths(redis_client(broker_url, sentinel))
    return _amqp_depths(broker_url)


def _redis_depths(client: redis.Redis) -> Depths:
    def read(queues: list[str]) -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for key in queue_lists(queue):
                pipe.llen(key)
        counts = iter(pipe.execute())
        return {queue: sum(int(next(counts)) for _ in PRIORITY_STEPS) for queue in queues}

    return read


def _amqp_depths(url: str) -> Depths:
    from kombu import Connection  # type: ignore[attr-defined]

    def read(queues: list[str]) -> dict[str, int]:
        with Connection(url, connect_timeout=5) as connection:  # type: ignore[no-untyped-call]
            return {queue: _amqp_count(connection, queue) for queue in queues}

    return read


def _amqp_count(connection: object, queue: str) -> int:
    """A queue nobody declared yet counts 0 (the broker closes the channel of a failed passive declare,
    so each queue gets a channel of its own)."""
    channel = connection.channel()  # type: ignore[attr-defined]
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except Exception:  # amqp.exceptions.NotFound (404): no such queue yet
        return 0
    finally:
        with suppress(Exception):  # already closed by the broker after a 404
            channel.close()
