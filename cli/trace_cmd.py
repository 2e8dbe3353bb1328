"""`stagecoach trace JOB [--save FILE]` and `stagecoach trace --replay FILE`: a job's trace as a tree."""

import json
from pathlib import Path
from typing import Any

from rich.tree import Tree

from contracts.errors import StagecoachError
from monitor.trace import JobPath, NodeRun, Trace

CUT = 160


def load(path: Path) -> Trace:
    try:
        return Trace.model_validate_json(path.read_text())
    except (OSError, ValueError) as error:
        raise StagecoachError(f"{path}: not a saved trace ({error})") from None


def save(trace: Trace, path: Path) -> None:
    path.write_text(json.dumps(trace.model_dump(mode="json"), indent=1))


def tree(trace: Trace) -> Tree:
    took = f" in {trace.seconds:.3f}s" if trace.seconds is not None else ""
    root = Tree(f"[bold]job {trace.job_id}[/]  pipeline [cyan]{trace.pipeline}[/]  {trace.state}{took}")
    if trace.inputs:
        root.add(f"inputs: {_cut(json.dumps(trace.inputs))}")
    _nodes(root.add("nodes (stage calls by node path; decisions where they were taken)"), trace)
    _timeline(root.add(f"events ({len(trace.events)}, in order)"), trace)
    if trace.path and trace.path.errors:
        errors = root.add("[red]errors[/]")
        for error in trace.path.errors:
            errors.add(error)
    return root


def _nodes(parent: Tree, trace: Trace) -> None:
    branches: dict[str, Tree] = {}

    def at(path: str) -> Tree:
        if path in ("", "."):
            return parent
        if path not in branches:
            head, _, name = path.rpartition("/")
            branches[path] = at(head).add(f"[bold]{name}[/]")
        return branches[path]

    start = float(trace.events[0].get("timestamp") or 0.0) if trace.events else 0.0
    for run in trace.nodes:
        _run(at(run.node), run, start)
    for decision in trace.decisions:
        detail = _cut(json.dumps(decision.get("detail") or {}))
        at(str(decision["node"])).add(f"[magenta]{decision['kind']} -> {decision['choice']}[/] {detail}")


def _run(parent: Tree, run: NodeRun, start: float) -> None:
    colour = {"ok": "green", "retry": "yellow"}.get(run.outcome, "red")
    seconds = f"{run.seconds:.3f}s" if run.seconds is not None else "-"
    span = ""
    if run.started_at is not None and run.seconds is not None:
        begin = run.started_at - start
        span = f" from +{begin:.3f}s to +{begin + run.seconds:.3f}s"
    wait = f", queue wait {run.queue_wait:.3f}s" if run.queue_wait is not None else ""
    node = parent.add(f"stage [cyan]{run.stage}[/] [{colour}]{run.outcome}[/] {seconds}{span} "
                      f"(attempt {run.attempts}{wait}) {run.worker}")
    node.add(f"in:  {_cut(run.inputs)}")
    if run.outputs:
        node.add(f"out: {_cut(run.outputs)}")
    if run.error:
        node.add(f"[red]{_cut(run.error)}[/]")


def _timeline(parent: Tree, trace: Trace) -> None:
    start = float(trace.events[0].get("timestamp") or 0) if trace.events else 0.0
    for event in trace.events:
        offset = float(event.get("timestamp") or start) - start
        what = event.get("name") or event.get("stage") or ""
        where = event.get("node") or event.get("hostname") or ""
        parent.add(f"+{offset:7.3f}s {event.get('type')} {what} {where}".rstrip())


def _cut(text: str) -> str:
    return text if len(text) <= CUT else text[:CUT] + "..."


def compare(saved: JobPath, now: JobPath) -> list[str]:
    """Differences between two paths (empty: the replay took the same path)."""
    out: list[str] = []
    for field in ("stages", "decisions", "errors"):
        before, after = getattr(saved, field), getattr(now, field)
        if before != after:
            out.append(f"{field}: saved {before} != replayed {after}")
    return out


def replay_request(trace: Trace) -> tuple[str, dict[str, Any], JobPath]:
    """What to submit again (pipeline, inputs) and the path the saved job took."""
    if trace.path is None or not trace.pipeline:
        raise StagecoachError(f"trace of job {trace.job_id} has no finished job to replay (state {trace.state})")
    return trace.pipeline, trace.inputs, trace.path
