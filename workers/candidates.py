"""Candidate programs on workers: the state store, a candidate's program instance and its trace.

An optimiser in the client (`stagecoach optimize`) uploads each candidate state once, by its sha256
(`CandidateStore.put`); a job names it per stage (contracts/candidates.py). A worker reads the state
once per process (content-addressed, so never stale), loads it into a program instance of its own
(one per thread and digest, never the stage's shared instance: a candidate cannot leak into another
job), and records the predictor calls of that run (`traced`) so the job can send them back.
"""

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dspy
import redis
from pydantic_core import to_jsonable_python

from contracts.candidates import CandidateLM, StageCandidate, TraceStep, canonical, state_digest
from contracts.connections import SentinelSettings, redis_client
from contracts.names import candidate_key
from contracts.specs import LMOverride
from workers.errors import PermanentStageError, RetryableStageError

PROGRAMS_PER_THREAD = 16  # candidate program instances a thread keeps (an optimiser cycles through a few)
STATES_PER_PROCESS = 256


class CandidateStore:
    """Candidate states in Redis by digest, with a per-process memo (a digest names one content forever)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self._memo: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, ttl: int, sentinel: SentinelSettings | None = None) -> "CandidateStore":
        return cls(redis_client(url, sentinel), ttl)

    def put(self, state: dict[str, Any]) -> str:
        """Store a state (once per process); returns its digest."""
        digest = state_digest(state)
        with self._lock:
            known = digest in self._memo
        if not known:  # once per process: it lives as long as job results do
            self.client.set(candidate_key(digest), canonical(state), ex=self.ttl)
            self._remember(digest, state)
        return digest

    def get(self, digest: str, stage: str) -> dict[str, Any]:
        with self._lock:
            if digest in self._memo:
                self._memo.move_to_end(digest)
                return self._memo[digest]
        try:
            raw = self.client.get(candidate_key(digest))
        except redis.RedisError as error:
            raise RetryableStageError(stage, f"candidate state {digest[:12]} unreadable: {error}") from error
        if raw is None:
            raise PermanentStageError(stage, f"candidate state {digest[:12]} not found in Redis (expired, or never "
                                             "uploaded by the optimiser)")
        state: dict[str, Any] = json.loads(raw)
        if state_digest(state) != digest:
            raise PermanentStageError(stage, f"candidate state {digest[:12]} does not match its digest")
        self._remember(digest, state)
        return state

    def _remember(self, digest: str, state: dict[str, Any]) -> None:
        with self._lock:
            self._memo[digest] = state
            while len(self._memo) > STATES_PER_PROCESS:
                self._memo.popitem(last=False)


def apply_state(program: dspy.Module, state: dict[str, Any], stage: str) -> dspy.Module:
    """Load a candidate state (each predictor's instructions and demos) into `program`, which must be an
    instance no other job uses. A predictor's own LM in the state is ignored: a job never picks the LM."""
    names = [name for name, _ in program.named_parameters()]
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        raise PermanentStageError(stage, f"candidate state does not fit the stage's module: missing predictors "
                                         f"{missing or 'none'}, unknown predictors {extra or 'none'}")
    for name, param in program.named_parameters():
        try:
            param.load_state({**state[name], "lm": None})
        except Exception as error:
            raise PermanentStageError(stage, f"candidate state of predictor '{name}': {error}") from error
    return program


class CandidatePrograms:
    """A program instance per (thread, candidate digest), built by `load` and then given the state."""

    def __init__(self, store: CandidateStore, stage: str, load: Callable[[], dspy.Module]) -> None:
        self.store = store
        self.stage = stage
        self.load = load
        self._local = threading.local()

    def get(self, digest: str) -> dspy.Module:
        programs = self._programs()
        if digest in programs:
            programs.move_to_end(digest)
            return programs[digest]
        program = apply_state(self.load(), self.store.get(digest, self.stage), self.stage)
        programs[digest] = program
        while len(programs) > PROGRAMS_PER_THREAD:
            programs.popitem(last=False)
        return program

    def forget(self, digest: str) -> None:
        """Drop this thread's instance (a call abandoned at its time limit may still be using it)."""
        self._programs().pop(digest, None)

    def _programs(self) -> "OrderedDict[str, dspy.Module]":
        if not hasattr(self._local, "programs"):
            self._local.programs = OrderedDict()
        return self._local.programs  # type: ignore[no-any-return]


def lm_override(candidate: StageCandidate | None) -> LMOverride | None:
    """The candidate's LM settings as a stage LM override (None when it sets none)."""
    lm: CandidateLM | None = candidate.lm if candidate else None
    if lm is None or (lm.temperature is None and lm.rollout_id is None):
        return None
    return LMOverride(temperature=lm.temperature, rollout_id=lm.rollout_id)


@contextmanager
def traced(program: dspy.Module, stage: str) -> Iterator[list[TraceStep]]:
    """Collect the predictor calls made inside the block (DSPy's own `settings.trace`), as TraceSteps in
    the list it yields, once the block ends (node paths are filled in by the envelope)."""
    names = {id(predictor): name for name, predictor in program.named_predictors()}
    calls: list[Any] = []
    steps: list[TraceStep] = []
    with dspy.context(trace=calls):
        yield steps
    steps.extend(TraceStep(node="", stage=stage, predictor=names.get(id(predictor), "?"), inputs=plain(inputs),
                           outputs=plain(dict(outputs.items()))) for predictor, inputs, outputs in calls)


def plain(value: dict[str, Any]) -> dict[str, Any]:
    """JSON data of a trace step's inputs or outputs (pydantic values become their JSON form)."""
    data: dict[str, Any] = to_jsonable_python(value, fallback=str)
    return data
