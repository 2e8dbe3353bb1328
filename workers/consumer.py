"""The worker's consumer: every message is screened before Celery's strategies see it.

Celery's own handler survives some bad messages (undecodable bodies, unknown tasks) but not
others: a body that is `{...}` instead of `[args, kwargs, embed]`, headers without `id`, a bad
`eta` or arguments that do not fit the task raise out of the consumer and crash or crash-loop the
worker (the unacked message comes back after every restart). Here each message is checked against
Celery's protocol 2 and the task's signature first; an unfit one is dead-lettered, its waiters get
a failed result, and it is acknowledged so it never comes back. Installed with the
`worker_consumer` setting (see workers.factory).
"""

import contextlib
import inspect
import logging
import re
import ssl
from datetime import datetime
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from kombu.connection import Connection
from kombu.message import Message

from contracts.connections import SENTINEL_SCHEME, redis_client, scheme_of
from contracts.deadletters import DeadLetter
from contracts.fields import unencodable_problems, utf8_json
from contracts.names import STAGE_PREFIX
from workers.deadletter import MAX_RAW_BYTES, DeadLetterStore, quarantine
from workers.ledger import Ledger
from workers.settings import Settings
from workers.transport import Unfit, screening_transport

log = logging.getLogger(__name__)
JSON = "application/json"


