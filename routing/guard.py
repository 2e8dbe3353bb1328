"""Routing tasks run their decisions guarded: a decision that cannot be made is a value.

Like a stage error, the envelope gets an ErrorRecord of kind "routing" and its `failure` set; the
job ledger then ends the job as failed (at the job's top level; inside a fan-out member the fan-in
judges), instead of leaving it hanging.
"""

from collections.abc import Callable
from typing import Any, cast

from celery import Task
from celery.exceptions import Ignore, Retry

from contracts.envelope import Decision, Envelope, ErrorRecord, decisions_made
from contracts.names import ROUTING_QUEUE
from routing.compile import Compiler
from routing.kinds import Routing, RuntimeHandler
from workers.outcome import decisions


def routing_record(path: str, error: BaseException) -> ErrorRecord:
    return ErrorRecord(node=path, kind="routing", error_type=type(error).__name__, message=str(error))


def failed(job: Envelope, path: str, error: BaseException) -> dict[str, Any]:
    """The envelope with a fatal routing error, ready to return from a task."""
    return job.with_error(routing_record(path, error), fatal=True).model_dump(mode="json")


def guarded(handler: RuntimeHandler, task: Task, compiler: Compiler, envelope: dict[str, Any],
            node: dict[str, Any], path: str) -> Any:
    """Run a handler on a live envelope; a failed one passes through, an exception fails the job."""
    job = Envelope.model_validate(envelope)
    if job.failed:
        return envelope
    try:
        return handler(task, compiler, job, node, path)
    except (Ignore, Retry):
        raise  # how `task.replace(...)` and retries end a task: not errors
    except Exception as error:
        return failed(job, path, error)


def handed_on(routing: Routing, task: Task, out: Any) -> Any:
    """A routing task's envelope handed on; a job a decision left failed (outside a fan-out member) is
    closed by the ledger here instead of passed along."""
    if isinstance(out, dict) and out.get("failure") and not out.get("member_of"):
        return routing.ledger.hand_on(task, Envelope.model_validate(out), None)
    return out


class Telling:
    """A routing task as its handler sees it: the decisions the handler records (`Envelope.with_decision`)
    go to the job's event log before the canvas it chose is sent (`replace`) or its envelope handed on,
    so they come before what they started."""

    def __init__(self, routing: Routing, task: Task, envelope: dict[str, Any], made: list[Decision]) -> None:
        self._routing, self._task, self._made, self._told = routing, task, made, 0
        self._job_id, self._pipeline = str(envelope.get("job_id") or ""), str(envelope.get("pipeline") or "")

    def replace(self, sig: Any) -> Any:
        self.tell()
        return self._task.replace(sig)

    def tell(self) -> None:
        fresh = self._made[self._told:]
        if fresh and self._job_id:
            self._routing.ledger.events.append(self._job_id, decisions(self._job_id, self._pipeline, fresh))
            self._told += len(fresh)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def told(routing: Routing, task: Task, envelope: dict[str, Any], decide: Callable[[Task], Any]) -> Any:
    """`decide(task)` with the decisions it makes told (see Telling)."""
    with decisions_made() as made:
        teller = Telling(routing, task, envelope, made)
        out = decide(cast(Task, teller))
        teller.tell()
    return out


def register_routing_task(routing: Routing, name: str, handler: RuntimeHandler) -> None:
    """A task `name(envelope, node=..., path=...)` on the routing queue that runs `handler` guarded."""

    @routing.app.task(name=name, shared=False, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def route(self: Task, envelope: dict[str, Any], node: dict[str, Any], path: str) -> Any:
        out = told(routing, self, envelope, lambda task: guarded(handler, task, routing.compiler, envelope, node,
                                                                 path))
        return handed_on(routing, self, out)
