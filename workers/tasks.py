"""One Celery task per stage version, named and queued `stage.<ref>` (contracts/names.py).

Tasks are thin: validate the envelope, call the stage runner, serialise. Errors become values in
the envelope (its error log, and `failure` when fatal) rather than exceptions across task
boundaries, so a chain or chord never hangs on a failed member and the job result explains what
went wrong. Transient LM errors are retried with exponential backoff, each attempt logged.
Each outcome (ok, error kind, retry) is also sent as a Celery event for the monitor (workers/outcome.py).
"""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from pydantic import ValidationError

from contracts.deadletters import DeadLetter
from contracts.envelope import Decision, Envelope, ErrorRecord, StageTiming, Usage
from contracts.errors import ContractError, UnknownVersionError
from contracts.fields import problems_of, validate
from contracts.names import FUSED_TASK, split_ref, stage_queue, stage_task
from contracts.specs import StageNode, StageSpec
from workers.cache import StageCache
from workers.candidates import CandidateStore
from workers.checkpoint import Begin, Begun, Checkpoints, Done, delivery, outage_requeues
from workers.deadletter import MAX_RAW_BYTES, DeadLetterStore, quarantine
from workers.errors import StageError, StageTimeoutError
from workers.finish import Closing, Finish, announce, close, closing
from workers.fusion import MergedRunner, mergeable, merged_call, merged_spec, split
from workers.jobs import JobStore, running_fields
from workers.outcome import stage_outcome
from workers.ratelimit import RateLimiter
from workers.settings import Settings
from workers.stage import StageRun, StageRunner

# seconds between a stage's own soft time limit (recorded as a timeout) and the hard kill of its process
STAGE_KILL_GRACE = 30.0
MAX_FUSED_STEPS = 8  # the compiler fuses at most this many stages into one task


def register_stage_tasks(app: Celery, stages: dict[str, StageSpec], settings: Settings, jobs: JobStore) -> None:
    """One task per stage version, named by its catalog ref (`answer`, or `answer@1` for an older one)."""
    cache = StageCache.from_url(settings.backend_url, settings.cache) if settings.cache.enabled else None
    versions = {(spec.name, spec.version): ref for ref, spec in stages.items()}
    dead_letters = DeadLetterStore(redis.Redis.from_url(settings.backend_url), settings.dead_letter_max)
    guard = Guard(Checkpoints.from_url(settings.backend_url, settings.result_expires, settings.watchdog_stall_seconds),
                  RateLimiter(redis.Redis.from_url(settings.backend_url)))
    # each runner holds its stage's time limit in every pool; all of them are there for on_error fallbacks
    candidates = CandidateStore.from_url(settings.backend_url, settings.result_expires)  # optimisation jobs
    runners = {ref: StageRunner(spec, settings.lm, cache, spec.time_limit or settings.stage_time_limit, candidates)
               for ref, spec in stages.items()}
    executors: dict[str, StageExecutor] = {}
    for ref, spec in stages.items():
        hard_limit = (spec.time_limit or settings.stage_time_limit) + STAGE_KILL_GRACE
        executors[ref] = StageExecutor(runners[ref], jobs, versions, guard, hard_limit, runners)
        _register(app, ref, executors[ref], settings, dead_letters)
    _register_fused(app, FusedExecutor(executors, versions, settings, cache), settings)


