"""A Redis transport (plain or Sentinel) whose consumer screens every raw message before kombu builds a
Message of it.

kombu's Redis channel pops a message (BRPOP) and parses it in one step; a payload that is not
JSON, not an object, lacks `properties`, or whose body does not decode raises out of the
consumer and kills the worker (the message is already gone from the queue). Here each popped item
is screened first: a bad one is handed to `quarantine` (dead letter + failed result) and the
consumer goes on. Screening is the only change; everything else is kombu's Redis transport.
"""

import json
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from contracts.deadletters import DeadLetter
from workers.deadletter import MAX_RAW_BYTES

Quarantine = Callable[[DeadLetter], None]
log = logging.getLogger(__name__)


class Unfit(ValueError):
    """A raw message kombu cannot turn into a Message; the text says why."""


def screen_raw(item: bytes, queue: str, max_bytes: int, decode_body: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """The parsed payload of a popped item, or Unfit naming the problem."""
    if len(item) > max_bytes:
        raise Unfit(f"message of {len(item)} bytes exceeds STAGECOACH_MAX_MESSAGE_BYTES ({max_bytes})")
    try:
        payload = json.loads(item.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise Unfit(f"message is not UTF-8 text ({error})") from None
    except (ValueError, RecursionError) as error:
        raise Unfit(f"message is not JSON ({error})") from None
    if not isinstance(payload, dict):
        raise Unfit(f"message is a JSON {type(payload).__name__}, not a message object with body, headers, properties")
    _check_envelope(payload, queue, decode_body)
    return payload


def _check_envelope(payload: dict[str, Any], queue: str, decode_body: Callable[[Any, Any], Any]) -> None:
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        raise Unfit("message has no 'properties' object")
    if not isinstance(properties.get("delivery_tag"), str):
        raise Unfit("message 'properties.delivery_tag' is missing or not a string")
    if not isinstance(payload.get("headers"), dict | None):
        raise Unfit("message 'headers' is not an object")
    info = properties.setdefault("delivery_info", {})  # kombu needs both to ack, reject and restore
    if not isinstance(info, dict):
        raise Unfit("message 'properties.delivery_info' is not an object")
    info.setdefault("exchange", "")
    info.setdefault("routing_key", queue)
    body = payload.get("body")
    if body and not isinstance(body, str):
        raise Unfit(f"message 'body' is a JSON {type(body).__name__}, not an encoded string")
    try:
        decode_body(body, properties.get("body_encoding"))
    except Exception as error:
        raise Unfit(f"message body does not decode as {properties.get('body_encoding')!r} ({error})") from None


def named(payload: Any) -> dict[str, str]:
    """The task name, task id and root id a (possibly broken) payload names, when it names them."""
    headers = payload.get("headers") if isinstance(payload, dict) else None
    if not isinstance(headers, dict):
        return {}
    found = {"task": headers.get("task"), "task_id": headers.get("id"), "root_id": headers.get("root_id")}
    return {key: value for key, value in found.items() if isinstance(value, str) and value}


def _payload_of(item: bytes) -> Any:
    try:
        return json.loads(item)
    except (ValueError, RecursionError):
        return None


class SurvivingQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's QoS, except that acking, rejecting or handing back messages on a channel that a Redis
    restart already closed is logged instead of raised: it killed workers with `AttributeError:
    'NoneType' object has no attribute 'hostname'` (or `'client'`). Such messages stay in Redis's
    unacked set; when the visibility timeout hands them back, their claims drop them or let them
    finish, and the watchdog covers the time in between."""

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]
        except AttributeError as error:
            log.warning("cannot ack %s on a closed channel (%s); the visibility timeout will hand it back",
                        delivery_tag, error)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        except AttributeError as error:
            log.warning("cannot reject %s on a closed channel (%s)", delivery_tag, error)

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except Exception as error:
            log.warning("could not restore unacked messages now (%s: %s); the visibility timeout will",
                        type(error).__name__, error)


class ScreeningChannel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = SurvivingQoS
    quarantine: Quarantine | None = None
    max_message_bytes: int = 16 * 1024 * 1024

    # kombu's `_brpop_read` with the item screened before it is parsed and delivered
    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next iteration
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = (dest.decode() if isinstance(dest, bytes) else str(dest)).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._deliver_screened(dest, item)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            getattr(self, "_flush_brpop_reauth", lambda: None)()

    def _deliver_screened(self, queue: str, item: bytes) -> None:
        try:
            payload = screen_raw(item, queue, self.max_message_bytes, self.decode_body)
        except Unfit as problem:
            letter = DeadLetter.of(str(problem), item, queue, MAX_RAW_BYTES, named(_payload_of(item)))
            if self.quarantine is not None:
                self.quarantine(letter)
            return
        self.connection._deliver(payload, queue)


def screening_transport(quarantine: Quarantine, max_message_bytes: int,
                        sentinel: bool = False) -> type[kombu_redis.Transport]:
    """kombu's Redis transport with a channel that hands unfit messages to `quarantine`; `sentinel`: kombu's
    Sentinel transport (`sentinel://` URLs: the channel asks the sentinels for the master), screened the same."""
    base_channel, base_transport, name = ((kombu_redis.SentinelChannel, kombu_redis.SentinelTransport, "sentinel")
                                          if sentinel else (kombu_redis.Channel, kombu_redis.Transport, "redis"))
    # the screening overrides come first; the Sentinel channel's pool (master_for) comes from its own class
    channel = type("ScreeningChannel", (ScreeningChannel, base_channel),
                   {"quarantine": staticmethod(quarantine), "max_message_bytes": max_message_bytes})
    # `__json__`: kombu's JSON encoder calls it, so the connection's info (in `celery inspect stats` and
    # Flower's worker pages) names the transport instead of failing on a class object
    return type("ScreeningTransport", (base_transport,),
                {"Channel": channel, "__json__": classmethod(lambda cls: f"{name} (screening)")})
