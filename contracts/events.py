"""The events Stagecoach sends besides Celery's own: a job's life, typed.

A job is queued (`JobQueued`); each stage step starts (`StageStarted`) and ends with an outcome
(`StageOutcome`: ok, an error of some kind, a retry, skipped); runtime nodes decide (`DecisionMade`:
a branch taken, a loop iteration, a map fanned out, a recovery); answer fields become final early
(`FieldsPublished`); the job finishes (`JobFinished`, once, from the ledger's close).

Workers build them, readers validate them (a malformed one is counted and logged, never a crash),
and the benchmarks send them; all use these models. They are written to the event log's Redis
streams (workers/eventlog.py: one per job, one for the monitor) as `{type, data}` entries, in the
Redis round trips the workers make anyway. The monitor reads them from the fleet stream through a
consumer group; Celery's own task events stay for Flower.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.errors import encodable
from contracts.jobs import Ending
from contracts.names import (
    DECISION_EVENT,
    FIELDS_EVENT,
    JOB_FINISHED_EVENT,
    JOB_QUEUED_EVENT,
    STAGE_OUTCOME_EVENT,
    STAGE_STARTED_EVENT,
)

# marks the Celery task events the job ledger sends to end a job's tasks in Flower (FAILURE, REVOKED):
# they say how the job ended, not that the task crashed
LEDGER_FIELD = "stagecoach_ledger"
PREVIEW_CHARS = 400  # inputs/outputs in an event are previews; the JobResult has the full values

Outcome = Literal["ok", "error", "retry", "skipped"]


def preview(value: Any, limit: int = PREVIEW_CHARS) -> tuple[str, int]:
    """JSON text of a value cut to `limit` characters, and its full size in bytes. A string that is not
    valid Unicode (a lone surrogate) is escaped, never an error: an event must not fail a stage."""
    text = encodable(json.dumps(value, default=str, ensure_ascii=False))
    size = len(text.encode("utf-8"))
    return (text if len(text) <= limit else text[:limit] + "..."), size


class _Event(BaseModel):
    # Celery adds its own fields (hostname, timestamp, clock, pid, utcoffset, type, uuid) to each event
    model_config = ConfigDict(extra="ignore")

    job_id: str
    pipeline: str
    at: float = Field(description="unix seconds when the worker sent it")

    def payload(self) -> dict[str, Any]:
        """The event's fields as sent (JSON values)."""
        return self.model_dump(mode="json")


class JobQueued(_Event):
    """A job recorded by the ledger, before its first message is sent."""

    door: str = Field(description="who started it: client (the Python client) or run (a `pipeline.run` task)")
    pipeline_version: str = ""
    skipped: list[str] = Field(default_factory=list, description="node paths the lazy plan skips")


class StageStarted(_Event):
    """A stage step that this delivery runs (claimed once, whatever the broker redelivers)."""

    stage: str
    node: str
    attempt: int = Field(1, description="1 for the first try, +1 per retry")
    worker: str = ""
    waited: float | None = Field(None, description="seconds since the job's previous stage ended (or since it was "
                                 "submitted, for its first): the hop and the queue wait before this step")
    first: bool = Field(False, description="the job's first stage step (no stage had run yet)")


class DecisionMade(_Event):
    """What a runtime node (or a stage's on_error recovery) decided."""

    node: str
    kind: str
    choice: str
    detail: dict[str, Any] = Field(default_factory=dict)


class FieldsPublished(_Event):
    """Answer fields final before the job ends (`JobHandle.output`)."""

    fields: dict[str, Any]


class StageOutcome(_Event):
    """One stage call's outcome. Errors are values (the stage task itself succeeds), so this says what
    happened: ok, an error of some kind, a retry, or skipped (the job had failed before it)."""

    stage: str
    node: str
    outcome: Outcome
    attempts: int = 1
    inputs: str = Field("", description="preview of the stage's inputs (JSON, cut)")
    input_bytes: int = 0
    outputs: str | None = Field(None, description="preview of the outputs of a successful call")
    output_bytes: int = 0
    kind: str | None = Field(None, description="error kind of an error or retry")
    message: str | None = None
    fatal: bool = Field(False, description="the error ended the job")
    seconds: float | None = Field(None, description="the stage call's own time (ok outcomes)")
    started_at: float | None = None
    elapsed: float | None = Field(None, description="seconds from the task's start to this event")
    cached: bool = False
    worker: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FinishedNode(BaseModel):
    node: str
    stage: str
    seconds: float
    attempts: int = 1


class FinishedError(BaseModel):
    node: str
    stage: str | None = None
    kind: str
    message: str


class JobFinished(_Event):
    """A job's end, sent once by the close that ended it (workers/ledger.py): its outcome and the path
    it took (decisions, nodes, errors), for counters and per-job traces."""

    state: Literal["succeeded", "failed"]
    ending: Ending
    version: str = Field("", description="the pipeline version the job ran (traffic splits: figures per version)")
    seconds: float = 0.0
    submitted_at: float | None = None
    kind: str | None = Field(None, description="error kind of a failed job")
    message: str | None = None
    error_node: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    trail: list[dict[str, Any]] = Field(default_factory=list, description="decisions (dropped when very large)")
    nodes: list[FinishedNode] = Field(default_factory=list)
    errors: list[FinishedError] = Field(default_factory=list)
    answer: str = Field("", description="preview of the answer (JSON, cut)")


StagecoachEvent = JobQueued | StageStarted | StageOutcome | DecisionMade | FieldsPublished | JobFinished
EVENT_MODELS: dict[str, type[StagecoachEvent]] = {
    JOB_QUEUED_EVENT: JobQueued,
    STAGE_STARTED_EVENT: StageStarted,
    STAGE_OUTCOME_EVENT: StageOutcome,
    DECISION_EVENT: DecisionMade,
    FIELDS_EVENT: FieldsPublished,
    JOB_FINISHED_EVENT: JobFinished,
}
_NAMES = {model: name for name, model in EVENT_MODELS.items()}


def event_name(event: StagecoachEvent) -> str:
    return _NAMES[type(event)]


def parse_event(name: str, data: str | bytes) -> StagecoachEvent:
    """An event from its type name and JSON (raises KeyError for an unknown name, ValidationError for bad data)."""
    return EVENT_MODELS[name].model_validate_json(data)
