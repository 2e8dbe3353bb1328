"""Parallel groups and ensembles: members run at once on the same state, then merge or aggregate.

Both kinds are launched and folded here; an ensemble differs only in how it finishes
(`routing.nodes.ensemble.finish_ensemble`). For a parallel group, a merger combines the members'
state changes.

`pipeline.parallel` runs when the job reaches the node and launches the fan-out
(`routing.chords.launch`): each member is compiled under `<path>/<member>/` so its stages run on
their own queues at once; `pipeline.fanin` folds the members back into the job and merges. The
node is launched at run time, not compiled into the job's canvas up front, because the fan-in
needs the envelope as it was before the fan-out and the task id of every member (frozen there,
one routing hop).

Partial failure: a member whose stage fails returns its envelope with `failure` set (errors are
values), so the failure is recorded while the rest are merged; when every member fails, the job
fails naming each member's error. `member_timeout` bounds every stage call of a member (see
`routing.chords.limited`; docs/parallel_ensemble.md).
"""

from collections.abc import Callable
from typing import Any

from celery import Task

from contracts.envelope import Decision, Envelope
from contracts.names import FANIN_TASK
from contracts.specs import AnyNode, EnsembleNode, ParallelNode
from routing.aggregate import MemberOutcome, conflicts, merger
from routing.chords import Member, MemberCall, absorb, all_failed, launch, register_fanin
from routing.compile import Compiler
from routing.kinds import NodeKind, Routing
from routing.nodes.ensemble import finish_ensemble

FanNode = ParallelNode | EnsembleNode
NODE_TYPES: dict[str, type[FanNode]] = {"parallel": ParallelNode, "ensemble": EnsembleNode}

# node -> path, job after absorbing members, job before the fan-out, members -> the merged job
Finisher = Callable[[Any, str, Envelope, Envelope, list[Member]], Envelope]


def members_of(node: FanNode) -> dict[str, AnyNode]:
    if isinstance(node, ParallelNode):
        return dict(node.members)
    return dict(zip(node.member_names(), node.members, strict=True))


def start(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    """Launch every member on a lean copy of the job; `pipeline.fanin` folds them back."""
    node = NODE_TYPES[raw["kind"]].model_validate(raw)
    lean = job.lean(path)
    calls = [MemberCall(name, f"{path}/{name}", member, member_prefix(node, path, name, member), lean)
             for name, member in members_of(node).items()]
    kwargs = {"node": raw, "path": path, "base": job.model_dump(mode="json")}
    return launch(task, compiler, calls, node.member_timeout, FANIN_TASK, kwargs)


def member_prefix(node: FanNode, path: str, name: str, member: AnyNode) -> str:
    """Members live under `<path>/<member>/`; an ensemble member with an id is named by it alone."""
    if isinstance(node, EnsembleNode) and member.id:
        return f"{path}/"
    return f"{path}/{name}/"


def fold(raw: dict[str, Any], path: str, base: Envelope, members: list[Member]) -> Envelope:
    """Fold every member into the job, then merge (parallel) or aggregate (ensemble)."""
    node = NODE_TYPES[raw["kind"]].model_validate(raw)
    job = base
    for member in members:
        job = absorb(job, member)
    if not any(member.ok for member in members):
        causes = [(m.name, m.error.message if m.error else "no result") for m in members]
        return job.with_error(all_failed(node.kind, path, causes), fatal=True)
    return _finisher(node)(node, path, job, base, members)


def _finisher(node: FanNode) -> Finisher:
    return finish_ensemble if isinstance(node, EnsembleNode) else finish_parallel  # type: ignore[return-value]


def changes(base: Envelope, member: Member) -> dict[str, Any]:
    """The state fields a member added or changed."""
    if member.envelope is None:
        return {}
    return {k: v for k, v in member.envelope.state.items() if k not in base.state or base.state[k] != v}


def finish_parallel(node: ParallelNode, path: str, job: Envelope, base: Envelope, members: list[Member]) -> Envelope:
    outcomes = [MemberOutcome(m.name, changes(base, m) if m.ok else {}, m.error.message if m.error else None)
                for m in members]
    updates = merger(node.merge, node.concat_field, node.separator)(dict(base.state), outcomes)
    summary = {
        "merge": node.merge,
        "succeeded": [o.name for o in outcomes if o.ok],
        "failed": {o.name: o.error for o in outcomes if not o.ok},
        "fields": {o.name: sorted(o.changes) for o in outcomes if o.ok},
        "conflicts": conflicts(outcomes),
    }
    decision = Decision(node=path, kind="parallel", choice="merged",
                        detail={"succeeded": len(summary["succeeded"]), "failed": len(summary["failed"])})
    merged = job.model_copy(update={"state": {**job.state, **updates}, "outputs": {**job.outputs, path: summary}})
    return merged.with_decision(decision)


def register_tasks(routing: Routing) -> None:
    register_fanin(routing, FANIN_TASK, fold)


PARALLEL = NodeKind(decide=start, tasks=(register_tasks,))
# an ensemble launches like a parallel group; `pipeline.fanin` (registered above) folds both kinds
ENSEMBLE = NodeKind(decide=start)
