"""HTTP API settings (env prefix STAGECOACH_API_); the broker, catalog and limits are the stack's own."""

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class APISettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAGECOACH_API_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface of the HTTP API (`stagecoach api`)")
    port: int = Field(8000, description="port of the HTTP API")
    auth: bool = Field(True, description="require bearer tokens (`stagecoach tokens create`); off is refused on a "
                                         "non-loopback host")
    admin_token: SecretStr | None = Field(None, description="a token the API (and the monitor) accept with every "
                                                            "scope, registered at start (deployments: compose, up)")
    rate_per_minute: int = Field(600, ge=0, description="requests per token (or per client address with auth off) "
                                                        "and minute; 0: no limit")
    backlog_retry_after: int = Field(5, ge=1, description="Retry-After seconds of a 429 for a pipeline at max_queued")
    max_wait: float = Field(60.0, gt=0, description="longest `?wait=` of GET /v1/jobs/{id}/result, seconds")
    list_max: int = Field(200, ge=1, description="most jobs one page of GET /v1/jobs returns")
    threads: int = Field(200, ge=1, description="requests handled at once (a long poll holds one while it waits)")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")
