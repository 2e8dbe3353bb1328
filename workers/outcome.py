"""The stage-outcome event: what one stage call did (ok, an error of some kind, a retry, skipped).

Errors are values here: a stage that fails records an ErrorRecord in the envelope and its task
returns normally, so the stage task says what happened in a `StageOutcome` (contracts/events.py).
The job's own end is the ledger's `JobFinished` (workers/ledger.py).
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.exceptions import Retry

from contracts.envelope import Envelope
from contracts.events import StageOutcome, preview
from workers.events import send


@contextmanager
def stage_outcome(task: Task, stage: str, job: Envelope, path: str,
                  inputs: dict[str, Any]) -> Iterator[Callable[[Envelope], Envelope]]:
    """Around one stage call: yields `report(done) -> done`; a Celery retry is reported as a retry."""
    base = _base(task, stage, job, path, inputs)
    try:
        yield lambda done: _report(task, base, job, done, path)
    except Retry as retry:
        cause = retry.__cause__  # the StageError the executor retries on
        _send(task, base.model_copy(update={"outcome": "retry", "kind": getattr(cause, "kind", "stage"),
                                            "message": str(cause)[:500]}))
        raise


def _send(task: Task, event: StageOutcome) -> None:
    send(task.app, task.request.hostname, task.request.id, event)


def _base(task: Task, stage: str, job: Envelope, path: str, inputs: dict[str, Any]) -> StageOutcome:
    text, size = preview(inputs)
    return StageOutcome(stage=stage, pipeline=job.pipeline, job_id=job.job_id, node=path, outcome="ok",
                        attempts=task.request.retries + 1, input_bytes=size, inputs=text, at=time.time())


def _report(task: Task, base: StageOutcome, before: Envelope, done: Envelope, path: str) -> Envelope:
    if before.failed:  # passed through after an earlier fatal error: the stage did not run
        _send(task, base.model_copy(update={"outcome": "skipped"}))
        return done
    update: dict[str, Any] = {**_timing(before, done), **_tokens(before, done, base.stage),
                              "elapsed": time.time() - base.at}
    new_errors = done.errors[len(before.errors):]
    if new_errors:
        error = new_errors[-1]
        update.update(outcome="error", kind=error.kind, message=error.message[:500], fatal=done.failed)
    else:
        text, size = preview(done.outputs.get(path, {}))
        update.update(outcome="ok", outputs=text, output_bytes=size)
    _send(task, base.model_copy(update=update))
    return done


def _timing(before: Envelope, done: Envelope) -> dict[str, Any]:
    new = done.timings[len(before.timings):]
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
