"""The monitor's figures as pydantic models: what `monitor report --json` and `/api/stats` return."""

from pydantic import BaseModel, Field

from monitor.stats import Summary


class Counts(BaseModel):
    """Counters of one stage or one pipeline since the store began."""

    runs: int = Field(0, description="runs")
    succeeded: int = Field(0, description="successful runs")
    failed: int = Field(0, description="failed runs (errors are values too)")
    failures: dict[str, int] = Field(default_factory=dict, description="failed runs by error kind")
    retries: int = Field(0, description="retried attempts")
    skipped: int = Field(0, description="stage tasks that passed a job through after an earlier fatal error")
    cache_hits: int = Field(0, description="runs answered from the cache")
    prompt_tokens: int = Field(0, description="prompt tokens")
    completion_tokens: int = Field(0, description="completion tokens")
    input_bytes: int = Field(0, description="bytes of inputs (JSON)")
    output_bytes: int = Field(0, description="bytes of outputs (JSON)")


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
