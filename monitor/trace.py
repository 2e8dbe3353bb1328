"""Per-job traces: the job's ordered events from the store, as a model saved to and loaded from JSON.

A trace holds the job's events as the monitor read them off the fleet's event stream (queued, each
stage step started with its queue wait, each stage outcome with inputs/outputs previews and timings,
decisions, the job-finished event with the path) and the job's `path`: which stages ran at which node,
what each runtime node decided and which errors were recorded, in the envelope's order. The path is
deterministic for a deterministic LM, so a saved trace can be replayed (`stagecoach trace replay`) and
the new job's path compared.
"""

from typing import Any

from pydantic import BaseModel, Field

from contracts.jobs import JobResult


class JobPath(BaseModel):
    stages: list[str] = Field(default_factory=list, description="'node: stage' per stage call, envelope order")
    decisions: list[str] = Field(default_factory=list, description="'node: kind -> choice' per runtime decision")
    errors: list[str] = Field(default_factory=list, description="'node: kind' per recorded error")


class NodeRun(BaseModel):
    """One stage call of the job, from its stage-outcome event (its queue wait from its stage-started one)."""

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
    ordered = sorted(events, key=lambda e: float(e.get("timestamp") or 0.0))
    trace = Trace(job_id=job_id, events=ordered, nodes=_node_runs(ordered))
    for event in ordered:
        if event.get("type") in ("job-queued", "stage-outcome") and not trace.pipeline:
            trace.pipeline = str(event.get("pipeline") or "")
        if event.get("type") == "job-finished":
            _finish(trace, event)
    return trace


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
    waits = {(e.get("node"), int(e.get("attempt") or 1)): e.get("waited") for e in events
             if e.get("type") == "stage-started"}
    runs = []
    for event in events:
        if event.get("type") != "stage-outcome":
            continue
        attempts = int(event.get("attempts") or 1)
        runs.append(NodeRun(node=str(event.get("node")), stage=str(event.get("stage")),
                            outcome=str(event.get("outcome")), started_at=event.get("started_at"),
                            seconds=event.get("seconds", event.get("elapsed")),
                            queue_wait=waits.get((event.get("node"), attempts)), attempts=attempts,
                            worker=str(event.get("worker") or ""), inputs=str(event.get("inputs") or ""),
                            outputs=str(event.get("outputs") or ""),
                            error=f"{event.get('kind')}: {event.get('message')}" if event.get("message") else ""))
    return runs


def path_of(result: JobResult) -> JobPath:
    """The path of a finished job from its JobResult (the same fields the job-finished event carries)."""
    return JobPath(
        stages=[f"{t.node}: {t.stage}" for t in result.timings],
        decisions=[f"{d.node}: {d.kind} -> {d.choice}" for d in result.trail],
        errors=[f"{e.node}: {e.kind}" for e in result.errors],
    )
