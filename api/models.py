"""The API's own response shapes; requests, statuses and results are the contracts' models."""

from typing import Any

from pydantic import BaseModel, Field

from contracts.jobs import JobStatus


class Submitted(BaseModel):
    job_id: str
    status_url: str
    result_url: str
    events_url: str
    replayed: bool = Field(False, description="an earlier request with this Idempotency-Key and body started the job")


class Resumed(Submitted):
    generation: int = Field(description="the job's generation: 1 after its first resume, then +1 each")


class JobPage(BaseModel):
    jobs: list[JobStatus]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page (None: the last page)")


class PipelineInfo(BaseModel):
    name: str
    version: str
    versions: list[str]
    description: str = ""
    inputs: dict[str, Any]
    outputs: list[str]
    stages: list[str]
    kinds: list[str]
    max_queued: int | None = None
    webhook_url: str | None = Field(None, description="the pipeline's default completion webhook (its secret stays)")
    example: dict[str, Any] = Field(default_factory=dict)


class PipelineDetail(PipelineInfo):
    spec: dict[str, Any] = Field(description="the pipeline spec (without its webhook's secret)")
    schemas: dict[str, Any] = Field(description="JSON Schemas (draft 2020-12) of the request and the JobResult")


class Health(BaseModel):
    redis: bool
    workers: dict[str, int] = Field(description="workers consuming each queue (stage queues, routing, webhook)")
    queues: dict[str, int] = Field(default_factory=dict, description="messages waiting per queue")
