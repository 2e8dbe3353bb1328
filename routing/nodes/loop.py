"""Loop (iterative refinement): repeat a body until a threshold, a plateau or max_iterations.

`pipeline.loop` starts iteration 1: it replaces itself with `body -> pipeline.loop.next`, the body
compiled under `<path>[1]/`. After each iteration `pipeline.loop.next` reads the score, appends a
record to the history and either stops or replaces itself with the next iteration. Everything
the loop knows lives in the envelope's state, named after the node (`<name>` = id or "loop"):

- `<name>_history`: one record per iteration: `{"iteration", "score", "fields"}`
- `<name>_iterations`: how many iterations ran
- `<name>_converged`: true when the threshold was reached or the score stopped improving

Each check is a decision in the trail (continue/stop, with the iteration's record and the stop
reason); `outputs[<path>]` holds the summary (converged, iterations, reason, scores).
"""

from typing import Any

from celery import Task, chain

from contracts.envelope import Decision, Envelope
from contracts.names import LOOP_NEXT_TASK, ROUTING_QUEUE
from contracts.specs import LoopNode
from routing.compile import Compiler, bind_input
from routing.errors import RoutingError
from routing.guard import register_routing_task
from routing.kinds import NodeKind, Routing
from routing.nodes.runtime import state_value


def names(node: LoopNode) -> tuple[str, str, str]:
    """The state fields of a loop: history, iteration count, converged."""
    base = node.id or "loop"
    return f"{base}_history", f"{base}_iterations", f"{base}_converged"


def start(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = LoopNode.model_validate(raw)
    history, count, converged = names(node)
    fresh = job.model_copy(update={"state": {**job.state, history: [], count: 0, converged: False}})
    return task.replace(_iteration(compiler, fresh, node, raw, path, 1))


def _iteration(compiler: Compiler, job: Envelope, node: LoopNode, raw: dict[str, Any], path: str,
               number: int) -> Any:
    body = compiler.node(node.body, f"{path}[{number}]/")
    check = compiler.app.signature(LOOP_NEXT_TASK, kwargs={"node": raw, "path": path}, queue=ROUTING_QUEUE)
    return bind_input(chain(body, check), job.model_dump(mode="json"))


def check(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = LoopNode.model_validate(raw)
    history_field, count_field, converged_field = names(node)
    history = list(job.state.get(history_field) or [])
    number = len(history) + 1
    score = _score(job, node, path)
    record = {"iteration": number, "score": score, "fields": _recorded(job, node, path, number)}
    history.append(record)
    reason = stop_reason(node, [h["score"] for h in history])
    converged = reason in ("threshold", "plateau")
    state = {**job.state, history_field: history, count_field: number, converged_field: converged}
    detail = {**record, "reason": reason}
    after = job.model_copy(update={"state": state}).with_decision(
        Decision(node=path, kind="loop", choice="stop" if reason else "continue", detail=detail)
    )
    if reason is None:
        return task.replace(_iteration(compiler, after, node, raw, path, number + 1))
    summary = {"converged": converged, "iterations": number, "reason": reason, "scores": [h["score"] for h in history]}
    return after.model_copy(update={"outputs": {**after.outputs, path: summary}}).model_dump(mode="json")


def _score(job: Envelope, node: LoopNode, path: str) -> float | None:
    field = node.watched
    if field is None:
        return None
    value = state_value(job, field, f"loop '{path}'")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RoutingError(f"loop '{path}': score field '{field}' must be a number, got {value!r}")
    return float(value)


def _recorded(job: Envelope, node: LoopNode, path: str, number: int) -> dict[str, Any]:
    """The fields kept for one iteration: the named ones, else the outputs of the body's stages."""
    if node.record:
        return {name: job.state.get(name) for name in node.record}
    prefix = f"{path}[{number}]/"
    fields: dict[str, Any] = {}
    for stage_node in dict.fromkeys(t.node for t in job.timings if t.node.startswith(prefix)):
        fields.update(job.outputs.get(stage_node, {}))  # stages only: not the summaries of nested nodes
    return fields


def stop_reason(node: LoopNode, scores: list[float | None]) -> str | None:
    """Why the loop stops after these scores: threshold, plateau, max_iterations; None to go on."""
    last = scores[-1]
    if node.until is not None and last is not None and _reached(node, last):
        return "threshold"
    if node.patience is not None and _stalled(node, scores):
        return "plateau"
    if len(scores) >= node.max_iterations:
        return "max_iterations"
    return None


def _reached(node: LoopNode, score: float) -> bool:
    assert node.until is not None
    if node.until.direction == "above":
        return score >= node.until.threshold
    return score <= node.until.threshold


def _stalled(node: LoopNode, scores: list[float | None]) -> bool:
    """The last `patience` scores each improved on the best before them by no more than epsilon."""
    assert node.patience is not None
    known = [s for s in scores if s is not None]
    if len(known) <= node.patience:
        return False
    sign = -1.0 if node.until is not None and node.until.direction == "below" else 1.0
    for index in range(len(known) - node.patience, len(known)):
        best = max(sign * s for s in known[:index])
        if sign * known[index] - best > node.epsilon:
            return False
    return True


def register_next(routing: Routing) -> None:
    register_routing_task(routing, LOOP_NEXT_TASK, check)


KIND = NodeKind(decide=start, tasks=(register_next,))
