"""Chord mechanics shared by every fan-out (parallel, ensemble, map).

A fan-out is `chord(group(members), body)` on the Redis backend's native chord support. Members
return envelopes (errors are values); a member that *raises* instead (its process killed at the
hard time limit) fails the chord, and the backend calls the body's errback instead of the body.
The errback resends the body with the rest of the job, and the body reads every member's result
or exception from the backend by the ids frozen at launch, so no job hangs or loses results.
"""

from typing import Any

from celery import Celery
from celery.canvas import Signature, _chain, group
from celery.result import AsyncResult

from contracts.names import ROUTING_QUEUE, STAGE_PREFIX
from contracts.specs import LMOverride, Node, SequenceNode, StageNode

HARD_LIMIT_GRACE = 2.0  # seconds between the soft limit (a recorded timeout) and the kill


def limited(member: Node, timeout: float | None) -> Node:
    """The member with `timeout` as the LM HTTP timeout of its stages (what bounds thread pools)."""
    if timeout is None:
        return member
    if isinstance(member, StageNode):
        lm = member.lm or LMOverride()
        return member.model_copy(update={"lm": lm if lm.timeout else lm.model_copy(update={"timeout": timeout})})
    if isinstance(member, SequenceNode):
        return member.model_copy(update={"steps": [limited(step, timeout) for step in member.steps]})
    return member


def with_time_limits(sig: Signature, timeout: float | None) -> Signature:
    """Celery soft and hard time limits on every stage task of a member canvas (prefork pools)."""
    if timeout is None:
        return sig
    if isinstance(sig, _chain | group):
        for inner in sig.tasks:
            with_time_limits(inner, timeout)
    elif str(sig.task or "").startswith(STAGE_PREFIX):
        sig.set(soft_time_limit=timeout, time_limit=timeout + HARD_LIMIT_GRACE)
    return sig


def read_results(app: Celery, ids: dict[str, str]) -> list[Any]:
    """Every member's result from the backend; an exception becomes an `__error__` value."""
    return [_stored(AsyncResult(task_id, app=app)) for task_id in ids.values()]


def _stored(result: AsyncResult) -> Any:
    if result.successful():
        return result.result
    error = result.result
    message = str(error) if isinstance(error, BaseException) else f"no result (state {result.state})"
    return {"__error__": {"type": type(error).__name__ if isinstance(error, BaseException) else result.state,
                          "message": message or type(error).__name__}}


def resend_body(app: Celery, body_task: str, request: Any, exc: BaseException) -> None:
    """Send the body task of a chord whose header raised, with the rest of the job attached.

    `request.options` is the body's own options dict: popping `chain` from it keeps Celery from
    marking the rest of the job failed after this errback returns.
    """
    options = request.options
    rest = options.pop("chain", None)
    kept = {k: v for k, v in options.items() if k not in ("link_error", "chain")}
    kwargs = {**request.kwargs, "rescued": f"{type(exc).__name__}: {exc}"[:500]}
    app.signature(body_task, args=(None,), kwargs=kwargs, **kept).apply_async(chain=rest)


def register_rescue(app: Celery, name: str, body_task: str) -> None:
    """The errback `name` that resends `body_task` when a member of its chord raised."""

    # bind=False and three arguments: Celery calls it in place with the failed body's request
    @app.task(name=name, queue=ROUTING_QUEUE)
    def rescue(request: Any, exc: BaseException, traceback: Any) -> None:
        resend_body(app, body_task, request, exc)