class PoisonProofConsumer(Consumer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings()
        self.max_message_bytes = settings.max_message_bytes
        self.max_envelope_bytes = settings.max_envelope_bytes
        self.dead_letters = DeadLetterStore(redis_client(self.app.conf.result_backend, settings.sentinel),
                                            settings.dead_letter_max)
        self.ledger = Ledger.from_settings(self.app, settings)

    # --- the connection: kombu's Redis (or Sentinel) transport with raw screening ----------------

    def connection_for_read(self, heartbeat: float | None = None) -> Connection:
        url = str(self.app.conf.broker_read_url or self.app.conf.broker_url)
        scheme = scheme_of(url)
        if scheme not in ("redis", "rediss", SENTINEL_SCHEME):
            return super().connection_for_read(heartbeat)  # type: ignore[no-any-return]
        transport = screening_transport(self._quarantine, self.max_message_bytes, sentinel=scheme == SENTINEL_SCHEME)
        options: dict[str, Any] = {"transport": transport}
        # our transport replaces kombu's 'rediss' alias, so TLS is switched on here; the URL's own
        # ssl_* query options (ssl_cert_reqs, ssl_ca_certs) take precedence over this default
        if scheme == "rediss":
            options["ssl"] = self.app.conf.broker_use_ssl or {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        return self.ensure_connected(self.app.connection_for_read(heartbeat=heartbeat, **options))  # type: ignore[no-any-return]

    def _quarantine(self, letter: DeadLetter) -> None:
        quarantine(self.ledger, self.dead_letters, letter, self.hostname)

    # --- messages: screened before Celery's handler, and anything it raises is contained ---------

    def create_task_handler(self, promise: Any = None) -> Any:
        inner = super().create_task_handler() if promise is None else super().create_task_handler(promise)

        def on_task_received(message: Message) -> None:
            try:
                screen_message(message, self.app, self.max_message_bytes, self.max_envelope_bytes)
            except Unfit as problem:
                return self._reject(message, str(problem))
            try:
                inner(message)
            except Exception as error:  # whatever Celery's handler did not expect must not kill us
                log.exception("task handler raised on a message")
                self._reject(message, f"worker could not accept the message ({type(error).__name__}: {error})")
            return None

        return on_task_received

    def _reject(self, message: Message, reason: str) -> None:
        self._quarantine(letter_of(message, reason))
        if not message.acknowledged:
            with contextlib.suppress(Exception):
                message.ack()  # type: ignore[no-untyped-call]

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._quarantine(letter_of(message, f"body does not decode ({exc})"))
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._quarantine(letter_of(message, "not a Celery task message"))
        super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._quarantine(letter_of(message, f"invalid task message ({exc})"))
        super().on_invalid_task(body, message, exc)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        task = (message.headers or {}).get("task")
        letter = letter_of(message, f"no task named {task!r} is registered in this worker")
        # its job ends as dead-lettered first; Celery's handler below then fails the task with NotRegistered
        self._quarantine(letter)
        super().on_unknown_task(body, message, exc)


def letter_of(message: Message, reason: str) -> DeadLetter:
    headers = message.headers if isinstance(message.headers, dict) else {}
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    found = {key: headers.get(name) for key, name in (("task", "task"), ("task_id", "id"), ("root_id", "root_id"))}
    names = {key: value for key, value in found.items() if isinstance(value, str)}
    return DeadLetter.of(reason, _raw_bytes(message), str(info.get("routing_key") or ""), MAX_RAW_BYTES, names)


def _raw_bytes(message: Message) -> bytes:
    import json

    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return json.dumps(raw).encode()
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()


# --- protocol 2 checks ---------------------------------------------------------------------------

def screen_message(message: Message, app: Celery, max_bytes: int, max_envelope_bytes: int | None = None) -> None:
    """Raise Unfit when a message is not a JSON Celery protocol-2 task message that fits its task (a stage
    task's message also within STAGECOACH_MAX_ENVELOPE_BYTES: what a stage sends its LM)."""
    if message.content_type != JSON:
        raise Unfit(f"content type {message.content_type!r} refused: workers accept {JSON} only")
    body = message.body
    if body is not None and len(body) > max_bytes:
        raise Unfit(f"message body of {len(body)} bytes exceeds STAGECOACH_MAX_MESSAGE_BYTES ({max_bytes})")
    headers = message.headers
    if not isinstance(headers, dict):
        raise Unfit("message headers are not an object")
    _check_headers(headers)
    if (max_envelope_bytes is not None and body is not None and str(headers["task"]).startswith(STAGE_PREFIX)
            and len(body) > max_envelope_bytes):
        raise Unfit(f"stage message of {len(body)} bytes exceeds STAGECOACH_MAX_ENVELOPE_BYTES ({max_envelope_bytes})")
    args, kwargs = _check_body(message)
    if str(headers["task"]).startswith(STAGE_PREFIX):
        _check_text(body, args, kwargs)
    task = app.tasks.get(headers["task"])
    if task is not None:
        _check_arguments(headers["task"], task, args, kwargs)


# a JSON escape of a UTF-16 surrogate: a lone one decodes to text no UTF-8 writer takes (a pair is fine)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(body: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """A stage message whose envelope holds text UTF-8 cannot encode (a lone surrogate) could not be
    checkpointed, stored or told: refused here, naming where. The raw bytes are searched first (cheap)."""
    if isinstance(body, bytes) and not _SURROGATE_ESCAPE.search(body):
        return
    if utf8_json([args, kwargs]):
        return
    where = "; ".join(str(p) for p in unencodable_problems({"args": args, "kwargs": kwargs})[:3])
    raise Unfit(f"the message holds text UTF-8 cannot encode: {where}")


def _check_headers(headers: dict[str, Any]) -> None:
    for name in ("task", "id"):
        if not isinstance(headers.get(name), str) or not headers[name]:
            raise Unfit(f"header '{name}' is missing or not a string (a Celery task message names its task and id)")
    for name in ("root_id", "parent_id", "group", "argsrepr", "kwargsrepr"):
        if not isinstance(headers.get(name), str | None):
            raise Unfit(f"header '{name}' is not a string")
    if not isinstance(headers.get("retries", 0), int | None):
        raise Unfit("header 'retries' is not an integer")
    for name in ("eta", "expires"):
        _check_time(name, headers.get(name))
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, list | tuple) and len(limits) == 2
                                   and all(isinstance(x, int | float | None) for x in limits)):
        raise Unfit("header 'timelimit' is not [hard, soft] seconds")


def _check_time(name: str, value: Any) -> None:
    if value is None or isinstance(value, int | float):
        return
    try:
        datetime.fromisoformat(str(value))
    except ValueError:
        raise Unfit(f"header '{name}' is not an ISO 8601 time: {str(value)[:60]!r}") from None


def _check_body(message: Message) -> tuple[list[Any], dict[str, Any]]:
    try:
        body = message.decode()  # type: ignore[no-untyped-call]
    except Exception as error:  # kombu wraps what the JSON decoder raised in a DecodeError
        if "recursion" in str(error):
            raise Unfit("body is nested too deeply to decode") from None
        raise Unfit(f"body does not decode as JSON ({type(error).__name__}: {error})") from None
    if not (isinstance(body, list) and len(body) == 3):
        shape = f"a list of {len(body)}" if isinstance(body, list) else f"a JSON {type(body).__name__}"
        raise Unfit(f"body is {shape}, not [args, kwargs, embed] (Celery message protocol 2)")
    args, kwargs, embed = body
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict | None):
        raise Unfit("body is not [args (list), kwargs (object), embed (object)]")
    _check_embed(embed or {})
    return args, kwargs


def _check_embed(embed: dict[str, Any]) -> None:
    for name in ("callbacks", "errbacks", "chain"):
        value = embed.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise Unfit(f"embed '{name}' is not a list of task signatures")
    if not isinstance(embed.get("chord"), dict | None):
        raise Unfit("embed 'chord' is not a task signature")


def _check_arguments(name: str, task: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise Unfit(f"arguments do not fit {name}{signature}: {error}") from None
