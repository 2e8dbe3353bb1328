"""Candidate programs in a job: what an optimiser (`stagecoach optimize`) asks a stage to run, and the
predictor traces the stage sends back.

A job may carry, per stage name, a `StageCandidate`: a content-addressed reference (sha256) to a
candidate state (DSPy's `dump_state()` of the stage module: each predictor's instructions and demos),
uploaded to Redis once under `contracts.names.candidate_key(digest)`, plus the LM settings the
optimiser set for that call (temperature, `rollout_id`). Workers apply both to that job alone. A stage
with a candidate records each predictor call it makes (`TraceStep`) in the job, so the client can
rebuild `dspy.settings.trace` as an in-process run would have left it.
"""

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DIGEST_PATTERN = r"^[0-9a-f]{64}$"


class CandidateLM(BaseModel):
    """The LM settings an optimiser may vary per call. Only sampling settings: a request never picks the
    model or the server a worker calls."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    rollout_id: int | None = None


class StageCandidate(BaseModel):
    """One stage's candidate for one job: its state by digest (None: the stage's own program) and LM settings."""

    model_config = ConfigDict(extra="forbid")

    state: str | None = Field(None, pattern=DIGEST_PATTERN,
                              description="sha256 of the candidate state stored in Redis (instructions and demos)")
    lm: CandidateLM | None = None


class TraceStep(BaseModel):
    """One predictor call of a stage run for a candidate: what `dspy.settings.trace` records in-process."""

    model_config = ConfigDict(extra="forbid")

    node: str = Field(description="node path of the stage call")
    stage: str
    predictor: str = Field(description="the predictor's name in the stage module (`named_predictors()`)")
    inputs: dict[str, Any]
    outputs: dict[str, Any]


def state_digest(state: dict[str, Any]) -> str:
    """sha256 of a candidate state as canonical JSON: the name it is stored and cached under."""
    return hashlib.sha256(canonical(state).encode()).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
