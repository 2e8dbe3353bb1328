"""Per-job traces: the job's ordered events from the store, as a model saved to and loaded from JSON.

A trace holds every event the monitor saw for the job (Celery's task events of each task whose root
is the job, each stage outcome with inputs/outputs previews and timings, the job-finished event with
decisions) and the job's `path`: which stages ran at which node, what each runtime node decided and
which errors were recorded, in the envelope's order. The path is deterministic for a deterministic
LM, so a saved trace can be replayed (`stagecoach trace replay`) and the new job's path compared.
"""

from typing import Any

from pydantic import BaseModel, Field

from contracts.jobs import JobResult


class JobPath(BaseModel):
    stages: list[str] = Field(default_factory=list, description="'node: stage' per stage call, envelope order")
    decisions: list[str] = Field(default_factory=list, description="'node: kind -> choice' per runtime decision")
    errors: list[str] = Field(default_factory=list, description="'node: kind' per recorded error")


class NodeRun(BaseModel):
    """One stage call of the job, from its stage-outcome event (and its task's Celery events)."""

    node: str
    stage: str
    outcome: str
    started_at: float | None = None
    seconds: float | None = None
    queue_wait: float | None = None
    attempts: int = 1
    worker: str = ""
    inputs: str = ""
    outputs: str = ""
    error: str = ""


class Trace(BaseModel):
    job_id: str
    pipeline: str = ""
    state: str = Field("running", description="running until the job-finished event arrived")
    seconds: float | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    nodes: list[NodeRun] = Field(default_factory=list)
    decisions: list[dict[str, Any]] = Field(default_factory=list)
    path: JobPath | None = None
    events: list[dict[str, Any]] = Field(default_factory=list)


def build(job_id: str, events: list[dict[str, Any]]) -> Trace:
    ordered = sorted(events, key=_order(events))
    trace = Trace(job_id=job_id, events=ordered, nodes=_node_runs(ordered))
    for event in ordered:
        if event.get("type") == "stage-outcome" and not trace.pipeline:
            trace.pipeline = str(event.get("pipeline") or "")
        if event.get("type") == "job-finished":
            _finish(trace, event)
    return trace


def _order(events: list[dict[str, Any]]) -> Any:
    """Time order, except that a task's `task-sent` comes before its other events: Celery emits it
    after publishing, so a fast worker's `task-received` can carry an earlier timestamp."""
    first: dict[str, float] = {}
    for event in events:
        if event.get("type") != "task-sent" and event.get("uuid"):
            at = float(event.get("timestamp") or 0.0)
            first[event["uuid"]] = min(at, first.get(event["uuid"], at))

    def key(event: dict[str, Any]) -> tuple[float, int]:
        at = float(event.get("timestamp") or 0.0)
        if event.get("type") == "task-sent" and event.get("uuid") in first:
            return min(at, first[event["uuid"]]), 0
        return at, 1

    return key


def _finish(trace: Trace, event: dict[str, Any]) -> None:
    trace.pipeline = str(event.get("pipeline") or trace.pipeline)
    trace.state = str(event.get("state"))
    trace.seconds = event.get("seconds")
    trace.inputs = dict(event.get("inputs") or {})
    trace.decisions = list(event.get("trail") or [])
    trace.path = JobPath(
        stages=[f"{n['node']}: {n['stage']}" for n in event.get("nodes") or []],
        decisions=[f"{d['node']}: {d['kind']} -> {d['choice']}" for d in trace.decisions],
        errors=[f"{e['node']}: {e['kind']}" for e in event.get("errors") or []],
    )


def _node_runs(events: list[dict[str, Any]]) -> list[NodeRun]:
    sent = {e["uuid"]: float(e["timestamp"]) for e in events if e.get("type") == "task-sent" and "uuid" in e}
    started = {e["uuid"]: float(e["timestamp"]) for e in events if e.get("type") == "task-started" and "uuid" in e}
    runs = []
    for event in events:
        if event.get("type") != "stage-outcome":
            continue
        uuid = event.get("uuid", "")
        # the sender emits task-sent after publishing, so a fast worker may start "before" it: clamp
        wait = max(0.0, started[uuid] - sent[uuid]) if uuid in sent and uuid in started else None
        runs.append(NodeRun(node=str(event.get("node")), stage=str(event.get("stage")),
                            outcome=str(event.get("outcome")), started_at=event.get("started_at"),
                            seconds=event.get("seconds", event.get("elapsed")), queue_wait=wait,
                            attempts=int(event.get("attempts") or 1), worker=str(event.get("worker") or ""),
                            inputs=str(event.get("inputs") or ""), outputs=str(event.get("outputs") or ""),
                            error=f"{event.get('kind')}: {event.get('message')}" if event.get("message") else ""))
    return runs


def path_of(result: JobResult) -> JobPath:
    """The path of a finished job from its JobResult (the same fields the job-finished event carries)."""
    return JobPath(
        stages=[f"{t.node}: {t.stage}" for t in result.timings],
        decisions=[f"{d.node}: {d.kind} -> {d.choice}" for d in result.trail],
        errors=[f"{e.node}: {e.kind}" for e in result.errors],
    )
