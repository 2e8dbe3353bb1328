"""API tokens: bearer secrets for the HTTP API and the monitor, stored only as their SHA-256 in Redis.

A token's record (`TokenRecord`) says what it may do: scopes (`read`: look at jobs, pipelines and the
monitor; `submit`: start, cancel and resume jobs; `admin`: everything) and, optionally, the only
pipelines it may touch. The store takes any redis-py client (no import here: contracts stay free of
clients); the API and the monitor both check tokens through it.
"""

import hashlib
import json
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from contracts.names import TOKENS_KEY

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "submit", "admin")
TOKEN_PREFIX = "sc_"  # tells a Stagecoach token from other secrets in logs and scanners


class TokenRecord(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["read"]))
    pipelines: list[str] | None = Field(None, description="the only pipelines it may touch (None: every one)")
    rate_per_minute: int | None = Field(None, ge=1, description="its own request limit (None: the API's default)")
    created_at: float = Field(default_factory=time.time)

    def allows(self, scope: Scope) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def reaches(self, pipeline: str) -> bool:
        return self.pipelines is None or pipeline.partition("@")[0] in self.pipelines


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenError(ValueError):
    """A token cannot be created or revoked; the message says why."""


class TokenStore:
    def __init__(self, client: Any) -> None:
        self.client = client  # a redis.Redis

    def create(self, record: TokenRecord, token: str | None = None) -> str:
        """Store a new token's hash with `record`; returns the token (shown once, never stored)."""
        if record.name in {r.name for r in self.list()}:
            raise TokenError(f"a token named '{record.name}' exists already (revoke it first)")
        token = token or new_token()
        self.client.hset(TOKENS_KEY, digest(token), record.model_dump_json())
        return token

    def ensure(self, record: TokenRecord, token: str) -> None:
        """The token exists with `record` (a bootstrap token given by the deployment); idempotent."""
        self.client.hset(TOKENS_KEY, digest(token), record.model_dump_json())

    def check(self, token: str) -> TokenRecord | None:
        raw = self.client.hget(TOKENS_KEY, digest(token))
        return TokenRecord.model_validate_json(raw) if raw else None

    def list(self) -> list[TokenRecord]:
        raw = self.client.hgetall(TOKENS_KEY)
        return sorted((TokenRecord.model_validate(json.loads(v)) for v in raw.values()), key=lambda r: r.created_at)

    def revoke(self, name: str) -> int:
        """Remove every token named `name`; returns how many went."""
        gone = [k for k, v in self.client.hgetall(TOKENS_KEY).items()
                if TokenRecord.model_validate(json.loads(v)).name == name]
        if not gone:
            raise TokenError(f"no token named '{name}'")
        return int(self.client.hdel(TOKENS_KEY, *gone))


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (None when absent or another scheme)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
