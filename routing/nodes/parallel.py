"""Parallel groups, and the fan-out/fan-in machinery ensembles share.

`pipeline.parallel` (and `pipeline.ensemble`) runs when the job reaches the node and replaces
itself with `chord(group(members bound to the envelope), pipeline.fanin)`: each member is the
member node compiled under `<path>/<member>/`, so its stages run on their own queues at once;
the body runs on the routing queue and folds the members back into the job. The node is launched
at run time, not compiled into the job's canvas up front, because the fan-in needs the envelope
as it was before the fan-out and the task id of every member (frozen here, one routing hop).

Partial failure. A member whose stage fails returns its envelope with `failure` set (errors are
values), so the chord completes and the failure is recorded while the rest are merged. A member
task that *raises* (a hard time limit kills its process, a bug) fails the chord: the Redis
backend then calls the body's errback instead of the body. `pipeline.fanin.rescue` is that
errback: a new-style errback, run where the chord failed, it takes the rest of the job from the
body's options (so Celery does not mark it failed) and sends the body anyway, which then reads
every member's result or exception from the backend by its id. No job hangs or loses results.

Time limits. `member_timeout` becomes each member stage's Celery `soft_time_limit` (the stage
records a timeout error as a value) and `time_limit` (the hard kill, above). Celery enforces both
only in the prefork pool, so it also becomes the stage's LM HTTP timeout, which is what bounds a
member in a thread-pool worker (see docs/parallel_ensemble.md).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.canvas import Signature, chain, chord, group
from celery.exceptions import Ignore, Retry

from contracts.envelope import Decision, Envelope, ErrorRecord
from contracts.names import ROUTING_QUEUE
from contracts.specs import EnsembleNode, Node, ParallelNode
from routing.aggregate import MemberOutcome, conflicts, merger
from routing.chords import limited, read_results, register_rescue, with_time_limits
from routing.compile import Compiler, bind_input
from routing.nodes.runtime import failed
from routing.registry import RUNTIME_HANDLERS, STATIC_COMPILERS, TASK_REGISTRARS

FANIN_TASK = "pipeline.fanin"
RESCUE_TASK = "pipeline.fanin.rescue"

FanNode = ParallelNode | EnsembleNode
NODE_TYPES: dict[str, type[FanNode]] = {"parallel": ParallelNode, "ensemble": EnsembleNode}


@dataclass(frozen=True)
class Member:
    """One member's end: its envelope (which may carry a failure), or the exception it raised."""

    name: str
    envelope: Envelope | None
    error: ErrorRecord | None

    @property
    def ok(self) -> bool:
        return self.error is None


# kind -> finish(node, path, job, base, members): the merged envelope once at least one succeeded
Finisher = Callable[[Any, str, Envelope, Envelope, list[Member]], Envelope]
FINISHERS: dict[str, Finisher] = {}


# ---- fan-out ---------------------------------------------------------------------------------


def members_of(node: FanNode) -> dict[str, Node]:
    if isinstance(node, ParallelNode):
        return dict(node.members)
    return dict(zip(node.member_names(), node.members, strict=True))


def launch(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    """Replace the launching task with the chord of members and the fan-in body."""
    node = NODE_TYPES[raw["kind"]].model_validate(raw)
    lean = job.model_copy(update={"outputs": {}, "errors": [], "timings": [], "trail": [], "usage": {}})
    envelope = lean.model_dump(mode="json")
    header: list[Signature] = []
    ids: dict[str, str] = {}
    for name, member in members_of(node).items():
        canvas = compiler.node(limited(member, node.member_timeout), member_prefix(node, path, name, member))
        sig = with_time_limits(bind_input(canvas, envelope), node.member_timeout)
        ids[name] = sig.freeze().id
        header.append(sig)
    kwargs = {"node": raw, "path": path, "base": job.model_dump(mode="json"), "ids": ids}
    body = compiler.app.signature(FANIN_TASK, kwargs=kwargs, queue=ROUTING_QUEUE)
    body.link_error(compiler.app.signature(RESCUE_TASK, queue=ROUTING_QUEUE))
    # wrapped in a chain so `replace` appends the rest of the job after the chord, where it rides in
    # the body's `chain` option; appended to a bare chord it would become part of the body, and the
    # errback linked to the body alone would never be called
    return task.replace(chain(chord(group(header), body)))


def member_prefix(node: FanNode, path: str, name: str, member: Node) -> str:
    """Members live under `<path>/<member>/`; an ensemble member with an id is named by it alone."""
    if isinstance(node, EnsembleNode) and member.id:
        return f"{path}/"
    return f"{path}/{name}/"


# ---- fan-in ----------------------------------------------------------------------------------


def fan_in(raw: dict[str, Any], path: str, base_raw: dict[str, Any], ids: dict[str, str],
           results: list[Any]) -> Envelope:
    """Fold every member into the job, then merge (parallel) or aggregate (ensemble)."""
    node = NODE_TYPES[raw["kind"]].model_validate(raw)
    base = Envelope.model_validate(base_raw)
    members = [_member(name, path, result) for name, result in zip(ids, results, strict=True)]
    job = base
    for member in members:
        job = absorb(job, member)
    if not any(member.ok for member in members):
        causes = [(m.name, m.error.message if m.error else "no result") for m in members]
        return job.with_error(all_failed(node.kind, path, causes), fatal=True)
    return FINISHERS[node.kind](node, path, job, base, members)


def _member(name: str, path: str, result: Any) -> Member:
    if isinstance(result, dict) and "__error__" in result:
        error = result["__error__"]
        kind = "timeout" if "TimeLimit" in error["type"] else "stage"
        record = ErrorRecord(node=f"{path}/{name}", kind=kind, error_type=error["type"], message=error["message"])
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


def changes(base: Envelope, member: Member) -> dict[str, Any]:
    """The state fields a member added or changed."""
    if member.envelope is None:
        return {}
    return {k: v for k, v in member.envelope.state.items() if k not in base.state or base.state[k] != v}


# ---- parallel --------------------------------------------------------------------------------


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


# ---- tasks -----------------------------------------------------------------------------------


def register_fanin(app: Celery, compiler: Compiler) -> None:
    @app.task(name=FANIN_TASK, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def fan_in_task(self: Task, results: list[Any] | None, node: dict[str, Any], path: str, base: dict[str, Any],
                    ids: dict[str, str], rescued: str | None = None) -> dict[str, Any]:
        try:
            found = results if results is not None else read_results(self.app, ids)
            return fan_in(node, path, base, ids, found).model_dump(mode="json")
        except (Ignore, Retry):
            raise
        except Exception as error:
            return failed(Envelope.model_validate(base), path, error)

    register_rescue(app, RESCUE_TASK, FANIN_TASK)


def _compile(compiler: Compiler, node: FanNode, prefix: str) -> Signature:
    return compiler.runtime(node, prefix)  # type: ignore[arg-type]


STATIC_COMPILERS["parallel"] = _compile
RUNTIME_HANDLERS["parallel"] = launch
FINISHERS["parallel"] = finish_parallel
TASK_REGISTRARS.append(register_fanin)
