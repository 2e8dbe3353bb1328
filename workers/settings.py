"""Settings from the environment (prefix STAGECOACH_, LM settings STAGECOACH_LM_)."""

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contracts.connections import SENTINEL_SCHEME, SentinelSettings, SentinelURL, scheme_of
from contracts.webhooks import LOOPBACK

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = PROJECT_ROOT / "pipelines"
LOCAL_MODEL = "openai/smollm2-135m-instruct"
REDIS_SCHEMES = ("redis", "rediss", SENTINEL_SCHEME)  # Celery's broker and result backend on Redis
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


class LMSettings(BaseSettings):
    """The LM every stage uses unless its spec overrides it.

    The default is the bundled SmolLM2-135M served locally by llama.cpp (started by
    `stagecoach up`); any OpenAI-compatible server or litellm provider is one setting away.
    """

    model_config = SettingsConfigDict(env_prefix="STAGECOACH_LM_", extra="ignore")

    model: str = Field(LOCAL_MODEL, description="litellm model name, e.g. openai/gpt-4o-mini, ollama_chat/llama3")
    api_base: str | None = Field(None, description="OpenAI-compatible base URL; default: the local server")
    api_key: str = Field("local", description="API key sent to the LM server")
    temperature: float = Field(0.0, description="sampling temperature")
    max_tokens: int = Field(384, description="completion token limit per call")
    cache: bool = Field(True, description="DSPy's in-process LM cache")
    structured: bool = Field(True, description="ask the server for JSON-schema constrained output")
    timeout: float = Field(120.0, description="seconds one LM call may take")
    local_host: str = Field("127.0.0.1", description="local SmolLM2 server: interface")
    local_port: int = Field(8090, description="local SmolLM2 server: port")
    # One thread: llama.cpp threads that share busy cores with the workers wait on each other at
    # every token (measured on 2 cores: 80 tokens/s with 1 thread, under 4 with 2).
    local_threads: int = Field(1, description="local SmolLM2 server: CPU threads")
    local_parallel: int = Field(4, description="local SmolLM2 server: requests decoded at once")
    local_ctx: int = Field(8192, description="local SmolLM2 server: context tokens, shared by the parallel slots")

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


class CacheSettings(BaseSettings):
    """The stage cache in Redis shared by every worker (workers/cache.py)."""

    model_config = SettingsConfigDict(env_prefix="STAGECOACH_CACHE_", extra="ignore")

    enabled: bool = Field(True, description="serve repeated stage calls from the shared Redis cache")
    ttl: int = Field(7 * 24 * 3600, gt=0, description="seconds an entry lives after its last use")
    max_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="total size of all entries; least recently used go first"
    )
    max_entry_bytes: int = Field(1024 * 1024, gt=0, description="a larger stage output is not cached")


