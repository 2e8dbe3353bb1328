"""Run one stage: contract in, DSPy module call (or the shared cache), contract out.

The runner never touches Celery; the task wraps it. Inputs are validated against the stage's
input contract; a cacheable call is looked up in the fleet-wide cache (workers/cache.py) by a
key over the stage, its LM settings and those inputs; otherwise the module is called under
`dspy.context` with this stage's LM, the prediction is checked against the output contract, and
only then stored in the cache and allowed to join the job's state.
"""

import importlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.usage_tracker import track_usage

from contracts.candidates import StageCandidate, TraceStep
from contracts.envelope import Usage
from contracts.errors import ContractError
from contracts.fields import validate
from contracts.specs import LMOverride, StageSpec
from workers.cache import StageCache, cache_digest, cacheable
from workers.candidates import CandidatePrograms, CandidateStore, lm_override, traced
from workers.cost import usage_of
from workers.errors import (
    ModuleLoadError,
    PermanentStageError,
    RetryableStageError,
    StageContractError,
    StageError,
    StageTimeoutError,
    is_timeout,
    is_transient,
)
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings


@dataclass(frozen=True)
class StageRun:
    outputs: dict[str, Any]
    usage: Usage
    started_at: float
    seconds: float
    cached: bool = False
    cached_usage: Usage | None = None  # what the calls served from the cache once cost
    cache: Literal["shared", "dspy"] | None = None  # which cache served it
    trace: list[TraceStep] | None = None  # a candidate's run: its predictor calls (contracts/candidates.py)


class LMCallCounter(BaseCallback):
    """Counts LM calls (cache hits included): DSPy's usage tracker skips its own cache hits, so
    calls made with no tracked usage were replayed by DSPy's cache."""

    def __init__(self) -> None:
        self.calls = 0

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.calls += 1


def load_program(spec: StageSpec) -> dspy.Module:
    """Instantiate the stage's DSPy module from its import path, with saved state if named."""
    target = import_target(spec)
    program = _instantiate(spec, target)
    if spec.state:
        try:
            program.load(spec.state)
        except Exception as error:
            raise ModuleLoadError(spec.name, f"cannot load saved state {spec.state}: {error}") from error
    return program


def import_target(spec: StageSpec) -> Any:
    """What `spec.module` names: a dspy.Signature, a dspy.Module subclass or a factory."""
    module_name, _, attr = spec.module.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ModuleLoadError(spec.name, f"cannot import {spec.module}: {error}") from error
    return target


def _instantiate(spec: StageSpec, target: Any) -> dspy.Module:
    if isinstance(target, type) and issubclass(target, dspy.Signature):
        return dspy.ChainOfThought(target) if spec.program == "chain_of_thought" else dspy.Predict(target)
    program = target(**spec.options)
    if not isinstance(program, dspy.Module):
        raise ModuleLoadError(spec.name, f"{spec.module} did not give a dspy.Module (got {type(program)})")
    return program


# Helper threads for bounded calls, reused (starting a thread per call cost more than the bookkeeping);
# the pool only grows past the busy ones when calls were abandoned at their time limit.
CALL_THREADS = ThreadPoolExecutor(max_workers=512, thread_name_prefix="stage-call")


