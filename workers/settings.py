"""Settings from the environment (prefix STAGECOACH_, LM settings STAGECOACH_LM_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = PROJECT_ROOT / "pipelines"
LOCAL_MODEL = "openai/smollm2-135m-instruct"


class LMSettings(BaseSettings):
    """The LM every stage uses unless its spec overrides it.

    The default is the bundled SmolLM2-135M served locally by llama.cpp (started by
    `stagecoach up`); any OpenAI-compatible server or litellm provider is one setting away.
    """

    model_config = SettingsConfigDict(env_prefix="STAGECOACH_LM_", extra="ignore")

    model: str = LOCAL_MODEL
    api_base: str | None = Field(None, description="OpenAI-compatible base URL; default: the local server")
    api_key: str = "local"
    temperature: float = 0.0
    max_tokens: int = 384
    cache: bool = Field(True, description="DSPy's in-process LM cache")
    structured: bool = Field(True, description="ask the server for JSON-schema constrained output")
    timeout: float = 120.0
    local_host: str = "127.0.0.1"
    local_port: int = 8090
    local_threads: int = 2
    local_parallel: int = 4
    local_ctx: int = 8192

    @property
    def uses_local_server(self) -> bool:
        return self.model == LOCAL_MODEL and self.api_base is None

    @property
    def resolved_api_base(self) -> str | None:
        if self.api_base is not None:
            return self.api_base
        if self.model == LOCAL_MODEL:
            return f"http://{self.local_host}:{self.local_port}/v1"
        return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAGECOACH_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = Field(None, description="defaults to the broker URL")
    catalog: list[Path] = Field(default_factory=lambda: [DEFAULT_CATALOG])
    plugins: list[str] = Field(
        default_factory=lambda: ["routing.tasks:register"],
        description="import paths of register(app, catalog, settings) functions called at app creation",
    )
    result_expires: int = Field(7 * 24 * 3600, description="seconds a job result is kept")
    visibility_timeout: int = Field(3600, description="seconds before an unacked message is redelivered")
    stage_time_limit: float = Field(600.0, description="hard limit of one stage call, seconds")
    concurrency: int = 4
    pool: str = Field("threads", description="worker pool: threads for LM-bound stages, prefork for CPU")
    flower_port: int = 5555
    lm: LMSettings = Field(default_factory=lambda: LMSettings())

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url
