"""What the handlers use, built once per process: the same client, recovery and records as the CLI."""

from dataclasses import dataclass

import redis

from api.settings import APISettings
from contracts.connections import redis_client
from contracts.tokens import TokenRecord, TokenStore
from routing.client import Client
from routing.recovery import Recovery
from workers.eventlog import EventLog
from workers.factory import create_runtime
from workers.runtime import Runtime
from workers.settings import Settings

ADMIN_TOKEN_NAME = "admin (STAGECOACH_API_ADMIN_TOKEN)"


@dataclass(frozen=True)
class Services:
    settings: Settings
    api: APISettings
    runtime: Runtime
    client: Client
    recovery: Recovery
    tokens: TokenStore
    redis: redis.Redis
    events: EventLog  # read by the server-sent events of GET /v1/jobs/{id}/events

    @classmethod
    def build(cls, settings: Settings, api: APISettings) -> "Services":
        runtime = create_runtime(settings)
        backend = redis_client(settings.backend_url, settings.sentinel, socket_connect_timeout=2, socket_timeout=10)
        recovery = Recovery(runtime.app, runtime.catalog, runtime.ledger, settings.watchdog_max_redispatches)
        events = EventLog(backend, settings.result_expires, settings.events_per_job, settings.events_maxlen)
        return cls(settings, api, runtime, Client(runtime), recovery, TokenStore(backend), backend, events)

    def register_admin_token(self) -> None:
        """The deployment's admin token (STAGECOACH_API_ADMIN_TOKEN), so a fresh stack has a way in."""
        if self.api.admin_token is not None:
            record = TokenRecord(name="admin", scopes=["admin"])
            self.tokens.ensure(record, self.api.admin_token.get_secret_value())
