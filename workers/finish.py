"""Closing a job: its JobResult built from the last envelope, the job marked finished once, the monitor told.

Whichever task ends a job closes it. When the pipeline ends with a stage, the compiler hands that
stage a `finish` argument and the stage closes the job itself (no extra hop); otherwise
`pipeline.finish` does. Closing is once-only per job generation: a claim taken in the same script
that writes the final status (workers/checkpoint.py), so a duplicate or stale delivery never
answers for the job twice. The status is final before the JobResult is stored: whoever reads the
result finds the job finished too.
"""

import time
from dataclasses import dataclass
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore

from contracts.envelope import Envelope
from contracts.jobs import JobResult, JobState
from workers.checkpoint import Checkpoints
from workers.jobs import finished_fields
from workers.outcome import job_finished


@dataclass(frozen=True)
class Finish:
    """What the task that ends a job is told when the job is compiled (its `finish` argument)."""

    outputs: list[str]  # the pipeline's declared outputs: the JobResult's answer
    inputs: list[str]  # the pipeline's inputs, named in the job-finished event for traces

    def dump(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "inputs": self.inputs}

    @classmethod
    def load(cls, raw: Any) -> "Finish | None":
        if not isinstance(raw, dict):
            return None
        return cls([str(o) for o in raw.get("outputs") or []], [str(i) for i in raw.get("inputs") or []])


def final_state(job: Envelope) -> JobState:
    return "failed" if job.failed else "succeeded"


def close(checkpoints: Checkpoints, job: Envelope) -> None:
    """Close the job now (its final status), or raise Ignore: another delivery answers for it."""
    if not checkpoints.close(job, finished_fields(final_state(job))):
        raise Ignore()


def answer(task: Task, job: Envelope, finish: Finish) -> dict[str, Any]:
    """The JobResult of a closed job, stored under the job id, the monitor told; returned as JSON.
    A task whose id is the job id (the last task of a chain a client sent) stores it by returning it."""
    result = job_result(job, finish.outputs)
    data = result.model_dump(mode="json")
    if task.request.id != job.job_id:
        task.backend.store_result(job.job_id, data, states.SUCCESS)
        _job_succeeded_event(task, job.job_id, result)
    job_finished(task, result, job.pick(finish.inputs))
    return data


def _job_succeeded_event(task: Task, job_id: str, result: JobResult) -> None:
    """Close the job's `pipeline.run` entry in Flower (a replaced task sends no end event of its own)."""
    runtime = (result.finished_at or time.time()) - (result.submitted_at or time.time())
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        dispatcher.send("task-succeeded", uuid=job_id, result=f"job {result.state}", runtime=runtime)


def job_result(job: Envelope, outputs: list[str]) -> JobResult:
    answer = {name: job.state.get(name) for name in outputs} if not job.failed else {}
    return JobResult(
        job_id=job.job_id,
        pipeline=job.pipeline,
        pipeline_version=job.pipeline_version,
        state=final_state(job),
        answer=answer,
        fields=job.state,
        outputs=job.outputs,
        error=job.failure,
        errors=job.errors,
        timings=job.timings,
        trail=job.trail,
        usage=job.usage,
        cached_usage=job.cached_usage,
        skipped=job.skipped,
        submitted_at=job.submitted_at,
        finished_at=time.time(),
    )