class WebhookSettings(BaseSettings):
    """Completion webhooks (workers/webhooks.py): delivered by the `webhook` worker, never by a stage worker."""

    model_config = SettingsConfigDict(env_prefix="STAGECOACH_WEBHOOK_", extra="ignore")

    attempts: int = Field(5, ge=1, description="deliveries tried (errors, timeouts, non-2xx) before a dead letter")
    timeout: float = Field(10.0, gt=0, description="seconds one delivery may take")
    backoff: float = Field(1.0, gt=0, description="seconds before the first retry; doubles each retry")
    backoff_max: float = Field(60.0, gt=0, description="longest pause between two retries")
    allow: list[str] = Field(default_factory=lambda: list(LOOPBACK), description=(
        "hosts (exact or *.domain) and IP networks webhooks may call, JSON list; default: loopback only"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAGECOACH_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0",
                            description="Celery broker: redis://host:6379/0, Redis Sentinel "
                                        "sentinel://host:26379;sentinel://host2:26379 (STAGECOACH_SENTINEL_*), "
                                        "or RabbitMQ amqp://user@host:5672/vhost")
    result_backend: str | None = Field(
        None, description="Redis URL of the result backend (redis://, rediss:// or sentinel://); default: the broker "
                          "URL (required with an amqp:// broker)")
    redis_password: SecretStr | None = Field(
        None, description="Redis password, added to redis:// URLs that carry none (keeps it out of URLs in files); "
                          "with sentinel:// it is the master's")
    rabbitmq_password: SecretStr | None = Field(
        None, description="RabbitMQ password, added to an amqp:// broker URL that carries none")
    catalog: list[Path] = Field(default_factory=lambda: [DEFAULT_CATALOG],
                                description="JSON list of spec files or folders holding stages and pipelines")
    plugins: list[str] = Field(
        default_factory=list,
        description="import paths of extra register(runtime) functions called at app creation (the routing "
                    "tasks are registered by workers/app.py)",
    )
    result_expires: int = Field(7 * 24 * 3600, description="seconds a job result is kept")
    visibility_timeout: int | None = Field(
        None, description="seconds before Redis redelivers an unacked message (Redis broker); default: the "
                          "longest stage's hard limit + 60 (`stagecoach settings` shows the effective value; "
                          "docs/reliability.md)")
    watchdog_stall_seconds: float = Field(
        30.0, gt=0, description="a job whose next stage has not started this long after the last one (and no "
                                "queue holds a backlog) is re-dispatched")
    max_deliveries: int = Field(
        4, ge=1, description="a step whose message was delivered this often (its worker died each time: a hard time "
                             "limit, out of memory, a native crash) ends its job as failed instead of running again")
    lease_seconds: float = Field(
        15.0, gt=0, description="a running step's lease: its worker renews it every third of this; a job whose "
                                "worker died is re-dispatched this long after its last renewal")
    watchdog_interval: float = Field(5.0, gt=0, description="seconds between two watchdog sweeps")
    watchdog_backlog_seconds: float = Field(
        3600.0, gt=0, description="a stalled job is given more time while the queues hold messages (a backlog), "
                                  "for at most this long from its first such stall; then it is re-dispatched")
    watchdog_max_redispatches: int = Field(
        5, ge=0, description="a job re-dispatched this often without finishing ends as timed out")
    stage_time_limit: float = Field(600.0, description="hard limit of one stage call, seconds")
    concurrency: int = Field(4, description="tasks one worker runs at once")
    pool: str = Field("threads", description="worker pool: threads for LM-bound stages, prefork for CPU")
    workers: dict[str, int] = Field(default_factory=dict, description="worker processes per stage queue started by "
                                    '`stagecoach up`, e.g. {"retrieve": 3}')
    autoscale: Annotated[dict[str, tuple[int, int]], NoDecode] = Field(
        default_factory=dict, description="Celery pool autoscaling per stage worker started by `stagecoach up`, "
                                          "MIN..MAX slots: key_terms=1..8,answer=0..4")
    soft_shutdown_seconds: float | None = Field(
        None, ge=0, description="on a cold shutdown (SIGQUIT; SIGTERM where REMAP_SIGTERM=SIGQUIT) a worker lets "
                                "running tasks finish this long, then hands them back; default: the longest stage's "
                                "hard limit (each stage Deployment of `stagecoach k8s` sets its own)")
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0,
                                   description="a bigger broker message is dead-lettered, not run")
    max_request_bytes: int = Field(1024 * 1024, gt=0,
                                   description="a job request (inputs as JSON) above this is refused")
    max_envelope_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="a stage message (the job's envelope) above this is dead-lettered, not "
                                           "run: the request limit plus what stages add on the way")
    dead_letter_max: int = Field(1000, gt=0, description="dead letters kept in Redis (oldest dropped)")
    events_per_job: int = Field(1000, gt=0, description="events kept on a job's own event stream (about; oldest go)")
    events_maxlen: int = Field(100_000, ge=0, description="events kept on the fleet's event stream the monitor "
                                                          "reads (about; oldest go; 0: none written)")
    events_keep_seconds: int = Field(900, gt=0, description="seconds a job's own event stream is kept after the job "
                                     "ended (an SSE reader that comes back within it replays the job)")
    succeeded_keep_seconds: int = Field(
        1800, gt=0, description="seconds a succeeded job's checkpoint, claims, delivery counters, close marker and "
                                "published fields are kept after it ended (a redelivery of one of its messages is "
                                "dropped while they last: keep it above the visibility timeout); its result and "
                                "status stay for STAGECOACH_RESULT_EXPIRES, a failed job's records too (resume)")
    publish_retry_seconds: float = Field(
        30.0, ge=0, description="a client retries publishing a job this long while the broker is down, then fails")
    flower_port: int = Field(5555, description="port of Flower started by `stagecoach up`")
    lm: LMSettings = Field(default_factory=lambda: LMSettings())
    cache: CacheSettings = Field(default_factory=lambda: CacheSettings())
    webhook: WebhookSettings = Field(default_factory=lambda: WebhookSettings())
    sentinel: SentinelSettings = Field(default_factory=lambda: SentinelSettings())

    @model_validator(mode="after")
    def _resolve_urls(self) -> "Settings":
        """Passwords go into the URLs; the result backend must be Redis (chords, job records)."""
        self.broker_url = _with_password(self.broker_url, self.redis_password, REDIS_SCHEMES)
        self.broker_url = _with_password(self.broker_url, self.rabbitmq_password, AMQP_SCHEMES)
        if self.result_backend is not None:
            self.result_backend = _with_password(self.result_backend, self.redis_password, REDIS_SCHEMES)
        if _scheme(self.backend_url) not in REDIS_SCHEMES:
            raise ValueError(f"STAGECOACH_RESULT_BACKEND must be a redis://, rediss:// or sentinel:// URL (chords and "
                             f"job records live in Redis); got {_scheme(self.backend_url)}:// (with an amqp:// broker "
                             f"set it explicitly)")
        for name, url in (("STAGECOACH_BROKER_URL", self.broker_url), ("STAGECOACH_RESULT_BACKEND", self.backend_url)):
            _check_sentinel_url(name, url)
        return self

    @model_validator(mode="after")
    def _worker_counts(self) -> "Settings":
        bad = {stage: count for stage, count in self.workers.items() if count < 1}
        if bad:
            raise ValueError(f"STAGECOACH_WORKERS: counts must be at least 1, got {bad}")
        return self

    @field_validator("autoscale", mode="before")
    @classmethod
    def _autoscale_ranges(cls, value: Any) -> Any:
        if isinstance(value, str):  # STAGECOACH_AUTOSCALE: the text form, or JSON {"key_terms": [1, 8]}
            return json.loads(value) if value.lstrip().startswith("{") else parse_autoscale(value)
        return value

    @model_validator(mode="after")
    def _autoscale_bounds(self) -> "Settings":
        bad = {stage: f"{low}..{high}" for stage, (low, high) in self.autoscale.items()
               if not 0 <= low <= high or high < 1}
        if bad:
            raise ValueError(f"STAGECOACH_AUTOSCALE: expected MIN..MAX with 0 <= MIN <= MAX and MAX >= 1, got {bad}")
        return self

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def broker_is_redis(self) -> bool:
        return _scheme(self.broker_url) in REDIS_SCHEMES


