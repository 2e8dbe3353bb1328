"""Routing tasks: `pipeline.run` (start a job by name), `pipeline.finish`, and runtime nodes.

`pipeline.run` takes plain JSON (`{"pipeline": NAME, "inputs": {...}}`) so any Celery client can
start a job. Bad requests do not raise: they finish as a failed JobResult naming the problem, so
the caller's `.get()` returns an explanation and the worker keeps serving.
"""

import json
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from pydantic import ValidationError

from contracts.catalog import Catalog, pin_versions
from contracts.envelope import Envelope, ErrorRecord
from contracts.errors import ContractError, FieldProblem, StagecoachError
from contracts.fields import problems_of
from contracts.jobs import JobRequest, JobResult
from contracts.names import FINISH_TASK, ROUTING_QUEUE, RUN_TASK, routing_task
from contracts.specs import PipelineSpec
from contracts.traffic import routed_version
from routing.compile import Compiler
from routing.guard import register_routing_task
from routing.lazy import plan
from routing.nodes import KINDS
from workers.checkpoint import Begin, Checkpoints, Claim, delivery, outage_requeues
from workers.finish import Finish, announce, close
from workers.jobs import JobStore
from workers.outcome import job_finished
from workers.runtime import Runtime


def register(runtime: Runtime) -> None:
    """Every routing task: run, finish, each runtime kind's decision and the extra tasks kinds add."""
    app = runtime.app
    settings = runtime.settings
    compiler = Compiler(app, runtime.catalog, KINDS)
    checkpoints = Checkpoints.from_url(settings.backend_url, settings.result_expires, settings.watchdog_stall_seconds)
    _register_run(app, runtime.catalog, compiler, runtime.jobs, checkpoints, settings.max_request_bytes)
    _register_finish(app, runtime.catalog, checkpoints)
    for name, kind in KINDS.items():
        if kind.decide is not None:
            # guarded: an exception while deciding ends the job as failed, never leaves it hanging
            register_routing_task(app, compiler, routing_task(name), kind.decide)
        for registrar in kind.tasks:
            registrar(app, compiler)


def _register_run(app: Celery, catalog: Catalog, compiler: Compiler, jobs: JobStore,
                  checkpoints: Checkpoints, max_bytes: int) -> None:
    # *args/**kwargs: any call shape reaches the body, so a wrong one is a failed JobResult, not a TypeError
    @app.task(name=RUN_TASK, shared=False, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def run_pipeline(self: Task, *args: Any, **kwargs: Any) -> Any:
        job_id = self.request.id
        request: Any = None
        try:
            request = request_of(args, kwargs, max_bytes)
            envelope, spec = start_envelope(catalog, request, job_id)
        except StagecoachError as error:
            result = rejected(job_id, request, error, jobs)
            job_finished(self, result, {})
            return result.model_dump(mode="json")
        with outage_requeues(f"pipeline.run of job {job_id}"):
            claim = start_once(checkpoints, envelope, request, *delivery(self))
            jobs.entered(job_id, "", None)
            return replace_once(self, job_canvas(compiler, spec, envelope), checkpoints, claim)


def job_canvas(compiler: Compiler, spec: PipelineSpec, envelope: Envelope) -> Any:
    """The whole job as canvas, the envelope bound to its first task(s); its last task closes the job."""
    canvas = compiler.job(spec, envelope)
    canvas.tasks[-1].set(task_id=finish_task_id(envelope.job_id))  # see finish_task_id
    return canvas


def replace_once(task: Task, canvas: Any, checkpoints: Checkpoints, claim: Claim) -> Any:
    """`task.replace(canvas)`, the start claimed done only once the chain is sent (if sending fails the
    message is handed back and its redelivery takes the claim over)."""
    try:
        return task.replace(canvas)
    except Ignore:  # how replace ends the task once the chain is sent
        checkpoints.complete(claim)
        raise


def start_once(checkpoints: Checkpoints, envelope: Envelope, request: dict[str, Any], owner: str,
               redelivered: bool) -> Claim:
    """Checkpoint the request, then claim the start: a duplicated `pipeline.run` never starts a second chain."""
    checkpoints.started(envelope.job_id, envelope.pipeline, request)
    claim = checkpoints.claim(envelope, "run", checkpoints.stall, owner, redelivered)
    if claim.begin is not Begin.RUN:
        raise Ignore()
    return claim


def request_of(args: tuple[Any, ...], kwargs: dict[str, Any], max_bytes: int) -> Any:
    """The one request of a `pipeline.run` call: `args=[REQUEST]`, `kwargs=REQUEST` or `kwargs={"request": ...}`."""
    if len(args) == 1 and not kwargs:
        request = args[0]
    elif not args and set(kwargs) == {"request"}:
        request = kwargs["request"]
    elif not args and kwargs:
        request = kwargs
    else:
        got = f"{len(args)} positional argument(s)" + (f" and kwargs {sorted(kwargs)}" if kwargs else "")
        raise ContractError("pipeline.run request", [FieldProblem(
            "<request>", f"expected one request {{pipeline, inputs}} as args=[REQUEST] or as kwargs; got {got}")])
    size = len(json.dumps(request, default=str))
    if size > max_bytes:
        raise ContractError("pipeline.run request", [FieldProblem(
            "inputs", f"request of {size} bytes exceeds STAGECOACH_MAX_REQUEST_BYTES ({max_bytes})")])
    return request


def start_envelope(catalog: Catalog, request: Any, job_id: str) -> tuple[Envelope, PipelineSpec]:
    try:
        parsed = JobRequest.model_validate(request)
    except ValidationError as error:
        raise ContractError("pipeline.run request", problems_of(error)) from None
    parsed.version = routed_version(catalog, parsed.pipeline, parsed.version, job_id)  # a traffic split, if any
    spec = pin_versions(catalog, catalog.pipeline(parsed.pipeline, parsed.version))
    inputs = catalog.validate_inputs(parsed.pipeline, parsed.inputs, parsed.version)
    wanted = catalog.wanted_outputs(parsed.pipeline, parsed.outputs, parsed.version)
    lazy = plan(catalog, spec.model_copy(update={"outputs": wanted}), wanted)
    envelope = Envelope(job_id=job_id, pipeline=spec.name, pipeline_version=spec.version, state=inputs,
                        trail=lazy.skipped, skipped=[d.node for d in lazy.skipped], publish=lazy.publish,
                        candidates=parsed.candidates or {})
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
    """The task that closes a job started by `pipeline.run` has an id of its own, so Flower shows
    `pipeline.run` under the job id and the closing task beside it (sharing the job id, its events
    overwrote the run's). The closing task stores the JobResult under the job id, where clients read it."""
    return f"{job_id}-finish"


def _register_finish(app: Celery, catalog: Catalog, checkpoints: Checkpoints) -> None:
    # `outputs`: what a job compiled before `finish` existed still carries
    # it stores the JobResult itself when it closes the job; a crash is stored as Celery would
    @app.task(name=FINISH_TASK, shared=False, bind=True, queue=ROUTING_QUEUE, acks_late=True,
              store_errors_even_if_ignored=True)
    def finish_pipeline(self: Task, envelope: dict[str, Any], finish: dict[str, Any] | None = None,
                        outputs: list[str] | None = None) -> dict[str, Any]:
        job = Envelope.model_validate(envelope)
        ending = Finish.load(finish) or Finish(outputs or [], list(catalog.pipeline(job.pipeline).inputs))
        with outage_requeues(f"pipeline.finish of job {job.job_id}"):
            done = close(self, checkpoints, job, ending)  # or Ignore: a duplicate, or a replaced generation
            return announce(self, job, ending, done)
