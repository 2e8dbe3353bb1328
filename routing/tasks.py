"""Routing tasks: `pipeline.run` (start a job by name), `pipeline.finish`, and runtime nodes.

`pipeline.run` takes plain JSON (`{"pipeline": NAME, "inputs": {...}}`) so any Celery client can
start a job; it starts it through the job ledger exactly as the Python client does (record, then
send). Bad requests do not raise: the ledger ends them as a failed JobResult naming the problem
(ending `rejected`), so the caller's `.get()` returns an explanation and the worker keeps serving.
"""

import json
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from pydantic import ValidationError

from contracts.catalog import Catalog, iter_nodes, pin_versions
from contracts.envelope import Envelope, ErrorRecord
from contracts.errors import ContractError, FieldProblem, StagecoachError, encodable
from contracts.fields import problems_of
from contracts.jobs import JobRequest, requested_priority
from contracts.names import FINISH_TASK, ROUTING_QUEUE, RUN_TASK, finish_task_id, routing_task
from contracts.specs import PipelineSpec, StageNode
from contracts.traffic import routed_version
from routing.compile import Compiler
from routing.guard import register_routing_task
from routing.kinds import Routing
from routing.lazy import plan
from routing.nodes import KINDS
from workers.checkpoint import Begin, Claim, delivery, outage_requeues
from workers.ledger import Closer, Finish, Ledger
from workers.runtime import Runtime


def register(runtime: Runtime) -> None:
    """Every routing task: run, finish, each runtime kind's decision and the extra tasks kinds add."""
    app, ledger = runtime.app, runtime.ledger
    compiler = Compiler(app, runtime.catalog, KINDS)
    _register_run(app, runtime.catalog, compiler, ledger, runtime.settings.max_request_bytes)
    _register_finish(app, runtime.catalog, ledger)
    routing = Routing(app, compiler, ledger)
    for name, kind in KINDS.items():
        if kind.decide is not None:
            # guarded: an exception while deciding ends the job as failed, never leaves it hanging
            register_routing_task(routing, routing_task(name), kind.decide)
        for registrar in kind.tasks:
            registrar(routing)


def _register_run(app: Celery, catalog: Catalog, compiler: Compiler, ledger: Ledger, max_bytes: int) -> None:
    # *args/**kwargs: any call shape reaches the body, so a wrong one is a failed JobResult, not a TypeError
    @app.task(name=RUN_TASK, shared=False, bind=True, queue=ROUTING_QUEUE, acks_late=True)
    def run_pipeline(self: Task, *args: Any, **kwargs: Any) -> Any:
        job_id = self.request.id
        request: Any = None
        try:
            request = request_of(args, kwargs, max_bytes)
            envelope, spec, pinned = start_envelope(catalog, request, job_id)
        except StagecoachError as error:
            ledger.fail(job_id, rejected_record(error), Closer.of(self), pipeline=pipeline_named(request), inputs={},
                        rejected=request)
            raise Ignore() from None  # the ledger stored the failed JobResult and told Flower
        with outage_requeues(f"{RUN_TASK} of job {job_id}"):
            claim = ledger.start(envelope, request, pinned, "run", *delivery(self))
            if claim.begin is not Begin.RUN:
                raise Ignore()  # a duplicate `pipeline.run` of a started job starts nothing
            canvas = job_canvas(compiler, spec, envelope, requested_priority(request))
            return replace_once(self, canvas, ledger, claim)


def job_canvas(compiler: Compiler, spec: PipelineSpec, envelope: Envelope, priority: int | None) -> Any:
    """The whole job as canvas, the envelope bound to its first task(s); its last task closes the job.
    `priority`: the job's (contracts/priority.py), set on its first messages; the rest inherit it."""
    canvas = compiler.job(spec, envelope, priority)
    canvas.tasks[-1].set(task_id=finish_task_id(envelope.job_id))  # see finish_task_id
    return canvas


