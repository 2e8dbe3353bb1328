"""The envelope: the one JSON document that travels from stage to stage for a job.

It carries the accumulated state (fields produced so far), per-node outputs, the error log, the
decision trail of runtime nodes, timings and token usage. It stays lean: traces belong to the
monitor. Methods return new envelopes; an envelope is never mutated in place.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.candidates import StageCandidate, TraceStep

# message: a broker message no worker could run (dead-lettered); cancelled: an operator stopped the job
ErrorKind = Literal["contract", "stage", "lm", "timeout", "pipeline", "routing", "message", "cancelled"]


class ErrorRecord(BaseModel):
    """One error in a job's log. `retryable` says whether the failing call could succeed later."""

    model_config = ConfigDict(extra="forbid")

    node: str
    stage: str | None = None
    kind: ErrorKind = "stage"
    error_type: str
    message: str
    retryable: bool = False
    attempts: int = 1
    fields: list[str] = Field(default_factory=list)
    at: float = Field(default_factory=time.time)


class StageTiming(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str
    stage: str
    identity: str
    worker: str = ""
    started_at: float
    seconds: float
    attempts: int = 1
    cached: bool = Field(False, description="served from a cache: no LM request")
    cache: Literal["shared", "dspy"] | None = Field(
        None, description="which: the fleet's shared stage cache, or DSPy's own per-worker cache"
    )
    shared_call: str | None = Field(
        None, description="LM-level fusion: node path of the stage whose one LM call also produced this output"
    )
    redeliveries: int = Field(0, description="times the broker delivered this stage's message again")
    throttled_seconds: float = Field(0.0, description="time waited for the stage's shared rate limit")
    from_checkpoint: bool = Field(False, description="replayed from the job's checkpoint: no LM call this time")


class Decision(BaseModel):
    """What a runtime node decided (branch taken, loop iteration, map fan-out, structure chosen)."""

    model_config = ConfigDict(extra="forbid")

    node: str
    kind: str
    choice: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Usage(BaseModel):
    """LM calls and tokens, with a cost estimate where every model's price is known.

    `cost_usd` is None when some call's model has no price in litellm's local map (those models are
    listed in `unpriced`): a partial sum would understate the cost, so none is given.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cost_usd: float | None = None
    unpriced: list[str] = Field(default_factory=list, description="models without a known price")

    @property
    def priced(self) -> bool:
        return self.calls == 0 or (self.cost_usd is not None and not self.unpriced)

    def plus(self, other: "Usage") -> "Usage":
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            calls=self.calls + other.calls,
            cost_usd=_cost_sum(self, other),
            unpriced=sorted({*self.unpriced, *other.unpriced}),
        )


def _cost_sum(a: Usage, b: Usage) -> float | None:
    """Calls without a price make the sum unknown; usages with no calls add nothing."""
    counted = [u for u in (a, b) if u.calls > 0]
    if not counted:
        return None
    if any(not u.priced for u in counted):
        return None
    return sum(u.cost_usd or 0.0 for u in counted)


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    pipeline: str
    pipeline_version: str
    submitted_at: float = Field(default_factory=time.time)
    state: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    errors: list[ErrorRecord] = Field(default_factory=list)
    timings: list[StageTiming] = Field(default_factory=list)
    trail: list[Decision] = Field(default_factory=list)
    usage: dict[str, Usage] = Field(default_factory=dict)
    cached_usage: dict[str, Usage] = Field(
        default_factory=dict, description="per stage: what the calls served from the shared cache once cost"
    )
    skipped: list[str] = Field(default_factory=list, description="node paths skipped: nothing reads their outputs")
    publish: list[str] = Field(default_factory=list, description="fields final once written: published early")
    failure: ErrorRecord | None = Field(None, description="the error that stopped the job, if any")
    generation: int = Field(0, description="dispatch of this job: 0 first, +1 per watchdog re-dispatch or resume")
    member_of: str | None = Field(
        None, description="node path of the fan-out this envelope is a member of; None at the job's top level, "
                          "where a fatal error ends the job at once (a member's error is its fan-in's to judge)")
    candidates: dict[str, StageCandidate] = Field(
        default_factory=dict, description="optimisation: per stage name, the candidate this job runs (JobRequest)")
    traces: list[TraceStep] = Field(default_factory=list, description="predictor calls of the candidate stages")

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def moved_at(self) -> float:
        """When the job last moved: its latest stage's end (its submit before its first). The message carrying
        this envelope was sent no earlier."""
        return max([t.started_at + t.seconds for t in self.timings], default=self.submitted_at)

    def pick(self, names: list[str], rename: dict[str, str] | None = None) -> dict[str, Any]:
        """The state fields a stage reads: contract field name <- state field name (present ones only)."""
        rename = rename or {}
        return {name: self.state[rename.get(name, name)] for name in names if rename.get(name, name) in self.state}

    def with_output(
        self,
        node_path: str,
        outputs: dict[str, Any],
        timing: StageTiming | None = None,
        usage: Usage | None = None,
        rename: dict[str, str] | None = None,
        cached_usage: Usage | None = None,
        trace: list[TraceStep] | None = None,
    ) -> "Envelope":
        rename = rename or {}
        state = {**self.state, **{rename.get(k, k): v for k, v in outputs.items()}}
        update: dict[str, Any] = {"state": state, "outputs": {**self.outputs, node_path: outputs}}
        if trace:
            update["traces"] = [*self.traces, *(step.model_copy(update={"node": node_path}) for step in trace)]
        if timing is not None:
            update["timings"] = [*self.timings, timing]
        if usage is not None and timing is not None:
            update["usage"] = _add(self.usage, timing.stage, usage)
        if cached_usage is not None and timing is not None:
            update["cached_usage"] = _add(self.cached_usage, timing.stage, cached_usage)
        return self.model_copy(update=update)

    def with_error(self, error: ErrorRecord, fatal: bool) -> "Envelope":
        update: dict[str, Any] = {"errors": [*self.errors, error]}
        if fatal and self.failure is None:
            update["failure"] = error
        return self.model_copy(update=update)

    def with_decision(self, decision: Decision) -> "Envelope":
        collected = _decisions.get()
        if collected is not None:
            collected.append(decision)
        return self.model_copy(update={"trail": [*self.trail, decision]})

    def absorb(self, member: "Envelope") -> "Envelope":
        """Fold in what a fan-out member did: its outputs, errors, timings, decisions and usage."""
        return self.model_copy(update={
            "outputs": {**self.outputs, **member.outputs},
            "errors": [*self.errors, *member.errors],
            "timings": [*self.timings, *member.timings],
            "trail": [*self.trail, *member.trail],
            "usage": _merge_usage(self.usage, member.usage),
            "cached_usage": _merge_usage(self.cached_usage, member.cached_usage),
            "skipped": [*self.skipped, *member.skipped],
            "traces": [*self.traces, *member.traces],
        })

    def lean(self, member_of: str, state: dict[str, Any] | None = None) -> "Envelope":
        """The start of a member of fan-out `member_of`: this job's state (plus `state`), nothing it did so far."""
        return self.model_copy(update={"state": {**self.state, **(state or {})}, "outputs": {}, "errors": [],
                                       "timings": [], "trail": [], "usage": {},
                                       "cached_usage": {}, "skipped": [], "member_of": member_of,
                                       "traces": []})


_decisions: ContextVar[list[Decision] | None] = ContextVar("stagecoach_decisions", default=None)


@contextmanager
def decisions_made() -> Iterator[list[Decision]]:
    """The decisions `with_decision` records in this context meanwhile: what a routing task decided, for
    its events (the envelope carrying them may leave inside a canvas the task was replaced with)."""
    made: list[Decision] = []
    token = _decisions.set(made)
    try:
        yield made
    finally:
        _decisions.reset(token)


def _add(usages: dict[str, Usage], stage: str, usage: Usage) -> dict[str, Usage]:
    return {**usages, stage: usages.get(stage, Usage()).plus(usage)}


def _merge_usage(into: dict[str, Usage], more: dict[str, Usage]) -> dict[str, Usage]:
    merged = dict(into)
    for stage, used in more.items():
        merged = _add(merged, stage, used)
    return merged
