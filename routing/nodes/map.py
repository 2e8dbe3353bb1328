"""Map: fan a node out over the items of a list field, gathered back in input order.

`pipeline.map` reads the list when the job reaches it and launches the fan-out
(`routing.chords.launch`): one member per item, the mapped node compiled under `<path>[i]/` and
started from the job's state plus the item; `pipeline.map.gather` is the chord body. The Redis
backend's native chord support orders member results by their index, so lists come back in input
order. An empty list sets every collected field to [] and starts no task. An item whose task
raised (killed at the hard limit of `item_timeout`) counts as a failed item, as one whose stage
failed does; `on_error` says whether that fails the job or drops the item.
"""

from typing import Any

from celery import Task

from contracts.envelope import Decision, Envelope, ErrorRecord
from contracts.names import MAP_GATHER_TASK
from contracts.specs import MapNode
from routing.chords import Member, MemberCall, absorb, launch, register_fanin
from routing.compile import Compiler
from routing.errors import RoutingError
from routing.kinds import NodeKind, Routing
from routing.nodes.runtime import state_value


def decide(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = MapNode.model_validate(raw)
    items = _items(job, node, path)
    base = job.with_decision(
        Decision(node=path, kind="map", choice="fan_out", detail={"over": node.over, "items": len(items)})
    )
    if not items:
        return _gathered(base, node, path, []).model_dump(mode="json")
    calls = [MemberCall(str(index), f"{path}[{index}]", node.node, f"{path}[{index}]/",
                        job.lean(path, {node.item: value}))
             for index, value in enumerate(items)]
    kwargs = {"node": raw, "path": path, "base": base.model_dump(mode="json")}
    return launch(task, compiler, calls, node.item_timeout, MAP_GATHER_TASK, kwargs)


def _items(job: Envelope, node: MapNode, path: str) -> list[Any]:
    where = f"map '{path}'"
    value = state_value(job, node.over, where)
    if not isinstance(value, list):
        raise RoutingError(f"{where}: state field '{node.over}' must be a list, got {type(value).__name__}")
    if len(value) > node.max_fanout and node.overflow == "fail":
        raise RoutingError(f"{where}: {len(value)} items in '{node.over}' exceed max_fanout {node.max_fanout}")
    return value[: node.max_fanout]


def gather(raw: dict[str, Any], path: str, base: Envelope, members: list[Member]) -> Envelope:
    """Fold every item into the job; collect the kept items' fields into lists, in input order."""
    node = MapNode.model_validate(raw)
    job = base
    for member in members:
        job = absorb(job, member)
    failures = [(index, m.error) for index, m in enumerate(members) if m.error is not None]
    if failures and node.on_error == "fail":
        return job.model_copy(update={"failure": failures[0][1]})
    items = list(job.state.get(node.over) or [])
    for index, error in failures:
        job = job.with_decision(_dropped(path, index, items[index] if index < len(items) else None, error))
    kept = [m.envelope for m in members if m.ok and m.envelope is not None]
    return _gathered(job, node, path, kept, dropped=len(failures))


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


def register_gather(routing: Routing) -> None:
    register_fanin(routing, MAP_GATHER_TASK, gather)


KIND = NodeKind(decide=decide, tasks=(register_gather,))