def _register(app: Celery, ref: str, executor: "StageExecutor", settings: Settings,
              dead_letters: DeadLetterStore) -> None:
    spec = executor.spec
    soft = spec.time_limit or settings.stage_time_limit

    @app.task(
        name=stage_task(ref),
        shared=False,  # this app's task only (a shared task would reach every app a process builds)
        bind=True,
        queue=stage_queue(ref),
        acks_late=True,
        reject_on_worker_lost=True,
        soft_time_limit=soft,
        time_limit=soft + STAGE_KILL_GRACE,
        max_retries=spec.retry.max_retries,
        store_errors_even_if_ignored=True,  # see Compiler.pipeline: a crash fails the job's chain
    )
    def run_stage(self: Task, envelope: dict[str, Any], node: dict[str, Any], path: str,
                  finish: dict[str, Any] | None = None) -> Any:
        job, call = inbound(app, dead_letters, self, envelope, node)
        if call.version is not None and call.version != spec.version:
            return executor.hand_over(self, job, call, path, finish)
        inputs = job.pick(list(spec.inputs), call.inputs)
        ending = Finish.load(finish)  # the pipeline's last stage closes the job itself (workers/finish.py)
        closer = partial(closing, self, finish=ending) if ending is not None else None
        with outage_requeues(f"{self.name} of job {job.job_id}"):
            with stage_outcome(self, spec.name, job, path, inputs) as report:
                step = executor.execute(self, job, call, path, closer=closer)
                out = report(step.envelope)
            if ending is None:
                return out.model_dump(mode="json")
            return announce(self, out, ending, step.closed_by(lambda: close(self, executor.checkpoints, out, ending)))


def inbound(app: Celery, dead_letters: DeadLetterStore, task: Task, envelope: Any,
            node: Any) -> tuple[Envelope, StageNode]:
    """The envelope and node of a stage message; an invalid one is dead-lettered, its job failed,
    and the message rejected (the rest of its chain cannot run without an envelope)."""
    try:
        return Envelope.model_validate(envelope), StageNode.model_validate(node)
    except ValidationError as error:
        problems = "; ".join(str(p) for p in problems_of(error))
        raw = json.dumps({"envelope": envelope, "node": node}, default=str).encode()
        request = task.request
        named = {"task": task.name, "task_id": request.id, "root_id": request.root_id}
        letter = DeadLetter.of(f"{task.name}: invalid envelope or node: {problems}", raw,
                               str((request.delivery_info or {}).get("routing_key") or ""), MAX_RAW_BYTES,
                               {k: v for k, v in named.items() if isinstance(v, str)}, source="task")
        quarantine(app, dead_letters, letter)
        raise Reject(letter.reason, requeue=False) from None


def recovery_decision(path: str, choice: str, record: ErrorRecord, detail: dict[str, Any] | None = None) -> Decision:
    return Decision(node=path, kind="recovery", choice=choice, detail={"error": record.message, **(detail or {})})


def cancelled_record(path: str, stage: str | None) -> ErrorRecord:
    return ErrorRecord(node=path, stage=stage, kind="cancelled", error_type="JobCancelledError",
                       message="job cancelled by an operator (`stagecoach cancel`)")


class Guard:
    """What keeps a stage step once-only and within quota: checkpoints/claims and the rate limiter."""

    def __init__(self, checkpoints: Checkpoints, limiter: RateLimiter) -> None:
        self.checkpoints = checkpoints
        self.limiter = limiter


def _register_fused(app: Celery, fused: "FusedExecutor", settings: Settings) -> None:
    specs = [executor.spec for executor in fused.executors.values()]
    soft = max([s.time_limit or settings.stage_time_limit for s in specs] or [settings.stage_time_limit])
    soft *= MAX_FUSED_STEPS

    @app.task(
        name=FUSED_TASK,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        soft_time_limit=soft,
        time_limit=soft + STAGE_KILL_GRACE,
        max_retries=max([s.retry.max_retries for s in specs] or [0]),
        store_errors_even_if_ignored=True,
    )
    def run_fused(self: Task, envelope: dict[str, Any], steps: list[dict[str, Any]],
                  finish: dict[str, Any] | None = None) -> dict[str, Any]:
        job = Envelope.model_validate(envelope)
        with outage_requeues(f"{self.name} of job {job.job_id}"):
            out = fused.execute(self, job, steps)
            ending = Finish.load(finish)
            if ending is None:
                return out.model_dump(mode="json")
            return announce(self, out, ending, close(self, fused.checkpoints, out, ending))


