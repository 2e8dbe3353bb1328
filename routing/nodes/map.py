"""Map: fan a node out over the items of a list field, gathered back in input order.

`pipeline.map` reads the list when the job reaches it and replaces itself with a chord: one
member per item (the mapped node compiled under `<path>[i]/`, so its stage tasks run on their own
queues), and `pipeline.map.gather` as the body on the routing queue. The Redis backend's native
chord support orders member results by their index, so lists come back in input order.

Each member starts from a lean envelope: the job's state plus the item, with no outputs, errors,
timings, trail or usage; gather folds each member's additions into the job as it was before the
fan-out. An empty list sets every collected field to [] and starts no task.
"""

from typing import Any

from celery import Celery, Task
from celery.canvas import Signature, chord
from celery.exceptions import Ignore, Retry

from contracts.envelope import Decision, Envelope, ErrorRecord, Usage
from contracts.names import ROUTING_QUEUE
from contracts.specs import MapNode
from routing.compile import Compiler, bind_input
from routing.errors import RoutingError
from routing.nodes.runtime import failed, state_value
from routing.registry import RUNTIME_HANDLERS, TASK_REGISTRARS

GATHER_TASK = "pipeline.map.gather"


def decide(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = MapNode.model_validate(raw)
    items = _items(job, node, path)
    base = job.with_decision(
        Decision(node=path, kind="map", choice="fan_out", detail={"over": node.over, "items": len(items)})
    )
    if not items:
        return _gathered(base, node, path, []).model_dump(mode="json")
    header = [_member(compiler, job, node, path, index, value) for index, value in enumerate(items)]
    kwargs = {"node": raw, "path": path, "base": base.model_dump(mode="json")}
    body = compiler.app.signature(GATHER_TASK, kwargs=kwargs, queue=ROUTING_QUEUE)
    return task.replace(chord(header, body))


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
    return bind_input(compiler.node(node.node, f"{path}[{index}]/"), lean.model_dump(mode="json"))


def gather(results: list[dict[str, Any]], raw: dict[str, Any], path: str, base: dict[str, Any]) -> dict[str, Any]:
    node = MapNode.model_validate(raw)
    job = Envelope.model_validate(base)
    members = [Envelope.model_validate(result) for result in results]
    for member in members:
        job = _absorb(job, member)
    items = list(job.state.get(node.over) or [])
    kept: list[Envelope] = []
    for index, member in enumerate(members):
        if member.failure is None:
            kept.append(member)
        elif node.on_error == "fail":
            return job.model_copy(update={"failure": member.failure}).model_dump(mode="json")
        else:
            job = job.with_decision(_dropped(path, index, items[index] if index < len(items) else None, member))
    return _gathered(job, node, path, kept, dropped=len(members) - len(kept)).model_dump(mode="json")


def _absorb(job: Envelope, member: Envelope) -> Envelope:
    """Add what one member did (outputs, errors, timings, decisions, usage) to the job."""
    usage = dict(job.usage)
    for stage, used in member.usage.items():
        usage[stage] = usage.get(stage, Usage()).plus(used)
    return job.model_copy(update={
        "outputs": {**job.outputs, **member.outputs},
        "errors": [*job.errors, *member.errors],
        "timings": [*job.timings, *member.timings],
        "trail": [*job.trail, *member.trail],
        "usage": usage,
    })


def _dropped(path: str, index: int, item: Any, member: Envelope) -> Decision:
    error = member.failure or ErrorRecord(node=path, error_type="Unknown", message="item failed")
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
    def gather_task(self: Task, results: list[dict[str, Any]], node: dict[str, Any], path: str,
                    base: dict[str, Any]) -> dict[str, Any]:
        try:
            return gather(results, node, path, base)
        except (Ignore, Retry):
            raise
        except Exception as error:
            return failed(Envelope.model_validate(base), path, error)


RUNTIME_HANDLERS["map"] = decide
TASK_REGISTRARS.append(register_gather)