class StageRunner:
    """Calls one stage's module; one program instance per thread (modules hold call state).

    With a `time_limit` the LM's HTTP timeout is clipped to it, which bounds a signature stage (one LM
    call); any other module's call runs in a helper thread the caller waits on for at most that long,
    so the limit holds in every pool (Celery's thread pool enforces none).
    """

    def __init__(self, spec: StageSpec, lm_settings: LMSettings, cache: StageCache | None = None,
                 time_limit: float | None = None, candidates: CandidateStore | None = None) -> None:
        self.spec = spec
        self.lm_settings = lm_settings
        self.cache = cache
        self.time_limit = time_limit
        self._adapter = adapter_for(lm_settings)
        self._lms: dict[str, dspy.LM] = {}
        self._signature_stage: bool | None = None  # see _lm_bound
        self._local = threading.local()
        self._candidates = CandidatePrograms(candidates, spec.name, lambda: load_program(spec)) if candidates else None

    def program(self) -> dspy.Module:
        if not hasattr(self._local, "program"):
            self._local.program = load_program(self.spec)
        return self._local.program  # type: ignore[no-any-return]

    def run(self, inputs: dict[str, Any], override: LMOverride | None = None,
            candidate: StageCandidate | None = None) -> StageRun:
        """The stage call; with a `candidate` (an optimiser's, for this job only) its state and LM settings
        apply, and the run records its predictor calls (`StageRun.trace`)."""
        checked = self._check(f"stage '{self.spec.name}' inputs", self.spec.inputs, inputs)
        started = time.time()
        override = _merge(override, lm_override(candidate))
        digest = self._cache_digest(checked, _merge(self.spec.lm, override), candidate)
        hit = self.cache.get(self.spec.versioned_name, digest, self.spec.cache.ttl) if self.cache and digest else None
        if hit is not None and (candidate is None or hit.trace is not None):
            return StageRun(hit.outputs, Usage(), started, time.time() - started, cached=True, cached_usage=hit.usage,
                            cache="shared", trace=hit.trace)
        run = self._fresh(checked, override, started, candidate)
        if self.cache and digest:  # a DSPy replay is stored too, with the usage known (none)
            self.cache.put(self.spec.versioned_name, digest, run.outputs, run.usage, self.spec.cache.ttl, run.trace)
        return run

    def _fresh(self, inputs: dict[str, Any], override: LMOverride | None, started: float,
               candidate: StageCandidate | None = None) -> StageRun:
        counter = LMCallCounter()
        trace: list[TraceStep] | None = [] if candidate is not None else None
        prediction, usage = self._call(inputs, override, counter, candidate, trace)
        seconds = time.time() - started
        outputs = self._check(f"stage '{self.spec.name}' outputs", self.spec.outputs, self._fields(prediction))
        replayed = counter.calls > 0 and usage.calls == 0  # every LM call answered by DSPy's own cache
        return StageRun(outputs, usage, started, seconds, cached=replayed, cache="dspy" if replayed else None,
                        trace=trace)

    def _cache_digest(self, inputs: dict[str, Any], lm: LMOverride | None,
                      candidate: StageCandidate | None = None) -> str | None:
        """The cache key digest for this call, or None when the call must not be cached. A candidate's
        state digest replaces the spec's (and marks the entry as one that holds a trace)."""
        if self.cache is None:
            return None
        identity = lm_identity(self.lm_settings, lm)
        if not cacheable(self.spec, identity):
            return None
        return cache_digest(self.spec, identity, inputs, candidate.state or "base" if candidate else None)

    def _check(self, where: str, fields: Any, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return validate(where, fields, data)
        except ContractError as error:
            raise StageContractError(self.spec.name, str(error), [p.field for p in error.problems]) from None

    def _call(self, inputs: dict[str, Any], override: LMOverride | None, counter: LMCallCounter,
              candidate: StageCandidate | None = None,
              trace: list[TraceStep] | None = None) -> tuple[dspy.Prediction, Usage]:
        chosen = _merge(self.spec.lm, override)
        lm_timeout = (chosen.timeout if chosen and chosen.timeout else None) or self.lm_settings.timeout
        clipped = self.time_limit is not None and lm_timeout >= self.time_limit
        if clipped:
            chosen = (chosen or LMOverride()).model_copy(update={"timeout": self.time_limit})
        lm = self._lm(chosen)
        state = candidate.state if candidate else None
        try:
            if state is not None:
                return self._candidate_call(lm, inputs, counter, state, trace)
            return self._bounded(lambda: self._predict(lm, inputs, counter, trace=trace))
        except StageError:
            raise
        except Exception as error:
            if is_timeout(error):
                raise self._timeout(lm_timeout, clipped, error) from error
            raise _classify(self.spec.name, error) from error

    def _lm(self, chosen: LMOverride | None) -> dspy.LM:
        """The LM for these overrides, remembered per runner (`lm_for` keys on a dump of the settings)."""
        key = chosen.model_dump_json() if chosen else ""
        lm = self._lms.get(key)
        if lm is None:
            lm = self._lms[key] = lm_for(self.lm_settings, chosen)
        return lm

    def _predict(self, lm: dspy.LM, inputs: dict[str, Any], counter: LMCallCounter,
                 program: dspy.Module | None = None,
                 trace: list[TraceStep] | None = None) -> tuple[dspy.Prediction, Usage]:
        # the counter only tells DSPy-cache replays apart; with DSPy's cache off there are none, and a
        # callback makes every DSPy call dearer. Our own usage tracker keeps one entry per LM call
        # (the prediction's `get_lm_usage()` only has totals per model).
        callbacks = [counter] if self.lm_settings.cache else []
        program = self.program() if program is None else program
        with dspy.context(lm=lm, adapter=self._adapter, track_usage=True, callbacks=callbacks), \
                track_usage() as tracker:
            if trace is None:
                prediction = program(**inputs)
            else:
                with traced(program, self.spec.name) as steps:
                    prediction = program(**inputs)
                trace.extend(steps)
        return prediction, usage_of(dict(tracker.usage_data))

    def _candidate_call(self, lm: dspy.LM, inputs: dict[str, Any], counter: LMCallCounter, state: str,
                        trace: list[TraceStep] | None) -> tuple[dspy.Prediction, Usage]:
        """The call on this thread's instance of the candidate program (never the stage's own instance)."""
        assert self._candidates is not None, "a worker that runs candidates has a candidate store"
        program = self._candidates.get(state)
        try:
            return self._bounded(lambda: self._predict(lm, inputs, counter, program, trace), program)
        except StageTimeoutError:
            self._candidates.forget(state)  # the abandoned call may still use it
            raise

    def _bounded(self, call: Callable[[], tuple[dspy.Prediction, Usage]],
                 candidate: dspy.Module | None = None) -> tuple[dspy.Prediction, Usage]:
        """`call()` on a helper thread, waited on for at most the time limit. Not in a prefork child (the
        task runs on its main thread): Celery enforces soft and hard limits there itself, by signals."""
        if self.time_limit is None or threading.current_thread() is threading.main_thread() or self._lm_bound():
            return call()
        program = self.program() if candidate is None else None  # the helper uses this thread's program instance

        def work() -> tuple[dspy.Prediction, Usage]:
            if program is not None:
                self._local.program = program
            return call()

        future = CALL_THREADS.submit(work)
        try:
            return future.result(self.time_limit)
        except FutureTimeout:  # abandoned: it ends when its LM call does (the LM timeout is clipped too)
            if candidate is None:
                del self._local.program  # it may still use that instance; the next call gets a fresh one
            raise StageTimeoutError(self.spec.name, self._limit_text()) from None

    def _lm_bound(self) -> bool:
        """Whether the LM call is all a call waits on, so its HTTP timeout (clipped to the time limit in
        `_call`) bounds the stage without a deadline thread: a stage whose module is a DSPy signature,
        which Stagecoach runs as one Predict or ChainOfThought call through a JSON adapter (no parse
        fallback: one LM call). A module class or factory may run any code, and an adapter that may make
        two LM calls (the local model's) could take twice the limit, so those get the thread."""
        if self._signature_stage is None:
            try:
                target = import_target(self.spec)
            except ModuleLoadError:
                target = None
            one_call = not getattr(self._adapter, "may_call_twice", False)  # PlainFirstAdapter: answer, then rest
            self._signature_stage = one_call and isinstance(target, type) and issubclass(target, dspy.Signature)
        return self._signature_stage

    def _limit_text(self) -> str:
        return (f"time limit of {self.time_limit:g}s exceeded (the stage's `time_limit`, default "
                "STAGECOACH_STAGE_TIME_LIMIT)")

    def _timeout(self, lm_timeout: float, clipped: bool, error: Exception) -> StageError:
        if clipped:
            return StageTimeoutError(self.spec.name, self._limit_text())
        return RetryableStageError(self.spec.name, (
            f"LM Timeout: no reply within {lm_timeout:g}s; raise STAGECOACH_LM_TIMEOUT (or the stage's `lm.timeout`) "
            f"if the model needs longer ({type(error).__name__})"))

    def _fields(self, prediction: Any) -> dict[str, Any]:
        data = prediction.toDict() if hasattr(prediction, "toDict") else dict(prediction)
        return {name: data[name] for name in self.spec.outputs if name in data}


def _merge(base: LMOverride | None, top: LMOverride | None) -> LMOverride | None:
    if base is None or top is None:
        return top or base
    return base.model_copy(update=top.model_dump(exclude_none=True))


def _classify(stage: str, error: Exception) -> StageError:
    message = f"{type(error).__name__}: {error}"
    if is_transient(error):
        return RetryableStageError(stage, message)
    return PermanentStageError(stage, message)


def lm_identity(settings: LMSettings, lm: LMOverride | None) -> dict[str, Any]:
    """What about the LM determines an answer: model, server, sampling settings and the adapter."""
    chosen = lm.model_dump(exclude_none=True) if lm else {}
    return {
        "model": chosen.get("model", settings.model),
        "api_base": chosen.get("api_base") or settings.resolved_api_base,
        "temperature": chosen.get("temperature", settings.temperature),
        "max_tokens": chosen.get("max_tokens", settings.max_tokens),
        "rollout_id": chosen.get("rollout_id"),
        "adapter": type(adapter_for(settings)).__name__,
        "structured": settings.structured,
    }
