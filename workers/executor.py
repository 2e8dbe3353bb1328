"""Run one stage step for one envelope and fold its outcome (output, retry or error) into it.

A step runs once per (job, generation, node path, attempt) however often the broker delivers it:
the job ledger claims it in the round trip before the call and checkpoints it in the round trip
after (workers/ledger.py). Transient LM errors are retried with exponential backoff, each attempt
logged in the envelope; when retries are spent the stage's `on_error` strategy decides
(workers/onerror.py). Errors are values: the envelope carries them, and its `failure` when fatal.
"""

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from contracts.envelope import Envelope, ErrorRecord, StageTiming, Usage
from contracts.errors import UnknownVersionError
from contracts.events import StagecoachEvent
from contracts.names import stage_queue, stage_task
from contracts.specs import StageNode, StageSpec
from workers import outcome
from workers.checkpoint import BROKER_DOWN, Begin, Begun, Claim, Done, delivery, source_list
from workers.errors import PermanentStageError, StageError, StageTimeoutError
from workers.jobs import JobStore, running_fields
from workers.ledger import Closer, Closing, Finish, Ledger
from workers.onerror import cancelled_record, recover
from workers.ratelimit import RateLimiter
from workers.stage import StageRun, StageRunner

log = logging.getLogger(__name__)
# what a step lets through to Celery: how tasks end (retry, ignore, reject), a time limit, a broker outage
PASSED_ON = (Retry, Ignore, Reject, SoftTimeLimitExceeded, *BROKER_DOWN)


@dataclass(frozen=True)
class StageCall:
    """One delivery of a stage step: the task running it, the job's envelope, the node and its path,
    and the task kwargs a retry is sent with (default: this node)."""

    task: Task
    job: Envelope
    node: StageNode
    path: str
    resume: dict[str, Any] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        return int(self.task.request.retries)

    @property
    def worker(self) -> str:
        return str(self.task.request.hostname or "")

    def with_job(self, job: Envelope) -> "StageCall":
        return StageCall(self.task, job, self.node, self.path, self.resume)

    def retry_kwargs(self) -> dict[str, Any]:
        kwargs = self.resume or {"node": self.node.model_dump(mode="json"), "path": self.path}
        finish = (self.task.request.kwargs or {}).get("finish")
        return {**kwargs, "finish": finish} if finish is not None else kwargs  # the last step's retry closes too


@dataclass(frozen=True)
class Guard:
    """What keeps a stage step once-only and within quota: the job ledger and the rate limiter."""

    ledger: Ledger
    limiter: RateLimiter


@dataclass(frozen=True)
class Step:
    """What a stage step leaves: the envelope; `done`, the completed run to checkpoint (None when the
    stage did not run: failed, cancelled, replayed, passed through); `events`, what it tells the event
    log; `closed`, whether saving it closed the job (None: closing was not asked for)."""

    envelope: Envelope
    done: Done | None = None
    published: dict[str, Any] = field(default_factory=dict)  # answer fields final now (`JobHandle.output`)
    closed: bool | None = None
    closing: Closing | None = None
    events: list[StagecoachEvent] = field(default_factory=list)

    def ended(self) -> Closing | None:
        """How saving this step closed the job; None when it did not try; Ignore when another delivery
        closed it already (this one answers for nothing)."""
        if self.closed is None:
            return None
        if not self.closed or self.closing is None:
            raise Ignore()
        return self.closing


