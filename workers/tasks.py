"""One Celery task per stage version, named and queued `stage.<ref>` (contracts/names.py), and the fused task.

Tasks are thin: validate the envelope, run the step (workers/executor.py), hand the envelope on.
Errors become values in the envelope (its error log, and `failure` when fatal) rather than
exceptions across task boundaries, so a chain or chord never hangs on a failed member and the job
result explains what went wrong. Where the job ends (its last step, or a fatal error at the job's
top level), the job ledger closes it (workers/ledger.py). Each step's events (started, outcome,
decisions) go to the event log and the monitor (workers/outcome.py).
"""

import json
import logging
from typing import Any, NoReturn

from billiard.exceptions import TimeLimitExceeded
from celery import Celery, Task
from celery.exceptions import Ignore
from celery.worker.request import Request
from pydantic import ValidationError

from contracts.connections import redis_client
from contracts.deadletters import DeadLetter
from contracts.envelope import Envelope, ErrorRecord
from contracts.fields import problems_of
from contracts.names import FUSED_TASK, MAX_FUSED_STEPS, STAGE_PREFIX, split_ref, stage_queue, stage_task
from contracts.specs import Limits, StageNode, StageSpec
from workers.cache import StageCache
from workers.candidates import CandidateStore
from workers.checkpoint import outage_requeues
from workers.deadletter import MAX_RAW_BYTES, DeadLetterStore, quarantine
from workers.executor import Guard, StageCall, StageExecutor
from workers.fused import FusedExecutor
from workers.ledger import Closer, Finish, Ledger, end_task
from workers.ratelimit import RateLimiter
from workers.settings import Settings
from workers.stage import StageRunner

log = logging.getLogger(__name__)


class StageRequest(Request):  # type: ignore[misc]
    """A stage task's request in the worker's main process: when the pool kills a call at its hard time
    limit, the job ends as timed out through the ledger's close first (so whoever waits reads its
    JobResult), then Celery records the task's failure as usual. Fan-out members are left to their
    fan-in. Subclassed per app with its ledger (`request_class`)."""

    ledger: Ledger

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrapped ExceptionWithTraceback
        if isinstance(exc, TimeLimitExceeded):  # billiard reports the kill here first, then on_timeout
            self._end_job_safely(float(exc.args[0]) if exc.args else 0.0)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            self._end_job_safely(timeout)  # a second close of the same job is a no-op
        super().on_timeout(soft, timeout)

    def _end_job_safely(self, timeout: float) -> None:
        try:
            self._end_job(timeout)
        except Exception:  # the worker's main process must live on
            log.exception("could not end the job of %s[%s] at its hard time limit", self.name, self.id)

    def _end_job(self, timeout: float) -> None:
        args, kwargs = list(self.args or []), dict(self.kwargs or {})
        if not args:
            return
        job = Envelope.model_validate(args[0])
        if job.member_of is not None or job.failed:
            return
        steps = kwargs.get("steps") or [{}]
        path = str(kwargs.get("path") or steps[0].get("path") or "")
        node = kwargs.get("node") or steps[0].get("node") or {}
        record = ErrorRecord(node=path, stage=split_ref(str(node.get("stage") or ""))[0] or None, kind="timeout",
                             error_type="TimeLimitExceeded",
                             message=f"hard time limit of {timeout:g}s exceeded: the pool killed the call")
        self.ledger.close_step(job.with_error(record, fatal=True), Finish.load(kwargs.get("finish")),
                               Closer(self.hostname, self.id))


def request_class(ledger: Ledger) -> type[StageRequest]:
    return type("StageRequest", (StageRequest,), {"ledger": ledger})


def register_stage_tasks(app: Celery, stages: dict[str, StageSpec], settings: Settings, ledger: Ledger) -> None:
    """One task per stage version, named by its catalog ref (`answer`, or `answer@1` for an older one)."""
    cache = (StageCache.from_url(settings.backend_url, settings.cache, settings.sentinel) if settings.cache.enabled
             else None)
    versions = {(spec.name, spec.version): ref for ref, spec in stages.items()}
    dead_letters = DeadLetterStore(redis_client(settings.backend_url, settings.sentinel), settings.dead_letter_max)
    guard = Guard(ledger, RateLimiter(redis_client(settings.backend_url, settings.sentinel)))
    limits = {ref: Limits.stage(spec, settings.stage_time_limit) for ref, spec in stages.items()}
    # each runner holds its stage's time limit in every pool; all of them are there for on_error fallbacks
    candidates = CandidateStore.from_url(settings.backend_url, settings.result_expires,  # optimisation jobs
                                         settings.sentinel)
    runners = {ref: StageRunner(spec, settings.lm, cache, limits[ref].soft, candidates) for ref, spec in stages.items()}
    executors = {ref: StageExecutor(runners[ref], ledger.jobs, versions, guard, limits[ref].hard, runners)
                 for ref in stages}
    request = request_class(ledger)
    for ref, executor in executors.items():
        _register(app, ref, executor, limits[ref], ledger, dead_letters, request)
    _register_fused(app, FusedExecutor(executors, versions, settings, cache), settings, ledger, request)


