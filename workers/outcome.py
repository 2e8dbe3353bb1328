"""The events of one stage step (contracts/events.py): it started, it ended (ok, an error of some kind,
a retry, skipped), and what it decided on the way (an on_error recovery).

Errors are values here: a stage that fails records an ErrorRecord in the envelope and its task
returns normally, so the step says what happened in a `StageOutcome`. The executor hands these to
the job ledger, which appends them to the event log in the round trips it makes anyway; the monitor
reads them from there (the fleet stream).
"""

import time
from dataclasses import dataclass
from typing import Any

from celery import Task

from contracts.envelope import Decision, Envelope
from contracts.events import DecisionMade, StageOutcome, StageStarted, preview


@dataclass(frozen=True)
class StepReport:
    """What the events of one step are built from: its task, job (as the step began), node path and stage,
    the inputs it read, and when it began."""

    task: Task
    job: Envelope
    path: str
    stage: str
    inputs: dict[str, Any]
    at: float

    def base(self, outcome: str, **fields: Any) -> StageOutcome:
        text, size = preview(self.inputs)
        return StageOutcome(stage=self.stage, pipeline=self.job.pipeline, job_id=self.job.job_id, node=self.path,
                            outcome=outcome, attempts=self.task.request.retries + 1, input_bytes=size, inputs=text,
                            at=self.at, elapsed=time.time() - self.at, **fields)  # type: ignore[arg-type]


def started(report: StepReport) -> StageStarted:
    job = report.job
    return StageStarted(job_id=job.job_id, pipeline=job.pipeline, at=report.at, stage=report.stage,
                        node=report.path, attempt=report.task.request.retries + 1,
                        worker=str(report.task.request.hostname or ""), waited=waited(job, report.at),
                        first=not job.timings and not job.errors)


def waited(job: Envelope, now: float) -> float:
    """Seconds since the job's latest stage ended (since it was submitted, before its first): the checkpoint,
    the hop through the broker and the wait in the queue. The monitor's queue waits come from this, off the
    event log, so replicas of the monitor count each once (Celery's task events are Flower's)."""
    return max(0.0, now - job.moved_at)


def ended(report: StepReport, done: Envelope) -> StageOutcome:
    """The step's outcome from the envelope before and after it: ok, or its newest error."""
    before = report.job
    fields: dict[str, Any] = {**_timing(before, done, report.path), **_tokens(before, done, report.stage)}
    new_errors = done.errors[len(before.errors):]
    if new_errors:
        error = new_errors[-1]
        return report.base("error", kind=error.kind, message=error.message[:500], fatal=done.failed, **fields)
    text, size = preview(done.outputs.get(report.path, {}))
    return report.base("ok", outputs=text, output_bytes=size, **fields)


def retried(report: StepReport, kind: str, message: str) -> StageOutcome:
    return report.base("retry", kind=kind, message=message[:500])


def skipped(report: StepReport) -> StageOutcome:
    """A step that passed the job through: it had failed before (inside a fan-out member)."""
    return report.base("skipped")


def decisions(job_id: str, pipeline: str, made: list[Decision]) -> list[DecisionMade]:
    return [DecisionMade(job_id=job_id, pipeline=pipeline, at=time.time(), node=d.node, kind=d.kind,
                         choice=d.choice, detail=d.detail) for d in made]


def new_decisions(before: Envelope, after: Envelope) -> list[DecisionMade]:
    """The decisions a step added to the job's trail (an on_error recovery)."""
    return decisions(after.job_id, after.pipeline, after.trail[len(before.trail):])


def _timing(before: Envelope, done: Envelope, path: str) -> dict[str, Any]:
    new = [t for t in done.timings[len(before.timings):] if t.node == path]
    if not new:  # an error: the call's time is what passed since the task started
        return {"seconds": None, "cached": False}
    timing = new[-1]
    return {"seconds": timing.seconds, "started_at": timing.started_at, "cached": timing.cached,
            "worker": timing.worker}


def _tokens(before: Envelope, done: Envelope, stage: str) -> dict[str, int]:
    old, new = before.usage.get(stage), done.usage.get(stage)
    if new is None:
        return {"prompt_tokens": 0, "completion_tokens": 0}
    return {"prompt_tokens": new.prompt_tokens - (old.prompt_tokens if old else 0),
            "completion_tokens": new.completion_tokens - (old.completion_tokens if old else 0)}
