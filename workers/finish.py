"""Closing a job: its JobResult built from the last envelope, the job marked finished once, the monitor told.

Whichever task ends a job closes it. When the pipeline ends with a stage, the compiler hands that
stage a `finish` argument and the stage closes the job itself (no extra hop), in the same round
trip as its checkpoint; otherwise `pipeline.finish` does. Closing is once-only per job generation:
one script takes the finish claim and writes the final status and the JobResult together
(workers/checkpoint.py), so a duplicate or stale delivery never answers for the job twice, and a
worker killed at any point leaves either an open job (redelivered or re-dispatched) or a closed
one with its result, never a closed job without one.
"""

import time
from dataclasses import dataclass
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore

from contracts.envelope import Envelope
from contracts.jobs import JobResult, JobState
from workers.checkpoint import Checkpoints, StoredResult
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


@dataclass(frozen=True)
class Closing:
    """What closing a job writes, in one atomic step (workers/checkpoint.py, `_CLOSE`): its final
    status and its JobResult, stored as Celery stores a result under the job id (and published to
    a waiting `AsyncResult.get`). Writing both at once leaves no moment where a crash could have
    closed the job without its result, or a reader could see the result of a job still running."""

    job: JobResult
    result: dict[str, Any]  # the JobResult, as JSON
    status: dict[str, str]  # the job's final status fields, encoded
    stored: StoredResult


def closing(task: Task, job: Envelope, finish: Finish) -> Closing:
    model = job_result(job, finish.outputs)
    result = model.model_dump(mode="json")
    return Closing(model, result, finished_fields(final_state(job)), stored_result(task, job.job_id, result))


def stored_result(task: Task, job_id: str, result: dict[str, Any]) -> StoredResult:
    """The record Celery's result backend would write for a successful task `job_id` returning `result`:
    the closing task writes it itself, with the job's status, instead of letting Celery store its
    return value (closing tasks ignore their result; see routing/compile.py)."""
    backend = task.backend
    meta = backend._get_result_meta(result=result, state=states.SUCCESS, traceback=None, request=None)
    meta["task_id"] = job_id
    key = backend.get_key_for_task(job_id)
    return StoredResult(key.decode() if isinstance(key, bytes) else str(key), backend.encode(meta),
                        int(backend.expires or 0))


def close(task: Task, checkpoints: Checkpoints, job: Envelope, finish: Finish) -> Closing:
    """Close the job now, or raise Ignore: another delivery answers for it."""
    done = closing(task, job, finish)
    if not checkpoints.close(job, done.status, done.stored):
        raise Ignore()
    return done


def announce(task: Task, job: Envelope, finish: Finish, done: Closing) -> dict[str, Any]:
    """Tell the monitor (and Flower, for a job started by `pipeline.run`) that the closed job ended;
    returns the JobResult for the task to return."""
    if task.request.id != job.job_id:
        _job_succeeded_event(task, job.job_id, done.job)
    job_finished(task, done.job, job.pick(finish.inputs))
    return done.result


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
        traces=job.traces,
        submitted_at=job.submitted_at,
        finished_at=time.time(),
    )
