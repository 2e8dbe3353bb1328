"""The monitor's figures as pydantic models: what `monitor report --json` and `/api/stats` return."""

from pydantic import BaseModel, Field

from monitor.stats import Summary


class Counts(BaseModel):
    """Counters of one stage or one pipeline since the store began."""

    runs: int = 0
    succeeded: int = 0
    failed: int = 0
    failures: dict[str, int] = Field(default_factory=dict, description="failed runs by error kind")
    retries: int = 0
    skipped: int = Field(0, description="stage tasks that passed a job through after an earlier fatal error")
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_bytes: int = 0
    output_bytes: int = 0


class Figures(Counts):
    name: str
    runtime: Summary | None = Field(None, description="seconds of successful runs (the latest samples)")
    queue_wait: Summary | None = Field(None, description="seconds from task sent to task started")
    throughput_per_min: float = Field(0.0, description="runs per minute over the last minute")


class ErrorExample(BaseModel):
    job_id: str
    node: str = ""
    pipeline: str = ""
    message: str
    at: float


class ErrorGroup(BaseModel):
    stage: str
    kind: str
    count: int
    latest: list[ErrorExample]


class Point(BaseModel):
    t: float = Field(description="bucket start, unix seconds")
    runs: int
    errors: int
    mean_seconds: float | None


PAIR = "|"  # joins stage and pipeline in the names of `stage_pipelines`


class Report(BaseModel):
    generated_at: float
    stages: list[Figures]
    pipelines: list[Figures]
    stage_pipelines: list[Figures] = Field(description="counters per stage within each pipeline: 'stage|pipeline'")
    pipeline_versions: list[Figures] = Field(default_factory=list,
                                             description="jobs per pipeline version, 'name@version' (traffic splits)")
    errors: list[ErrorGroup]


class Series(BaseModel):
    bucket_seconds: int
    stages: dict[str, list[Point]]
    pipelines: dict[str, list[Point]]