def _register(app: Celery, ref: str, executor: StageExecutor, limits: Limits, ledger: Ledger,
              dead_letters: DeadLetterStore, request: type[StageRequest]) -> None:
    spec = executor.spec

    @app.task(
        name=stage_task(ref),
        shared=False,  # this app's task only (a shared task would reach every app a process builds)
        bind=True,
        queue=stage_queue(ref),
        acks_late=True,
        reject_on_worker_lost=True,
        soft_time_limit=limits.soft,
        time_limit=limits.hard,
        max_retries=spec.retry.max_retries,
        store_errors_even_if_ignored=True,  # see Compiler.pipeline: a crash fails the job's chain
        Request=request,
    )
    def run_stage(self: Task, envelope: dict[str, Any], node: dict[str, Any], path: str,
                  finish: dict[str, Any] | None = None) -> Any:
        job, parsed = inbound(ledger, dead_letters, self, envelope, node, ref)
        call = StageCall(self, job, parsed, path)
        ending = Finish.load(finish)  # the pipeline's last stage closes the job itself (workers/ledger.py)
        if parsed.version is not None and parsed.version != spec.version:
            return ledger.hand_on(self, executor.hand_over(call, finish), ending)
        with outage_requeues(f"{self.name} of job {job.job_id}"):
            step = executor.execute(call, ending, Closer.of(self))
            closing = step.ended()  # closed by the step's own checkpoint round trip
            return end_task(closing.result) if closing is not None else ledger.hand_on(self, step.envelope, ending)


def inbound(ledger: Ledger, dead_letters: DeadLetterStore, task: Task, envelope: Any, node: Any,
            ref: str) -> tuple[Envelope, StageNode]:
    """The envelope and node of a message for stage `ref`. An invalid one, one whose node names another
    stage, or one that came from another stage's queue is dead-lettered, its job ended (the rest of its
    chain cannot run without it) and the message dropped: Ignore acknowledges it without an event of
    Celery's, so Flower shows the FAILURE the ledger sent."""
    try:
        job, parsed = Envelope.model_validate(envelope), StageNode.model_validate(node)
    except ValidationError as error:
        problems = "; ".join(str(p) for p in problems_of(error))
        refuse(ledger, dead_letters, task, f"invalid envelope or node: {problems}", envelope, node)
    stage, named = split_ref(ref)[0], split_ref(parsed.stage)[0]
    if named != stage:
        refuse(ledger, dead_letters, task, f"its node names stage '{named}', not this task's stage '{stage}'",
               envelope, node)
    queue = str((task.request.delivery_info or {}).get("routing_key") or "")
    if queue.startswith(STAGE_PREFIX) and queue != stage_queue(ref):
        refuse(ledger, dead_letters, task, f"it came from queue '{queue}', not this stage's '{stage_queue(ref)}'",
               envelope, node)
    return job, parsed


def refuse(ledger: Ledger, dead_letters: DeadLetterStore, task: Task, why: str, envelope: Any,
           node: Any) -> NoReturn:
    raw = json.dumps({"envelope": envelope, "node": node}, default=str).encode("utf-8", errors="backslashreplace")
    request = task.request
    named = {"task": task.name, "task_id": request.id, "root_id": request.root_id}
    letter = DeadLetter.of(f"{task.name}: {why}", raw, str((request.delivery_info or {}).get("routing_key") or ""),
                           MAX_RAW_BYTES, {k: v for k, v in named.items() if isinstance(v, str)}, source="task")
    quarantine(ledger, dead_letters, letter, task.request.hostname)
    raise Ignore()


def _register_fused(app: Celery, fused: FusedExecutor, settings: Settings, ledger: Ledger,
                    request: type[StageRequest]) -> None:
    specs = [executor.spec for executor in fused.executors.values()]
    longest = max([Limits.stage(s, settings.stage_time_limit).soft for s in specs] or [settings.stage_time_limit])
    limits = Limits.of(longest * MAX_FUSED_STEPS)

    @app.task(
        name=FUSED_TASK,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        soft_time_limit=limits.soft,
        time_limit=limits.hard,
        max_retries=max([s.retry.max_retries for s in specs] or [0]),
        store_errors_even_if_ignored=True,
        Request=request,
    )
    def run_fused(self: Task, envelope: dict[str, Any], steps: list[dict[str, Any]],
                  finish: dict[str, Any] | None = None) -> Any:
        job = Envelope.model_validate(envelope)
        with outage_requeues(f"{self.name} of job {job.job_id}"):
            return ledger.hand_on(self, fused.execute(self, job, steps), Finish.load(finish))
