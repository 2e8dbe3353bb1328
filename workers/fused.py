"""Fused runs: adjacent stages of a sequence in turn in one task, one hop instead of several.

Each stage is recorded (output, timing, usage, errors) exactly as if it had run alone, and each
is a once-only step of its own in the job ledger; pairs of `fusible: lm` stages share one merged
LM call (workers/fusion.py).
"""

import threading
from dataclasses import replace
from typing import Any

from celery import Task

from contracts.envelope import Envelope, ErrorRecord
from contracts.errors import UnknownVersionError
from contracts.events import StagecoachEvent
from contracts.names import split_ref
from contracts.specs import StageNode, StageSpec
from workers import outcome
from workers.cache import StageCache
from workers.executor import StageCall, StageExecutor, Step, final_fields
from workers.fusion import MergedRunner, mergeable, merged_call, merged_spec, split
from workers.jobs import JobStore
from workers.ledger import Ledger
from workers.outcome import StepReport
from workers.settings import Settings
from workers.stage import StageRun


class FusedExecutor:
    def __init__(self, executors: dict[str, StageExecutor], versions: dict[tuple[str, str], str],
                 settings: Settings, cache: StageCache | None) -> None:
        self.executors = executors
        self.versions = versions
        self.settings = settings
        self.cache = cache
        self._merged: dict[tuple[str, str], MergedRunner] = {}
        self._lock = threading.Lock()

    @property
    def ledger(self) -> Ledger:
        return next(iter(self.executors.values())).ledger

    def execute(self, task: Task, job: Envelope, steps: list[dict[str, Any]]) -> Envelope:
        index = 0
        while index < len(steps):
            # a retry resumes at this step: the stages before it are in the envelope already (a
            # `finish` argument rides along: StageCall.retry_kwargs keeps it)
            resume = {"steps": steps[index:]}
            calls = [(StageNode.model_validate(s["node"]), s["path"]) for s in steps[index:index + 2]]
            executors = [self._executor(node) for node, _ in calls]
            first = executors[0]
            if first is None:
                return job.with_error(self._unknown(*calls[0]), fatal=calls[0][0].critical)
            pair = self._pair(calls, executors) if not job.candidates else None  # a candidate runs its own program
            if pair is not None:
                job = self._run_pair(task, job, pair, calls, resume)
                index += 2
            else:
                job = self._run_one(StageCall(task, job, calls[0][0], calls[0][1], resume), first)
                index += 1
        return job

    def _run_one(self, call: StageCall, executor: StageExecutor) -> Envelope:
        return executor.execute(call).envelope

    def _run_pair(self, task: Task, job: Envelope, pair: "PairExecutor", calls: list[tuple[StageNode, str]],
                  resume: dict[str, Any]) -> Envelope:
        """One merged call, told (event log, monitor) as the two stages it stands for. A merged call has no
        claim of its own (its stages' outputs are the fused task's to keep): its events go in a round trip
        of their own."""
        (node_a, _), (node_b, _) = calls
        step = pair.execute(StageCall(task, job, merged_call(pair.spec, node_a, node_b), calls[0][1], resume))
        self.ledger.checkpoints.events.append(job.job_id, step.events)
        return step.envelope

    def _pair(self, calls: list[tuple[StageNode, str]], executors: list[StageExecutor | None]) -> "PairExecutor | None":
        if len(calls) < 2 or executors[1] is None or executors[0] is None:
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

    def _executor(self, node: StageNode) -> StageExecutor | None:
        name, pinned = split_ref(node.stage)
        version = node.version or pinned
        ref = self.versions.get((name, version)) if version else name
        return self.executors.get(ref or "")

    def _unknown(self, node: StageNode, path: str) -> ErrorRecord:
        name, pinned = split_ref(node.stage)
        known = sorted(v for n, v in self.versions if n == name)
        error = UnknownVersionError("stage", name, node.version or pinned or "?", known)
        return ErrorRecord(node=path, stage=name, kind="stage", error_type=type(error).__name__, message=str(error))


class PairExecutor(StageExecutor):
    """Runs two stages as one merged LM call and records them as two stages."""

    def __init__(self, runner: MergedRunner, jobs: JobStore, versions: dict[tuple[str, str], str],
                 nodes: tuple[tuple[StageNode, str], tuple[StageNode, str]]) -> None:
        super().__init__(runner, jobs, versions)
        self.pair = (runner.first, runner.second)
        self.nodes = nodes

    def _told(self, report: StepReport, step: Step) -> Step:
        """Each of the two stages told as if it had run alone."""
        events: list[StagecoachEvent] = []
        for (node, path), spec in zip(self.nodes, self.pair, strict=True):
            part = StepReport(report.task, report.job, path, spec.name, report.job.pick(list(spec.inputs), node.inputs),
                              report.at)
            events.append(outcome.ended(part, step.envelope))
        return replace(step, events=events)

    def _done(self, call: StageCall, run: StageRun, timing: Any) -> tuple[Envelope, dict[str, Any]]:
        done = split(call, call.job, run, self.pair, self.nodes, self.timing)
        written = {node.outputs.get(k, k) for (node, _), spec in zip(self.nodes, self.pair, strict=True)
                   for k in spec.outputs}
        return done, final_fields(call.job, done, written)
