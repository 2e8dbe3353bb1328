"""Job request, status and result: what clients send and read back."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from contracts.candidates import StageCandidate, TraceStep
from contracts.envelope import Decision, ErrorRecord, StageTiming, Usage
from contracts.errors import encodable
from contracts.fields import UNENCODABLE, unencodable
from contracts.priority import MAX_PRIORITY, MIN_PRIORITY
from contracts.webhooks import Webhook, WebhookDelivery

JobState = Literal["queued", "running", "succeeded", "failed", "unknown"]
# how a job ended: every ending goes through the one close path (workers/ledger.py)
Ending = Literal["succeeded", "failed", "cancelled", "rejected", "dead-lettered", "timed-out"]


class JobRequest(BaseModel):
    """The payload of `pipeline.run`: plain JSON any Celery client can send.

    The job id is the task id the caller gives `pipeline.run`: the JobResult is stored under it.
    """

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(description="pipeline name, or `name@version` to pin a version")
    version: str | None = Field(None, description="pipeline version (alternative to `name@version`)")
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: list[str] | None = Field(None, description="only these declared outputs; stages feeding only others skip")
    priority: int | None = Field(None, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                                 description="0 (default, lowest) to 9 (most urgent): every stage message of the job")
    webhook: Webhook | None = Field(None, description="called with the JobResult once the job ends, however it ends")
    metadata: dict[str, Any] | None = Field(None, description="the caller's own data, kept with the job's status")
    candidates: dict[str, StageCandidate] | None = Field(
        None, description="optimisation: per stage name, a candidate state and LM settings for this job only; "
                          "those stages also return their predictor traces")

    @model_validator(mode="wrap")
    @classmethod
    def _encodable(cls, data: Any, handler: ModelWrapValidatorHandler["JobRequest"]) -> "JobRequest":
        """Text UTF-8 cannot encode is refused by field. The inputs are left to the pipeline's input
        contract (`Catalog.validate_inputs`), which checks them the same way and names them as declared."""
        if isinstance(data, dict):
            request = {key: value for key, value in data.items() if key != "inputs"}
            errors = [_unencodable_error(loc, problem) for loc, problem in unencodable(request)]
            if errors:
                raise ValidationError.from_exception_data(cls.__name__, errors)
        return handler(data)


def _unencodable_error(loc: tuple[str | int, ...], problem: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(UNENCODABLE, "{problem}", {"problem": problem}),
                            loc=tuple(encodable(p) if isinstance(p, str) else p for p in loc), input=None)


def requested_priority(request: Any) -> int | None:
    """The priority a raw request (as a Celery client sent it, or as the checkpoint keeps it) asks for, as
    validated (`"7"` is 7); None when it asks for none or is not a valid request."""
    try:
        return JobRequest.model_validate(request).priority
    except ValidationError:
        return None


class JobStatus(BaseModel):
    job_id: str
    state: JobState
    pipeline: str | None = None
    node: str | None = Field(None, description="node path the job is in now")
    stage: str | None = Field(None, description="stage the job is in now")
    stages_done: int = 0
    stages_total: int | None = Field(None, description="stage calls the job makes, when its pipeline's tree alone "
                                                       "says (None: branches, loops, maps decide at run time)")
    updated_at: float | None = None
    submitted_at: float | None = None
    priority: int | None = None
    metadata: dict[str, Any] | None = None
    webhook: WebhookDelivery | None = Field(None, description="the completion webhook's delivery, if one was asked")


class JobResult(BaseModel):
    """A finished job: the answer fields, the full state and everything that happened."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    pipeline: str
    pipeline_version: str
    state: JobState
    answer: dict[str, Any] = Field(default_factory=dict, description="the pipeline's declared outputs")
    fields: dict[str, Any] = Field(default_factory=dict, description="every state field at the end")
    outputs: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-node outputs")
    error: ErrorRecord | None = None
    errors: list[ErrorRecord] = Field(default_factory=list)
    timings: list[StageTiming] = Field(default_factory=list)
    trail: list[Decision] = Field(default_factory=list)
    usage: dict[str, Usage] = Field(default_factory=dict, description="per stage: LM calls made for this job")
    cached_usage: dict[str, Usage] = Field(
        default_factory=dict, description="per stage: usage of calls served from the shared cache (not spent again)"
    )
    skipped: list[str] = Field(default_factory=list, description="node paths skipped: nothing reads their outputs")
    traces: list[TraceStep] = Field(default_factory=list,
                                    description="optimisation jobs: each predictor call of the candidate stages")
    submitted_at: float | None = None
    finished_at: float | None = None

    @property
    def cached_stages(self) -> list[str]:
        """Node paths whose output came from the shared cache."""
        return [t.node for t in self.timings if t.cached]

    @property
    def total_usage(self) -> Usage:
        total = Usage()
        for used in self.usage.values():
            total = total.plus(used)
        return total

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    @property
    def ending(self) -> Ending:
        """Which of the six endings this is, from the error that ended the job."""
        error = self.error
        if self.ok or error is None:
            return "succeeded" if self.ok else "failed"
        by_kind: dict[str, Ending] = {"cancelled": "cancelled", "message": "dead-lettered", "timeout": "timed-out"}
        if error.kind == "contract" and not error.node:  # the request itself: the job never started
            return "rejected"
        return by_kind.get(error.kind, "failed")

    @property
    def seconds(self) -> float | None:
        if self.submitted_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.submitted_at