class FusedExecutor:
    """Runs adjacent stages of a sequence in turn in one task: one hop instead of several. Each
    stage is recorded (output, timing, usage, errors) exactly as if it had run alone; pairs of
    `fusible: lm` stages share one merged LM call (workers/fusion.py)."""

    def __init__(self, executors: dict[str, "StageExecutor"], versions: dict[tuple[str, str], str],
                 settings: Settings, cache: StageCache | None) -> None:
        self.executors = executors
        self.versions = versions
        self.settings = settings
        self.cache = cache
        self._merged: dict[tuple[str, str], MergedRunner] = {}
        self._lock = threading.Lock()
        self.checkpoints = next(iter(executors.values())).checkpoints

    def execute(self, task: Task, job: Envelope, steps: list[dict[str, Any]]) -> Envelope:
        index = 0
        while index < len(steps):
            # a retry resumes at this step: the stages before it are in the envelope already (a
            # `finish` argument rides along: StageExecutor._retry keeps it)
            resume = {"steps": steps[index:]}
            calls = [(StageNode.model_validate(s["node"]), s["path"]) for s in steps[index:index + 2]]
            executors = [self._executor(call) for call, _ in calls]
            if executors[0] is None:
                return job.with_error(self._unknown(*calls[0]), fatal=calls[0][0].critical)
            pair = self._pair(calls, executors, job)
            if pair is not None:
                job = self._run_pair(task, job, pair, calls, resume)
                index += 2
            else:
                job = self._run_one(task, job, executors[0], calls[0], resume)
                index += 1
        return job

    def _run_one(self, task: Task, job: Envelope, executor: "StageExecutor", call: tuple[StageNode, str],
                 resume: dict[str, Any]) -> Envelope:
        node, path = call
        spec = executor.spec
        with stage_outcome(task, spec.name, job, path, job.pick(list(spec.inputs), node.inputs)) as report:
            return report(executor.execute(task, job, node, path, resume=resume).envelope)

    def _run_pair(self, task: Task, job: Envelope, pair: "PairExecutor", calls: list[tuple[StageNode, str]],
                  resume: dict[str, Any]) -> Envelope:
        """One merged call, reported to the monitor as the two stages it stands for."""
        (node_a, path_a), (node_b, path_b) = calls
        a, b = pair.pair
        with stage_outcome(task, a.name, job, path_a, job.pick(list(a.inputs), node_a.inputs)) as report_a, \
                stage_outcome(task, b.name, job, path_b, job.pick(list(b.inputs), node_b.inputs)) as report_b:
            step = pair.execute(task, job, merged_call(pair.spec, node_a, node_b), path_a, resume)
            return report_b(report_a(step.envelope))

    def _pair(self, calls: list[tuple[StageNode, str]], executors: list["StageExecutor | None"],
              job: Envelope) -> "PairExecutor | None":
        if len(calls) < 2 or executors[1] is None or executors[0] is None:
            return None
        if job.candidates:  # an optimiser's candidate runs each stage's own program: no merged call
            return None
        a, b = executors[0].spec, executors[1].spec
        if not mergeable(a, calls[0][0], b, calls[1][0]):
            return None
        runner = self._merged_runner(a, calls[0][0], b, calls[1][0])
        return PairExecutor(runner, executors[0].jobs, self.versions, (calls[0], calls[1]))

    def _merged_runner(self, a: StageSpec, node_a: StageNode, b: StageSpec, node_b: StageNode) -> MergedRunner:
        key = (a.identity + repr(node_a.inputs) + repr(node_a.outputs), b.identity + repr(node_b.inputs))
        with self._lock:
            if key not in self._merged:
                merged = merged_spec(a, node_a, b, node_b)
                self._merged[key] = MergedRunner(a, b, merged, self.settings.lm, self.cache)
            return self._merged[key]

    def _executor(self, call: StageNode) -> "StageExecutor | None":
        name, pinned = split_ref(call.stage)
        version = call.version or pinned
        ref = self.versions.get((name, version)) if version else name
        return self.executors.get(ref or "")

    def _unknown(self, call: StageNode, path: str) -> ErrorRecord:
        name, pinned = split_ref(call.stage)
        known = sorted(v for n, v in self.versions if n == name)
        error = UnknownVersionError("stage", name, call.version or pinned or "?", known)
        return ErrorRecord(node=path, stage=name, kind="stage", error_type=type(error).__name__, message=str(error))


