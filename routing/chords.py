"""The one fan-out mechanism, shared by parallel, ensemble and map.

A fan-out replaces the routing task that reached it with `chord(group(members), body)` on the
Redis backend's native chord support. Each member is a node compiled under its own path and
started from a lean envelope (the job's state, nothing else); the body runs on the routing queue,
turns each member's result into a `Member` and hands them to the kind's `fold`, which merges
them into the job as it was before the fan-out.

Members return envelopes (errors are values). A member that *raises* instead (its process killed
at the hard time limit) fails the chord, and the backend calls the body's errback instead of the
body: the rescue task resends the body with the rest of the job, and the body reads every member's
result or exception from the backend by the ids frozen at launch, so no job hangs or loses results.

Time bound: a fan-out's timeout reaches every stage of every member at any depth (`limited`): it
becomes each stage call's LM HTTP timeout (what bounds thread pools) and its Celery soft/hard time
limit (enforced by prefork and green pools), including stages that a runtime node inside the
member compiles later and stages of named sub-pipelines.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.canvas import Signature, chain, chord, group
from celery.exceptions import Ignore, Retry
from celery.result import AsyncResult

from contracts.catalog import Catalog
from contracts.envelope import Envelope, ErrorRecord
from contracts.names import ROUTING_QUEUE, rescue_task
from contracts.specs import AnyNode, LMOverride, StageNode, SubPipelineNode, map_children
from routing.compile import Compiler, bind_input
from routing.errors import RoutingError
from routing.guard import failed, handed_on, told
from routing.kinds import Routing


@dataclass(frozen=True)
class MemberCall:
    """One member to launch: its name in the fan-in, its node path, the node and its envelope."""

    name: str
    path: str
    node: AnyNode
    prefix: str
    envelope: Envelope


@dataclass(frozen=True)
class Member:
    """One member's end: its envelope (which may carry a failure), or the error its task raised."""

    name: str
    envelope: Envelope | None
    error: ErrorRecord | None

    @property
    def ok(self) -> bool:
        return self.error is None


# fold(node_dict, path, base, members): the job after the fan-out, from the job before it
Fold = Callable[[dict[str, Any], str, Envelope, list[Member]], Envelope]


# ---- time bounds -----------------------------------------------------------------------------


def limited(catalog: Catalog, node: AnyNode, timeout: float | None) -> AnyNode:
    """`node` with `timeout` bounding every stage call below it (where the spec set no bound)."""
    if timeout is None:
        return node
    if isinstance(node, StageNode):
        lm = node.lm or LMOverride()
        return node.model_copy(update={
            "lm": lm if lm.timeout else lm.model_copy(update={"timeout": timeout}),
            "time_limit": node.time_limit or timeout,
        })
    if isinstance(node, SubPipelineNode) and node.pipeline is not None:
        # a named sub-pipeline is inlined so its stages carry the bound; its path stays the same
        inline = SubPipelineNode(id=node.id or node.pipeline, node=catalog.pipeline(node.pipeline).root)
        return limited(catalog, inline, timeout)
    return map_children(node, lambda child: limited(catalog, child, timeout))


# ---- fan-out ---------------------------------------------------------------------------------


def launch(task: Task, compiler: Compiler, calls: list[MemberCall], timeout: float | None, body_task: str,
           kwargs: dict[str, Any]) -> Any:
    """Replace `task` with the chord of members and the fan-in body `body_task`."""
    header: list[Signature] = []
    members: list[list[str]] = []
    for call in calls:
        canvas = compiler.node(limited(compiler.catalog, call.node, timeout), call.prefix)
        sig = bind_input(canvas, call.envelope.model_dump(mode="json"))
        members.append([call.name, call.path, sig.freeze().id])
        header.append(sig)
    body = compiler.app.signature(body_task, kwargs={**kwargs, "members": members}, queue=ROUTING_QUEUE)
    body.link_error(compiler.app.signature(rescue_task(body_task), queue=ROUTING_QUEUE))
    # wrapped in a chain so `replace` appends the rest of the job after the chord, where it rides in
    # the body's `chain` option; appended to a bare chord it would become part of the body, and the
    # errback linked to the body alone would never be called
    return task.replace(chain(chord(group(header), body)))


# ---- fan-in ----------------------------------------------------------------------------------


def member_outcome(name: str, path: str, result: Any) -> Member:
    """A member's result as a Member; an `__error__` value (read back after a raise) as its error."""
    if isinstance(result, dict) and "__error__" in result:
        error = result["__error__"]
        kind = "timeout" if "TimeLimit" in error["type"] else "stage"
        record = ErrorRecord(node=path, kind=kind, error_type=error["type"], message=error["message"])
        return Member(name, None, record)
    envelope = Envelope.model_validate(result)
    return Member(name, envelope, envelope.failure)


def absorb(job: Envelope, member: Member) -> Envelope:
    """Add what one member did (outputs, errors, timings, decisions, usage) to the job."""
    if member.envelope is None:
        return job.with_error(member.error, fatal=False) if member.error else job
    return job.absorb(member.envelope)


def all_failed(kind: str, path: str, causes: list[tuple[str, str]]) -> ErrorRecord:
    """The job's failure when no member succeeded: names each member and its error."""
    listed = "; ".join(f"{name}: {message}" for name, message in causes)
    return ErrorRecord(node=path, kind="pipeline", error_type="PipelineError",
                       message=f"all {len(causes)} members of {kind} '{path}' failed: {listed}")


def read_results(app: Celery, task_ids: list[str]) -> list[Any]:
    """Every member's result from the backend; an exception becomes an `__error__` value."""
    return [_stored(AsyncResult(task_id, app=app)) for task_id in task_ids]


def _stored(result: AsyncResult) -> Any:
    if result.successful():
        return result.result
    error = result.result
    message = str(error) if isinstance(error, BaseException) else f"no result (state {result.state})"
    return {"__error__": {"type": type(error).__name__ if isinstance(error, BaseException) else result.state,
                          "message": message or type(error).__name__}}


def fold_results(fold: Fold, node: dict[str, Any], path: str, base: Envelope, members: list[list[str]],
                 results: list[Any]) -> Envelope:
    """Decode each member's result in launch order and fold them into the job."""
    if len(results) != len(members):
        raise RoutingError(f"fan-out '{path}': {len(results)} results for {len(members)} members")
    outcomes = [member_outcome(name, member_path, result)
                for (name, member_path, _), result in zip(members, results, strict=True)]
    return fold(node, path, base, outcomes)


def register_fanin(routing: Routing, body_task: str, fold: Fold) -> None:
    """The chord body `body_task` folding members with `fold`, and its rescue errback."""
    app = routing.app

    @app.task(name=body_task, shared=False, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def fan_in(self: Task, results: list[Any] | None, node: dict[str, Any], path: str, base: dict[str, Any],
               members: list[list[str]], rescued: str | None = None) -> Any:
        job = Envelope.model_validate(base)

        def gather(task: Task) -> dict[str, Any]:
            try:
                found = results if results is not None else read_results(task.app, [m[2] for m in members])
                return fold_results(fold, node, path, job, members, found).model_dump(mode="json")
            except (Ignore, Retry):
                raise
            except Exception as error:
                return failed(job, path, error)

        return handed_on(routing, self, told(routing, self, base, gather))

    # bind=False and three arguments: Celery calls it in place with the failed body's request
    @app.task(name=rescue_task(body_task), shared=False, queue=ROUTING_QUEUE)
    def rescue(request: Any, exc: BaseException, traceback: Any) -> None:
        resend_body(app, body_task, request, exc)


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