def replace_once(task: Task, canvas: Any, ledger: Ledger, claim: Claim) -> Any:
    """`task.replace(canvas)`, the start claimed done only once the chain is sent (if sending fails the
    message is handed back and its redelivery takes the claim over)."""
    try:
        return task.replace(canvas)
    except Ignore:  # how replace ends the task once the chain is sent
        ledger.sent(claim)
        raise


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
        raise ContractError(f"{RUN_TASK} request", [FieldProblem(
            "<request>", f"expected one request {{pipeline, inputs}} as args=[REQUEST] or as kwargs; got {got}")])
    size = len(json.dumps(request, default=str))
    if size > max_bytes:
        raise ContractError(f"{RUN_TASK} request", [FieldProblem(
            "inputs", f"request of {size} bytes exceeds STAGECOACH_MAX_REQUEST_BYTES ({max_bytes})")])
    return request


def start_envelope(catalog: Catalog, request: Any, job_id: str,
                   pinned: PipelineSpec | None = None) -> tuple[Envelope, PipelineSpec, PipelineSpec]:
    """A job's first envelope from its request, the spec to compile (lazy steps planned) and the pipeline
    with every version pinned. `pinned`: the versions a job started with (resume and re-dispatch run the
    same ones, or refuse clearly when the catalog no longer has one)."""
    try:
        parsed = JobRequest.model_validate(request)
    except ValidationError as error:
        raise ContractError(f"{RUN_TASK} request", problems_of(error)) from None
    # a new job's version: the one it pins, else the traffic split's choice (contracts/traffic.py)
    version = pinned.version if pinned is not None else routed_version(catalog, parsed.pipeline, parsed.version,
                                                                        job_id)
    name = parsed.pipeline.partition("@")[0] if pinned is not None else parsed.pipeline
    spec = pinned if pinned is not None else pin_versions(catalog, catalog.pipeline(name, version))
    if pinned is not None:
        check_served(catalog, pinned)
    inputs = catalog.validate_inputs(name, parsed.inputs, version)
    wanted = catalog.wanted_outputs(name, parsed.outputs, version)
    lazy = plan(catalog, spec.model_copy(update={"outputs": wanted}), wanted)
    envelope = Envelope(job_id=job_id, pipeline=spec.name, pipeline_version=spec.version, state=inputs,
                        trail=lazy.skipped, skipped=[d.node for d in lazy.skipped], publish=lazy.publish,
                        candidates=parsed.candidates or {})
    return envelope, lazy.spec, spec


def check_served(catalog: Catalog, pinned: PipelineSpec) -> None:
    """Every stage version a started job runs is still in the catalog (raises UnknownVersionError)."""
    for node in iter_nodes(pinned.root):
        if isinstance(node, StageNode):
            catalog.stage(node.stage, node.version)


def rejected_record(error: StagecoachError) -> ErrorRecord:
    """Why a request could not start: a contract error naming the pipeline and fields."""
    fields = [p.field for p in error.problems] if isinstance(error, ContractError) else []
    return ErrorRecord(node="", kind="contract", error_type=type(error).__name__, message=str(error), fields=fields)


def pipeline_named(request: Any) -> str:
    """The pipeline a rejected request names, escaped where it is not valid text (it is stored and shown)."""
    return encodable(str(request.get("pipeline") or "")) if isinstance(request, dict) else ""


def _register_finish(app: Celery, catalog: Catalog, ledger: Ledger) -> None:
    # `outputs`: what a job compiled before `finish` existed still carries
    # it stores the JobResult itself when it closes the job; a crash is stored as Celery would
    @app.task(name=FINISH_TASK, shared=False, bind=True, queue=ROUTING_QUEUE, acks_late=True,
              store_errors_even_if_ignored=True)
    def finish_pipeline(self: Task, envelope: dict[str, Any], finish: dict[str, Any] | None = None,
                        outputs: list[str] | None = None) -> dict[str, Any]:
        job = Envelope.model_validate(envelope)
        ending = Finish.load(finish) or Finish(outputs or [], list(catalog.pipeline(job.pipeline).inputs))
        with outage_requeues(f"{FINISH_TASK} of job {job.job_id}"):
            return ledger.hand_on(self, job, ending)  # or Ignore: a duplicate, or a replaced generation