class StageExecutor:
    """Runs one stage version's steps."""

    def __init__(self, runner: StageRunner, jobs: JobStore, versions: dict[tuple[str, str], str],
                 guard: Guard | None = None, hard_limit: float = 0.0,
                 fallbacks: dict[str, StageRunner] | None = None) -> None:
        self.runner = runner
        self.jobs = jobs
        self.spec = runner.spec
        self.versions = versions  # (stage name, version) -> catalog ref, for every version this worker knows
        self.guard = guard  # None: no claims or checkpoints (a fused pair's merged call)
        self.hard_limit = hard_limit
        self.fallbacks = fallbacks or {}  # every stage's runner, by ref: an `on_error` fallback stage runs inline

    @property
    def ledger(self) -> Ledger:
        assert self.guard is not None, "a merged pair runs inside a fused task, which holds the ledger"
        return self.guard.ledger

    def hand_over(self, call: StageCall, finish: dict[str, Any] | None = None) -> Any:
        """The job started on another version of this stage (the catalog changed since): run it there."""
        ref = self.versions.get((self.spec.name, call.node.version or ""))
        if ref is None:
            known = sorted(v for n, v in self.versions if n == self.spec.name)
            error = UnknownVersionError("stage", self.spec.name, call.node.version or "", known)
            record = ErrorRecord(node=call.path, stage=self.spec.name, kind="stage", error_type=type(error).__name__,
                                 message=f"the job started on this version: {error}")
            return call.job.with_error(record, fatal=call.node.critical)
        kwargs = {"node": call.node.model_dump(mode="json"), "path": call.path, "finish": finish}
        target = call.task.app.signature(stage_task(ref), args=(call.job.model_dump(mode="json"),), kwargs=kwargs,
                                         queue=stage_queue(ref))
        return call.task.replace(target)

    def execute(self, call: StageCall, finish: Finish | None = None, closer: Closer | None = None) -> Step:
        """Run the stage once per (job, generation, node path, attempt), however often it is delivered.
        With `finish` (the job's last step), a run that completes closes the job in the same round trip
        as its checkpoint. The step's events go to the event log in those round trips."""
        report = self.report(call)
        if call.job.failed:  # a fatal error earlier (inside a fan-out member): pass through
            return self._passed_through(call, outcome.skipped(report))
        if self.guard is None:
            return self._told(report, self._unguarded(call))
        ledger = self.guard.ledger
        # the step's lease: its job's deadline stays one lease ahead while this worker runs it (workers/lease.py)
        begun = ledger.begin(call.job, f"{call.path}#{call.attempt}", call.path, self.hard_limit,
                             *delivery(call.task), report.at + ledger.lease_seconds,
                             running_fields(call.path, self.spec.name), outcome.started(report),
                             source_list(call.task))
        if begun.claim.begin is not Begin.RUN:
            raise Ignore()  # a redelivery or a stale generation: another delivery carries the job on
        with ledger.leased(call.job.job_id, until=report.at + self.hard_limit):
            step = self._told(report, self._claimed(call, begun, report))
            if step.done is None:
                ledger.complete(begun.claim, call.job.job_id, step.events)
                return step
            closing = ledger.closing(step.envelope, finish) if finish is not None else None
            closed = ledger.save(step.envelope, call.path, step.done, begun.claim, step.published, step.events,
                                 closing, closer or Closer.of(call.task))
        return replace(step, closed=closed if closing else None, closing=closing)

    def _passed_through(self, call: StageCall, skipped: StagecoachEvent) -> Step:
        """A step that does not run: its `skipped` outcome goes to the event log now (no claim, so no round
        trip to share), or with the fused task's events when this runs inside one."""
        if self.guard is None:
            return Step(call.job, events=[skipped])
        self.ledger.events.append(call.job.job_id, [skipped])
        return Step(call.job)

    def report(self, call: StageCall) -> outcome.StepReport:
        inputs = call.job.pick(list(self.spec.inputs), call.node.inputs)
        return outcome.StepReport(call.task, call.job, call.path, self.spec.name, inputs, time.time())

    def _told(self, report: outcome.StepReport, step: Step) -> Step:
        """The step with its events: its outcome and the decisions it made."""
        ended = outcome.ended(report, step.envelope)
        return replace(step, events=[ended, *outcome.new_decisions(report.job, step.envelope)])

    def _claimed(self, call: StageCall, begun: Begun, report: outcome.StepReport) -> Step:
        """The step, run by the delivery that claimed it; whatever it raises other than how tasks end ends the
        job as failed (the worker keeps serving)."""
        ledger = self.ledger
        try:
            return self._once(call, begun, report)
        except (*BROKER_DOWN, Reject):
            raise  # Redis went away mid-step: the claim stays, so the message handed back takes it over
        except PASSED_ON:
            ledger.complete(begun.claim, call.job.job_id)
            raise
        except Exception as error:  # a bug, or an input nobody foresaw: the job ends with it, the worker lives
            log.exception("stage %s crashed on job %s", self.spec.name, call.job.job_id)
            return Step(self._failed(call, PermanentStageError(
                self.spec.name, f"the stage crashed: {type(error).__name__}: {error}")))
        except BaseException:
            ledger.complete(begun.claim, call.job.job_id)
            raise

    def _unguarded(self, call: StageCall) -> Step:
        step = self._run(call, 0)
        if step.done is not None:
            self.jobs.publish(call.job.job_id, step.published)
            self.jobs.left(call.job.job_id)
        return step

    def _once(self, call: StageCall, begun: Begun, report: outcome.StepReport) -> Step:
        """The step, now that this delivery owns it: cancelled, replayed from the checkpoint, given up after
        too many deliveries, or run."""
        if begun.cancelled:
            return Step(call.job.with_error(cancelled_record(call.path, self.spec.name), fatal=True))
        deliveries = begun.claim.redeliveries + 1
        if begun.done is None and deliveries > self.ledger.max_deliveries:  # a poison step: it kills its worker
            return Step(self._failed(call, PermanentStageError(self.spec.name, (
                f"its message was delivered {deliveries} times and its worker died each time (a hard time limit, "
                f"out of memory, a crash in native code): the job ends here (STAGECOACH_MAX_DELIVERIES="
                f"{self.ledger.max_deliveries})"))))
        done = begun.done
        if done is not None:  # completed by an earlier generation of this job: no second LM call
            timing = done.timing.model_copy(update={"from_checkpoint": True, "redeliveries": begun.claim.redeliveries})
            return Step(call.job.with_output(call.path, done.outputs, timing, done.usage, call.node.outputs,
                                             trace=done.trace))
        return self._run(call, begun.claim.redeliveries, entered=True, report=report, claim=begun.claim)

    def _run(self, call: StageCall, redeliveries: int, entered: bool = False,
             report: "outcome.StepReport | None" = None, claim: "Claim | None" = None) -> Step:
        """The stage call; `entered`: the job's status already names this step (written with the claim)."""
        if not entered:
            self.jobs.entered(call.job.job_id, call.path, self.spec.name)
        throttled = self._wait_turn()
        try:
            run = self.runner.run(call.job.pick(list(self.spec.inputs), call.node.inputs), call.node.lm,
                                  call.job.candidates.get(self.spec.name))
        except SoftTimeLimitExceeded:
            return Step(self._failed(call, StageTimeoutError(self.spec.name, "time limit exceeded")))
        except StageError as error:
            if isinstance(error.__cause__, SoftTimeLimitExceeded):  # the runner wraps what the module raised
                return Step(self._failed(call, StageTimeoutError(self.spec.name, "time limit exceeded")))
            if error.retryable and call.attempt < self.spec.retry.max_retries:
                self._retry(call, error, report, claim)
            return Step(self._failed(call, error))
        timing = self.timing(call, call.path, run, self.spec).model_copy(
            update={"redeliveries": redeliveries, "throttled_seconds": throttled})
        self._spent(run.usage)
        out, final = self._done(call, run, timing)
        return Step(out, Done(run.outputs, timing, run.usage, run.trace), published=final)

    def _done(self, call: StageCall, run: StageRun, timing: StageTiming) -> tuple[Envelope, dict[str, Any]]:
        """Fold a successful run into the envelope; also the answer fields that are final now, to publish."""
        done = call.job.with_output(call.path, run.outputs, timing, run.usage, call.node.outputs, run.cached_usage,
                                    run.trace)
        return done, final_fields(call.job, done, {call.node.outputs.get(name, name) for name in run.outputs})

    def _wait_turn(self) -> float:
        """The stage's shared rate limit, if it has one: wait for a slot (logged while throttled)."""
        if self.guard is None or self.spec.rate_limit is None:
            return 0.0
        return self.guard.limiter.wait_turn(self.spec.name, self.spec.rate_limit)

    def _spent(self, usage: Usage | None) -> None:
        if self.guard is not None and self.spec.rate_limit is not None and usage is not None:
            self.guard.limiter.spent(self.spec.name, self.spec.rate_limit,
                                     usage.prompt_tokens + usage.completion_tokens)

    def timing(self, call: StageCall, path: str, run: StageRun, spec: StageSpec,
               shared: str | None = None) -> StageTiming:
        return StageTiming(node=path, stage=spec.name, identity=spec.identity, worker=call.worker,
                           started_at=run.started_at, seconds=run.seconds, attempts=call.attempt + 1,
                           cached=run.cached, cache=run.cache, shared_call=shared)

    def _retry(self, call: StageCall, error: StageError, report: "outcome.StepReport | None",
               claim: "Claim | None") -> NoReturn:
        """Send the task again after a backoff, with this attempt logged in the envelope and told (its
        claim done, the retry on the event log); `task.retry` raises Celery's Retry,
        which ends this run."""
        if report is not None:
            retry = outcome.retried(report, error.kind, str(error))
            if claim is not None:
                self.ledger.complete(claim, call.job.job_id, [retry])
        logged = call.job.with_error(self.record(call, error), fatal=False)
        policy = self.spec.retry
        countdown = min(policy.backoff_seconds * 2 ** call.attempt, policy.backoff_max_seconds)
        call.task.retry(args=(logged.model_dump(mode="json"),), kwargs=call.retry_kwargs(), countdown=countdown)
        raise AssertionError("unreachable: Task.retry raises")

    def _failed(self, call: StageCall, error: StageError) -> Envelope:
        self.jobs.left(call.job.job_id)
        return recover(call.job, call.node, call.path, self.spec, self.record(call, error), self.fallbacks,
                       call.worker)

    def record(self, call: StageCall, error: StageError) -> ErrorRecord:
        return ErrorRecord(node=call.path, stage=self.spec.name, kind=error.kind,  # type: ignore[arg-type]
                           error_type=type(error).__name__, message=str(error), retryable=error.retryable,
                           attempts=call.attempt + 1, fields=error.fields)


def final_fields(before: Envelope, after: Envelope, written: set[str]) -> dict[str, Any]:
    """Fields the job publishes early (`JobHandle.output`) that this step wrote."""
    return {name: after.state[name] for name in before.publish if name in written}
