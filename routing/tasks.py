"""Routing tasks: `pipeline.run` (start a job by name), `pipeline.finish`, and runtime nodes.

`pipeline.run` takes plain JSON (`{"pipeline": NAME, "inputs": {...}}`) so any Celery client can
start a job. Bad requests do not raise: they finish as a failed JobResult naming the problem, so
the caller's `.get()` returns an explanation and the worker keeps serving.
"""

import time
from typing import Any

from celery import Celery, Task, states
from pydantic import ValidationError

from contracts.catalog import Catalog, pin_versions
from contracts.envelope import Envelope, ErrorRecord
from contracts.errors import ContractError, StagecoachError
from contracts.fields import problems_of
from contracts.jobs import JobRequest, JobResult
from contracts.names import FINISH_TASK, ROUTING_QUEUE, RUN_TASK, routing_task
from contracts.specs import PipelineSpec
from routing.compile import Compiler, bind_input
from routing.guard import register_routing_task
from routing.lazy import plan
from routing.nodes import KINDS
from workers.jobs import JobStore
from workers.outcome import job_finished
from workers.runtime import Runtime


def register(runtime: Runtime) -> None:
    """Every routing task: run, finish, each runtime kind's decision and the extra tasks kinds add."""
    app = runtime.app
    compiler = Compiler(app, runtime.catalog, KINDS)
    _register_run(app, runtime.catalog, compiler, runtime.jobs)
    _register_finish(app, runtime.catalog, runtime.jobs)
    for name, kind in KINDS.items():
        if kind.decide is not None:
            # guarded: an exception while deciding ends the job as failed, never leaves it hanging
            register_routing_task(app, compiler, routing_task(name), kind.decide)
        for registrar in kind.tasks:
            registrar(app, compiler)


def _register_run(app: Celery, catalog: Catalog, compiler: Compiler, jobs: JobStore) -> None:
    @app.task(name=RUN_TASK, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def run_pipeline(self: Task, request: dict[str, Any]) -> Any:
        job_id = self.request.id
        try:
            envelope, spec = start_envelope(catalog, request, job_id)
        except StagecoachError as error:
            result = rejected(job_id, request, error, jobs)
            job_finished(self, result, {})
            return result.model_dump(mode="json")
        jobs.entered(job_id, "", None)
        canvas = bind_input(compiler.pipeline(spec), envelope.model_dump(mode="json"))
        canvas.tasks[-1].set(task_id=finish_task_id(job_id))  # see finish_task_id
        return self.replace(canvas)


def start_envelope(catalog: Catalog, request: dict[str, Any], job_id: str) -> tuple[Envelope, PipelineSpec]:
    try:
        parsed = JobRequest.model_validate(request)
    except ValidationError as error:
        raise ContractError("pipeline.run request", problems_of(error)) from None
    spec = pin_versions(catalog, catalog.pipeline(parsed.pipeline, parsed.version))
    inputs = catalog.validate_inputs(parsed.pipeline, parsed.inputs, parsed.version)
    wanted = catalog.wanted_outputs(parsed.pipeline, parsed.outputs, parsed.version)
    lazy = plan(catalog, spec.model_copy(update={"outputs": wanted}), wanted)
    envelope = Envelope(job_id=job_id, pipeline=spec.name, pipeline_version=spec.version, state=inputs,
                        trail=lazy.skipped, skipped=[d.node for d in lazy.skipped], publish=lazy.publish)
    return envelope, lazy.spec


def rejected(job_id: str, request: Any, error: StagecoachError, jobs: JobStore) -> JobResult:
    """A request that could not start: a failed result that names the pipeline and fields."""
    pipeline = request.get("pipeline") if isinstance(request, dict) else None
    fields = [p.field for p in error.problems] if isinstance(error, ContractError) else []
    record = ErrorRecord(
        node="", kind="contract", error_type=type(error).__name__, message=str(error), fields=fields
    )
    jobs.finished(job_id, "failed")
    return JobResult(
        job_id=job_id,
        pipeline=str(pipeline or ""),
        pipeline_version="",
        state="failed",
        error=record,
        errors=[record],
        finished_at=time.time(),
    )


def finish_task_id(job_id: str) -> str:
    """`pipeline.finish` has an id of its own, so Flower shows `pipeline.run` under the job id and the
    finish beside it (sharing the job id, its events overwrote the run's). The finish task stores the
    JobResult under the job id itself, where clients read it."""
    return f"{job_id}-finish"


def _register_finish(app: Celery, catalog: Catalog, jobs: JobStore) -> None:
    @app.task(name=FINISH_TASK, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def finish_pipeline(self: Task, envelope: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        job = Envelope.model_validate(envelope)
        result = job_result(job, outputs)
        data = result.model_dump(mode="json")
        if self.request.id != job.job_id:
            self.backend.store_result(job.job_id, data, states.SUCCESS)
            _job_succeeded_event(self, job.job_id, result)
        jobs.finished(job.job_id, result.state)
        job_finished(self, result, job.pick(list(catalog.pipeline(job.pipeline).inputs)))
        return data


def _job_succeeded_event(task: Task, job_id: str, result: JobResult) -> None:
    """Close the job's `pipeline.run` entry (replaced, so Celery sends no end event for it) in Flower."""
    runtime = (result.finished_at or time.time()) - (result.submitted_at or time.time())
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        dispatcher.send("task-succeeded", uuid=job_id, result=f"job {result.state}", runtime=runtime)


def job_result(job: Envelope, outputs: list[str]) -> JobResult:
    answer = {name: job.state.get(name) for name in outputs} if not job.failed else {}
    return JobResult(
        job_id=job.job_id,
        pipeline=job.pipeline,
        pipeline_version=job.pipeline_version,
        state="failed" if job.failed else "succeeded",
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
