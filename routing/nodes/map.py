"""Map: fan a node out over the items of a list field, gathered back in input order.

`pipeline.map` reads the list when the job reaches it and replaces itself with a chord: one
member per item (the mapped node compiled under `<path>[i]/`, so its stage tasks run on their own
queues), and `pipeline.map.gather` as the body on the routing queue. The Redis backend's native
chord support orders member results by their index, so lists come back in input order.

Each member starts from a lean envelope: the job's state plus the item, with no outputs, errors,
timings, trail or usage; gather folds each member's additions into the job as it was before the
fan-out. An empty list sets every collected field to [] and starts no task.

A member whose task raises (killed at the hard time limit of `item_timeout` in a prefork worker)
fails the chord, and Celery calls the body's errback instead of the body: `pipeline.map.rescue`
sends the body anyway with the rest of the job (as parallel/ensemble do), and gather reads each
member's result or exception from the backend by its id. The raised item counts as a failed item.
"""

from typing import Any

from celery import Celery, Task
from celery.canvas import Signature, chain, chord, group
from celery.exceptions import Ignore, Retry

from contracts.envelope import Decision, Envelope, ErrorRecord
from contracts.names import ROUTING_QUEUE
from contracts.specs import MapNode
from routing.chords import limited, read_results, register_rescue, with_time_limits
from routing.compile import Compiler, bind_input
from routing.errors import RoutingError
from routing.nodes.runtime import failed, state_value
from routing.registry import RUNTIME_HANDLERS, TASK_REGISTRARS

GATHER_TASK = "pipeline.map.gather"
RESCUE_TASK = "pipeline.map.rescue"


def decide(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = MapNode.model_validate(raw)
    items = _items(job, node, path)
    base = job.with_decision(
        Decision(node=path, kind="map", choice="fan_out", detail={"over": node.over, "items": len(items)})
    )
    if not items:
        return _gathered(base, node, path, []).model_dump(mode="json")
    header = [_member(compiler, job, node, path, index, value) for index, value in enumerate(items)]
    ids = [sig.freeze().id for sig in header]
    kwargs = {"node": raw, "path": path, "base": base.model_dump(mode="json"), "ids": ids}
    body = compiler.app.signature(GATHER_TASK, kwargs=kwargs, queue=ROUTING_QUEUE)
    body.link_error(compiler.app.signature(RESCUE_TASK, queue=ROUTING_QUEUE))
    # in a chain, the rest of the job rides in the body's `chain` option, where the rescue finds it
    return task.replace(chain(chord(group(header), body)))


def _items(job: Envelope, node: MapNode, path: str) -> list[Any]:
    where = f"map '{path}'"
    value = state_value(job, node.over, where)
    if not isinstance(value, list):
        raise RoutingError(f"{where}: state field '{node.over}' must be a list, got {type(value).__name__}")
    if len(value) > node.max_fanout and node.overflow == "fail":
        raise RoutingError(f"{where}: {len(value)} items in '{node.over}' exceed max_fanout {node.max_fanout}")
    return value[: node.max_fanout]


def _member(compiler: Compiler, job: Envelope, node: MapNode, path: str, index: int, value: Any) -> Signature:
    lean = job.model_copy(
        update={"state": {**job.state, node.item: value}, "outputs": {}, "errors": [], "timings": [], "trail": [],
                "usage": {}}
    )
    canvas = compiler.node(limited(node.node, node.item_timeout), f"{path}[{index}]/")
    return with_time_limits(bind_input(canvas, lean.model_dump(mode="json")), node.item_timeout)


# a member's end: its envelope (which may carry a failure), or the error its task raised
Outcome = Envelope | ErrorRecord


def gather(results: list[Any], raw: dict[str, Any], path: str, base: dict[str, Any]) -> dict[str, Any]:
    node = MapNode.model_validate(raw)
    job = Envelope.model_validate(base)
    outcomes = [_outcome(path, index, result) for index, result in enumerate(results)]
    for outcome in outcomes:
        job = _absorb(job, outcome)
    failures = [(index, error) for index, error in enumerate(map(_failure, outcomes)) if error is not None]
    if failures and node.on_error == "fail":
        return job.model_copy(update={"failure": failures[0][1]}).model_dump(mode="json")
    items = list(job.state.get(node.over) or [])
    for index, error in failures:
        job = job.with_decision(_dropped(path, index, items[index] if index < len(items) else None, error))
    kept = [o for o in outcomes if isinstance(o, Envelope) and o.failure is None]
    return _gathered(job, node, path, kept, dropped=len(failures)).model_dump(mode="json")


def _outcome(path: str, index: int, result: Any) -> Outcome:
    if isinstance(result, dict) and "__error__" in result:  # read back from the backend by the rescue
        error = result["__error__"]
        kind = "timeout" if "TimeLimit" in error["type"] else "stage"
        return ErrorRecord(node=f"{path}[{index}]", kind=kind, error_type=error["type"], message=error["message"])
    return Envelope.model_validate(result)


def _failure(outcome: Outcome) -> ErrorRecord | None:
    return outcome if isinstance(outcome, ErrorRecord) else outcome.failure


def _absorb(job: Envelope, member: Outcome) -> Envelope:
    """Add what one member did (outputs, errors, timings, decisions, usage) to the job."""
    if isinstance(member, ErrorRecord):
        return job.with_error(member, fatal=False)  # its envelope died with its task
    return job.absorb(member)


def _dropped(path: str, index: int, item: Any, error: ErrorRecord) -> Decision:
    detail = {"index": index, "item": item, "node": error.node, "error": error.message}
    return Decision(node=path, kind="map", choice="drop", detail=detail)


def _gathered(job: Envelope, node: MapNode, path: str, kept: list[Envelope], dropped: int = 0) -> Envelope:
    lists = {target: [member.state.get(source) for member in kept] for source, target in node.collect.items()}
    summary = {"items": len(kept) + dropped, "kept": len(kept), "dropped": dropped}
    decision = Decision(node=path, kind="map", choice="gathered", detail=summary)
    return job.model_copy(
        update={"state": {**job.state, **lists}, "outputs": {**job.outputs, path: summary}}
    ).with_decision(decision)


def register_gather(app: Celery, compiler: Compiler) -> None:
    @app.task(name=GATHER_TASK, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def gather_task(self: Task, results: list[Any] | None, node: dict[str, Any], path: str,
                    base: dict[str, Any], ids: list[str] | None = None, rescued: str | None = None) -> dict[str, Any]:
        try:
            found = results if results is not None else _stored(self.app, ids or [])
            return gather(found, node, path, base)
        except (Ignore, Retry):
            raise
        except Exception as error:
            return failed(Envelope.model_validate(base), path, error)

    register_rescue(app, RESCUE_TASK, GATHER_TASK)


def _stored(app: Celery, ids: list[str]) -> list[Any]:
    """Every member's result from the backend, in order; an exception becomes an `__error__` value."""
    return read_results(app, {str(index): task_id for index, task_id in enumerate(ids)})


RUNTIME_HANDLERS["map"] = decide
TASK_REGISTRARS.append(register_gather)
