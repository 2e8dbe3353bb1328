"""The proxy program DSPy's optimisers tune: predictors that mirror the stages, a forward that is one job.

`FleetProgram` holds, as sub-modules named after the stages, instances of the stages' own DSPy modules
(loaded from the catalog as a worker loads them), so `named_predictors()`, `deepcopy()`,
`reset_copy()`, `dump_state()` and the program-aware proposer see what they would see in-process. Its
`forward` never calls them: it sends one job whose request names, per stage, the state of that stage's
module (instructions and demos, uploaded once by digest) and the LM settings the optimiser set for the
call, waits for the JobResult, and rebuilds `dspy.settings.trace` from the predictor calls the workers
recorded, so BootstrapFewShot's demos, `metric(example, pred, trace)` and GEPA's reflective dataset
work as they do in-process.
"""

import threading
import time
from collections.abc import Callable
from typing import Any

import dspy

from contracts.candidates import CandidateLM, StageCandidate, TraceStep
from contracts.envelope import Usage
from contracts.jobs import JobResult
from optimize.journal import Evaluation, Journal, evaluation_key
from routing.client import Client
from routing.errors import JobTimeoutError
from workers.candidates import CandidateStore

WAIT_SLICE = 0.5  # seconds a wait for a result lasts before it checks whether the run was stopped


class EvaluationError(RuntimeError):
    """An evaluation job failed (or timed out): the optimiser counts it as a failed example."""


class EvaluationStopped(EvaluationError):
    """The run was stopped (Ctrl-C): evaluations still waiting end at once."""


class FleetRunner:
    """Runs a proxy program's calls as jobs on the fleet. Shared by every copy of the program (an
    optimiser deep-copies programs freely: `__deepcopy__` keeps this one object)."""

    def __init__(self, client: Client, pipeline: str, store: CandidateStore, journal: Journal,
                 job_timeout: float = 600.0, on_evaluation: Callable[[Evaluation, bool], None] | None = None) -> None:
        self.client = client
        self.pipeline = pipeline
        self.store = store
        self.journal = journal
        self.job_timeout = job_timeout
        self.on_evaluation = on_evaluation or (lambda evaluation, replayed: None)
        self.stopped = threading.Event()
        self.usage = Usage()
        self.jobs = 0
        self.replayed = 0
        self.failed = 0
        self._flying: set[str] = set()
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> "FleetRunner":
        return self

    def evaluate(self, program: "FleetProgram", inputs: dict[str, Any]) -> dspy.Prediction:
        """The program's answer for `inputs`: from the journal, else from a job; the trace rebuilt."""
        if self.stopped.is_set():
            raise EvaluationStopped("the optimisation was stopped")
        candidates = {name: self.candidate(module) for name, module in program.stage_modules()}
        key = evaluation_key(self.pipeline, inputs, candidates)
        evaluation = self.journal.get(key)
        if evaluation is None:
            evaluation = self._run(key, inputs, candidates)
        else:
            with self._lock:
                self.replayed += 1
            self.on_evaluation(evaluation, True)
        program.replay_trace(evaluation.traces)
        return dspy.Prediction(**evaluation.answer)

    def candidate(self, module: dspy.Module) -> StageCandidate:
        """A stage module's state (uploaded once) and the LM settings in force for this call: its
        predictors' own LM if an optimiser set one (SIMBA does), else the context's (BootstrapFewShot's
        rounds copy it with a temperature and a rollout id)."""
        state = {name: {**param.dump_state(), "lm": None} for name, param in module.named_parameters()}
        own = [p.lm for _, p in module.named_predictors() if p.lm is not None]
        lm = own[0] if own else dspy.settings.lm
        kwargs = getattr(lm, "kwargs", {}) or {}
        settings = CandidateLM(temperature=kwargs.get("temperature"), rollout_id=kwargs.get("rollout_id"))
        return StageCandidate(state=self.store.put(state), lm=settings)

    def stop(self) -> None:
        """Stop: waiting evaluations end at once and jobs still running are cancelled (their next stage
        ends them; a stage already running finishes and lands in the shared cache)."""
        self.stopped.set()
        with self._lock:
            flying = list(self._flying)
        for job_id in flying:
            self.client.ledger.checkpoints.cancel(job_id)  # as `stagecoach cancel` does

    def _run(self, key: str, inputs: dict[str, Any], candidates: dict[str, StageCandidate]) -> Evaluation:
        handle = self.client.submit(self.pipeline, inputs, candidates=candidates)
        with self._lock:
            self._flying.add(handle.id)
        try:
            result = self._wait(handle.id)
            if not result.ok:
                message = result.error.message if result.error else result.state
                raise EvaluationError(f"evaluation job {result.job_id} failed: {message}")
        except EvaluationStopped:
            raise
        except EvaluationError:
            with self._lock:
                self.failed += 1  # failed or timed out: the optimiser counts it as a failed example
            raise
        finally:
            with self._lock:
                self._flying.discard(handle.id)
        evaluation = Evaluation(key=key, job_id=result.job_id, answer=result.answer, traces=result.traces,
                                usage=result.total_usage, seconds=result.seconds)
        self.journal.add(evaluation)
        with self._lock:
            self.jobs += 1
            self.usage = self.usage.plus(evaluation.usage)
        self.on_evaluation(evaluation, False)
        return evaluation

    def _wait(self, job_id: str) -> JobResult:
        handle = self.client.handle(job_id)
        deadline = time.monotonic() + self.job_timeout
        while True:
            if self.stopped.is_set():
                raise EvaluationStopped(f"the optimisation was stopped while job {job_id} ran")
            try:
                return handle.get(timeout=WAIT_SLICE)
            except JobTimeoutError:
                if time.monotonic() > deadline:
                    raise EvaluationError(f"evaluation job {job_id} not finished after {self.job_timeout:g}s") from None


class FleetProgram(dspy.Module):
    """A pipeline as a DSPy program: one sub-module per optimised stage (the stage's own module, by the
    stage's name), in pipeline order; a call is one job on the fleet."""

    def __init__(self, runner: FleetRunner, stages: dict[str, dspy.Module]) -> None:
        super().__init__()
        self._fleet = runner
        self._stage_names = list(stages)
        for name, module in stages.items():
            if hasattr(self, name):
                raise ValueError(f"stage '{name}' cannot be optimised under that name: it clashes with an attribute "
                                 "of dspy.Module")
            setattr(self, name, module)

    def forward(self, **inputs: Any) -> dspy.Prediction:
        return self._fleet.evaluate(self, inputs)

    def stage_modules(self) -> list[tuple[str, dspy.Module]]:
        return [(name, getattr(self, name)) for name in self._stage_names]

    def replay_trace(self, steps: list[TraceStep]) -> None:
        """Append the workers' predictor calls to `dspy.settings.trace` as this program's own predictors
        would have (Predict._forward_postprocess), when a trace is being collected."""
        trace = dspy.settings.trace
        if trace is None or dspy.settings.max_trace_size <= 0:
            return
        predictors = {name: dict(module.named_predictors()) for name, module in self.stage_modules()}
        for step in steps:
            predictor = predictors.get(step.stage, {}).get(step.predictor)
            if predictor is None:
                continue
            if len(trace) >= dspy.settings.max_trace_size:
                trace.pop(0)
            trace.append((predictor, dict(step.inputs), dspy.Prediction(**step.outputs)))