def _scheme(url: str) -> str:
    return scheme_of(url)


def _check_sentinel_url(name: str, url: str) -> None:
    """A sentinel:// URL parses (every part a sentinel with a host, a database number), named by its setting:
    kombu and Celery read the first part's scheme only and would fail later, less clearly."""
    if _scheme(url) != SENTINEL_SCHEME:
        return
    try:
        SentinelURL.parse(url)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _with_password(url: str, password: SecretStr | None, schemes: tuple[str, ...]) -> str:
    """The URL with the password added, unless it has one already or is of another scheme. A sentinel:// URL
    gets it on its first part, where kombu and Celery read the master's password."""
    first, sep, rest = url.partition(";")
    parts = urlsplit(first)
    if password is None or parts.scheme not in schemes or parts.password is not None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    secret = quote(password.get_secret_value(), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}")) + sep + rest


def parse_autoscale(text: str) -> dict[str, tuple[int, int]]:
    """`key_terms=1..8,answer=0..4` -> {"key_terms": (1, 8), "answer": (0, 4)}; a bad item names itself."""
    ranges: dict[str, tuple[int, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        stage, sep, bounds = item.partition("=")
        low, dots, high = bounds.strip().partition("..")
        if not sep or not stage.strip() or not dots or not low.isdigit() or not high.isdigit():
            raise ValueError(f"autoscale {item!r}: expected STAGE=MIN..MAX (e.g. key_terms=1..8)")
        ranges[stage.strip()] = (int(low), int(high))
    return ranges
