"""Monitor settings (env prefix STAGECOACH_MONITOR_; the broker and catalog are the stack's own)."""

import os
import socket
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.connections import SentinelSettings

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "pipelines"


class MonitorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAGECOACH_MONITOR_", extra="ignore", populate_by_name=True)

    broker_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices(
        "STAGECOACH_BROKER_URL", "broker_url"), description="the Celery broker (queue depths)")
    store_url: str | None = Field(None, description="Redis for the monitor's store; default: the result backend, "
                                  "which holds the event log the monitor reads (they must be the same Redis)")
    catalog: list[Path] = Field(default_factory=lambda: [DEFAULT_CATALOG], validation_alias=AliasChoices(
        "STAGECOACH_CATALOG", "catalog"), description="pipeline catalog (graphs, stage queues)")
    host: str = Field("127.0.0.1", description="interface of the monitor's HTTP server")
    port: int = Field(8095, description="port of the monitor's HTTP server (JSON, /metrics, web page)")
    auth: bool = Field(False, description="require API tokens (read scope, every pipeline) for the page and JSON; "
                                          "required on a non-loopback host")
    admin_token: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "STAGECOACH_API_ADMIN_TOKEN", "admin_token"), description="the deployment's admin token (shared with the API)")
    samples: int = Field(1000, ge=10, description="latest runtimes kept per stage/pipeline for percentiles")
    bucket_seconds: int = Field(10, ge=1, description="width of one time-series bucket")
    window_buckets: int = Field(360, ge=2, description="buckets kept (rolling window of the time series)")
    error_examples: int = Field(20, ge=1, description="latest examples kept per stage and error kind")
    trace_events: int = Field(2000, ge=10, description="events kept per job trace (its latest)")
    traces: int = Field(1000, ge=1, description="job traces kept: the latest jobs; an older job's trace is deleted")
    trace_ttl: int = Field(7 * 24 * 3600, ge=1, description="seconds a job trace is kept after its last event")
    consumer: str = Field("", description="this replica's name in the consumer group on the fleet's event stream "
                                          "(empty: host-pid)")
    batch: int = Field(500, ge=1, le=2000, description="events read and committed at once")
    block_ms: int = Field(1000, ge=1, description="how long one read waits for new events")
    claim_idle_seconds: float = Field(30.0, gt=0, description=(
        "a replica's unacknowledged events older than this are taken over by another (it died)"))
    trim_acked: bool = Field(True, description=(
        "trim events every consumer group has read off the fleet stream (it then holds the backlog, not history)"))
    sentinel: SentinelSettings = Field(default_factory=lambda: SentinelSettings(),
                                       description="Redis Sentinel (STAGECOACH_SENTINEL_*), as the workers'")

    @property
    def store(self) -> str:
        return self.store_url or self.broker_url

    @property
    def consumer_name(self) -> str:
        return self.consumer or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def window_seconds(self) -> int:
        return self.bucket_seconds * self.window_buckets