class StageExecutor:
    """Runs a stage for one envelope and folds the outcome (output, retry or error) into it."""

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
    def checkpoints(self) -> Checkpoints:
        assert self.guard is not None, "a merged pair runs inside a fused task, which holds the checkpoints"
        return self.guard.checkpoints

    def hand_over(self, task: Task, job: Envelope, call: StageNode, path: str,
                  finish: dict[str, Any] | None = None) -> Any:
        """The job started on another version of this stage (the catalog changed since): run it there."""
        ref = self.versions.get((self.spec.name, call.version or ""))
        if ref is None:
            known = sorted(v for n, v in self.versions if n == self.spec.name)
            error = UnknownVersionError("stage", self.spec.name, call.version or "", known)
            record = ErrorRecord(node=path, stage=self.spec.name, kind="stage", error_type=type(error).__name__,
                                 message=f"the job started on this version: {error}")
            return job.with_error(record, fatal=call.critical).model_dump(mode="json")
        kwargs = {"node": call.model_dump(mode="json"), "path": path, "finish": finish}
        target = task.app.signature(stage_task(ref), args=(job.model_dump(mode="json"),), kwargs=kwargs,
                                    queue=stage_queue(ref))
        return task.replace(target)

    def execute(self, task: Task, job: Envelope, call: StageNode, path: str,
                resume: dict[str, Any] | None = None, closer: "Callable[[Envelope], Closing] | None" = None) -> "Step":
        """Run the stage once per (job, generation, node path, attempt), however often it is delivered;
        `resume` are the task kwargs a retry is sent with (default: this node). `closer`: this is the
        job's last step, and a run that completes closes the job (what `closer` makes of the final
        envelope) in the same round trip as its checkpoint."""
        if job.failed:
            return Step(job)  # a fatal error earlier: pass through to the end of the pipeline
        if self.guard is None:
            step = self._run(task, job, call, path, resume, 0)
            if step.done is not None:
                self.jobs.publish(job.job_id, step.published)
                self.jobs.left(job.job_id)
            return step
        checkpoints = self.guard.checkpoints
        # past the hard limit (plus the usual stall allowance) the watchdog may re-dispatch the job
        deadline = time.time() + self.hard_limit + checkpoints.stall
        begun = checkpoints.begin(job, f"{path}#{task.request.retries}", path, self.hard_limit, *delivery(task),
                                  deadline, running_fields(path, self.spec.name))
        if begun.claim.begin is not Begin.RUN:
            raise Ignore()  # a redelivery or a stale generation: another delivery carries the job on
        try:
            step = self._once(task, job, call, path, resume, begun)
        except BaseException:
            checkpoints.complete(begun.claim)
            raise
        if step.done is None:
            checkpoints.complete(begun.claim)
            return step
        ending = closer(step.envelope) if closer is not None else None
        # counts the stage once, and publishes its final fields, in the same round trip
        closed = checkpoints.save(step.envelope, path, step.done, begun.claim,
                                  (ending.status, ending.stored) if ending else None, step.published)
        return Step(step.envelope, closed=closed if ending else None, closing=ending)

    def _once(self, task: Task, job: Envelope, call: StageNode, path: str, resume: dict[str, Any] | None,
              begun: Begun) -> "Step":
        """The step, now that this delivery owns it: cancelled, replayed from the checkpoint, or run."""
        if begun.cancelled:
            return Step(job.with_error(cancelled_record(path, self.spec.name), fatal=True))
        done = begun.done
        if done is not None:  # completed by an earlier generation of this job: no second LM call
            timing = done.timing.model_copy(update={"from_checkpoint": True, "redeliveries": begun.claim.redeliveries})
            return Step(job.with_output(path, done.outputs, timing, done.usage, call.outputs, trace=done.trace))
        return self._run(task, job, call, path, resume, begun.claim.redeliveries, entered=True)

    def _run(self, task: Task, job: Envelope, call: StageNode, path: str, resume: dict[str, Any] | None,
             redeliveries: int, entered: bool = False) -> "Step":
        """The stage call; `entered`: the job's status already names this step (written with the claim)."""
        if not entered:
            self.jobs.entered(job.job_id, path, self.spec.name)
        throttled = self._wait_turn()
        try:
            run = self.runner.run(job.pick(list(self.spec.inputs), call.inputs), call.lm,
                                  job.candidates.get(self.spec.name))
        except SoftTimeLimitExceeded:
            return Step(self._failed(job, call, path, StageTimeoutError(self.spec.name, "time limit exceeded"), task))
        except StageError as error:
            if isinstance(error.__cause__, SoftTimeLimitExceeded):  # the runner wraps what the module raised
                return Step(self._failed(job, call, path, StageTimeoutError(self.spec.name, "time limit exceeded"),
                                         task))
            if error.retryable and task.request.retries < self.spec.retry.max_retries:
                self._retry(task, job, path, error, resume or {"node": call.model_dump(mode="json"), "path": path})
            return Step(self._failed(job, call, path, error, task))
        timing = self._timing(task, path, run, self.spec).model_copy(
            update={"redeliveries": redeliveries, "throttled_seconds": throttled})
        self._spent(run.usage)
        out, final = self._done(task, job, call, path, run, timing)
        return Step(out, Done(run.outputs, timing, run.usage, run.trace), published=final)

    def _done(self, task: Task, job: Envelope, call: StageNode, path: str, run: StageRun,
              timing: StageTiming | None = None) -> tuple[Envelope, dict[str, Any]]:
        """Fold a successful run into the envelope; also the answer fields that are final now, to publish."""
        done = job.with_output(path, run.outputs, timing or self._timing(task, path, run, self.spec), run.usage,
                               call.outputs, run.cached_usage, run.trace)
        return done, self._final_fields(job, done, {call.outputs.get(name, name) for name in run.outputs})

    def _wait_turn(self) -> float:
        """The stage's shared rate limit, if it has one: wait for a slot (logged while throttled)."""
        if self.guard is None or self.spec.rate_limit is None:
            return 0.0
        return self.guard.limiter.wait_turn(self.spec.name, self.spec.rate_limit)

    def _spent(self, usage: Usage | None) -> None:
        if self.guard is not None and self.spec.rate_limit is not None and usage is not None:
            self.guard.limiter.spent(self.spec.name, self.spec.rate_limit,
                                     usage.prompt_tokens + usage.completion_tokens)

    def _timing(self, task: Task, path: str, run: StageRun, spec: StageSpec, shared: str | None = None) -> StageTiming:
        return StageTiming(
            node=path,
            stage=spec.name,
            identity=spec.identity,
            worker=task.request.hostname or "",
            started_at=run.started_at,
            seconds=run.seconds,
            attempts=task.request.retries + 1,
            cached=run.cached,
            cache=run.cache,
            shared_call=shared,
        )

    def _final_fields(self, before: Envelope, after: Envelope, written: set[str]) -> dict[str, Any]:
        """Fields the job publishes early (`JobHandle.output`) that this step wrote."""
        return {name: after.state[name] for name in before.publish if name in written}

    def _retry(self, task: Task, job: Envelope, path: str, error: StageError, kwargs: dict[str, Any]) -> NoReturn:
        """Send the task again after a backoff, with this attempt logged in the envelope; `task.retry`
        raises Celery's Retry, which ends this run."""
        logged = job.with_error(self._record(path, error, task), fatal=False)
        finish = (task.request.kwargs or {}).get("finish")
        if finish is not None:  # the job's last stage: its retry closes the job too
            kwargs = {**kwargs, "finish": finish}
        policy = self.spec.retry
        countdown = min(policy.backoff_seconds * 2 ** task.request.retries, policy.backoff_max_seconds)
        task.retry(args=(logged.model_dump(mode="json"),), kwargs=kwargs, countdown=countdown)
        raise AssertionError("unreachable: Task.retry raises")

    def _failed(self, job: Envelope, call: StageNode, path: str, error: StageError, task: Task) -> Envelope:
        """Retries are spent: the stage's `on_error` strategy decides what the job does next."""
        self.jobs.left(job.job_id)
        record = self._record(path, error, task)
        policy = self.spec.on_error
        if policy.strategy == "fail":
            return job.with_error(record, fatal=call.critical)
        logged = job.with_error(record, fatal=False)
        if policy.strategy == "skip":
            return logged.with_decision(recovery_decision(path, "skip", record))
        if policy.value is not None:
            return self._fallback_value(logged, call, path, record, policy.value)
        return self._fallback_stage(logged, call, path, record, task)

    def _fallback_value(self, job: Envelope, call: StageNode, path: str, record: ErrorRecord,
                        value: dict[str, Any]) -> Envelope:
        try:
            outputs = validate(f"stage '{self.spec.name}' on_error fallback value", self.spec.outputs, value)
        except ContractError as bad:
            return job.with_error(ErrorRecord(node=path, stage=self.spec.name, kind="contract",
                                              error_type="ContractError", message=str(bad)), fatal=call.critical)
        decided = job.with_decision(recovery_decision(path, "fallback", record, {"value": outputs}))
        return decided.with_output(path, outputs, rename=call.outputs)

    def _fallback_stage(self, job: Envelope, call: StageNode, path: str, record: ErrorRecord, task: Task) -> Envelope:
        name = str(self.spec.on_error.stage)
        runner = self.fallbacks[name]
        decided = job.with_decision(recovery_decision(path, "fallback", record, {"stage": name}))
        try:
            run = runner.run(job.pick(list(runner.spec.inputs)))  # its own contract's fields, by name
        except StageError as error:  # the fallback failed too: that ends it
            failed = ErrorRecord(node=path, stage=name, kind=error.kind,  # type: ignore[arg-type]
                                 error_type=type(error).__name__, message=f"fallback stage '{name}': {error}",
                                 fields=error.fields)
            return decided.with_error(failed, fatal=call.critical)
        timing = StageTiming(node=path, stage=name, identity=runner.spec.identity, worker=task.request.hostname or "",
                             started_at=run.started_at, seconds=run.seconds)
        return decided.with_output(path, run.outputs, timing, run.usage, call.outputs)

    def _record(self, path: str, error: StageError, task: Task) -> ErrorRecord:
        return ErrorRecord(
            node=path,
            stage=self.spec.name,
            kind=error.kind,  # type: ignore[arg-type]
            error_type=type(error).__name__,
            message=str(error),
            retryable=error.retryable,
            attempts=task.request.retries + 1,
            fields=error.fields,
        )


@dataclass(frozen=True)
class Step:
    """What a stage step leaves: the envelope; `done`, the completed run to checkpoint (None when the
    stage did not run: failed, cancelled, replayed, passed through); `closed`, whether saving it closed
    the job (None: closing was not asked for, or not attempted)."""

    envelope: Envelope
    done: Done | None = None
    closed: bool | None = None
    published: dict[str, Any] = field(default_factory=dict)  # answer fields final now (`JobHandle.output`)
    closing: Closing | None = None  # what closed the job, when saving the step did

    def closed_by(self, close_now: Callable[[], Closing]) -> Closing:
        """How the job was closed: by this step's save, or now by `close_now` (the step did not save:
        it failed, was cancelled, replayed or passed through). Ignore when another delivery closed it."""
        if self.closed is None:
            return close_now()
        if not self.closed or self.closing is None:
            raise Ignore()
        return self.closing


class PairExecutor(StageExecutor):
    """Runs two stages as one merged LM call and records them as two stages."""

    def __init__(self, runner: MergedRunner, jobs: JobStore, versions: dict[tuple[str, str], str],
                 nodes: tuple[tuple[StageNode, str], tuple[StageNode, str]]) -> None:
        super().__init__(runner, jobs, versions)
        self.pair = (runner.first, runner.second)
        self.nodes = nodes

    def _done(self, task: Task, job: Envelope, call: StageNode, path: str, run: StageRun,
              timing: StageTiming | None = None) -> tuple[Envelope, dict[str, Any]]:
        done = split(task, job, run, self.pair, self.nodes, self._timing)
        written = {node.outputs.get(k, k) for (node, _), spec in zip(self.nodes, self.pair, strict=True)
                   for k in spec.outputs}
        return done, self._final_fields(job, done, written)
