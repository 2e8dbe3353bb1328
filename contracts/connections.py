"""The one Redis connection factory: every Redis client Stagecoach opens itself comes from `redis_client`.

It understands the URL forms a deployment uses, so failover support is one change here, not one per client:

- `redis://[user:password@]host:6379/0` and `rediss://...` (TLS; redis-py's `ssl_*` query options, e.g.
  `?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem`), `unix:///run/redis.sock?db=0`: redis-py's own forms;
- `sentinel://[user:password@]host:26379/0;sentinel://host2:26379;...`: kombu's and Celery's Redis Sentinel
  form (one `sentinel://` per sentinel, `;` between them; the first one's password, user and database are the
  master's). The client asks the sentinels for the current master of `STAGECOACH_SENTINEL_MASTER` and asks
  again whenever its connection fails or the master turns read-only (redis-py's `Sentinel.master_for`), so a
  failover is followed by the client itself.

Celery's broker and result backend take the same `sentinel://` URL with kombu's transport options
(`transport_options`): the master's name and how to reach the sentinels, from the same settings.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
URL_SEPARATOR = ";"  # between the sentinels of one sentinel:// URL (kombu's multi-URL form)
DIRECT_SCHEMES = ("redis", "rediss", "unix")  # redis-py's own URL forms
CLIENT_SCHEMES = (*DIRECT_SCHEMES, SENTINEL_SCHEME)  # what `redis_client` opens
# a sentinel that does not answer within this is skipped for the next one (redis-py asks them in turn)
SENTINEL_SOCKET_SECONDS = 5.0


class SentinelSettings(BaseSettings):
    """How to reach Redis Sentinel when a URL is `sentinel://` (env prefix STAGECOACH_SENTINEL_). The master's
    own password is the URL's, or STAGECOACH_REDIS_PASSWORD; these are the sentinels' own."""

    model_config = SettingsConfigDict(env_prefix="STAGECOACH_SENTINEL_", extra="ignore")

    master: str = Field("mymaster", description="name of the master the sentinels monitor (`sentinel monitor NAME "
                                                "...` in sentinel.conf), for sentinel:// URLs")
    password: SecretStr | None = Field(None, description="password of the sentinels themselves (their "
                                                         "`requirepass`); the master's is the URL's")
    username: str | None = Field(None, description="ACL user of the sentinels (with STAGECOACH_SENTINEL_PASSWORD)")
    tls: bool = Field(False, description="TLS to the sentinels and to the master they name (sentinel:// URLs)")
    tls_ca_certs: Path | None = Field(None, description="CA bundle that verifies the sentinels' and the master's "
                                                        "certificates (with STAGECOACH_SENTINEL_TLS)")

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection options for the sentinels: redis-py's `Sentinel(sentinel_kwargs=...)`, which kombu's
        transport and Celery's backend take as the `sentinel_kwargs` transport option."""
        options: dict[str, Any] = {"socket_timeout": SENTINEL_SOCKET_SECONDS,
                                   "socket_connect_timeout": SENTINEL_SOCKET_SECONDS}
        if self.password is not None:
            options["password"] = self.password.get_secret_value()
        if self.username is not None:
            options["username"] = self.username
        return {**options, **self.tls_options()}

    def tls_options(self) -> dict[str, Any]:
        """redis-py's TLS options (for the sentinels and, through `ssl`, the master), none without TLS."""
        return {"ssl": True, **self.certificate_options()} if self.tls else {}

    def certificate_options(self) -> dict[str, Any]:
        """How the master's certificate is verified, as Celery's `broker_use_ssl` and `redis_backend_use_ssl`
        take it (their presence switches TLS on for the master); none without TLS."""
        if not self.tls:
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.tls_ca_certs is not None:
            options["ssl_ca_certs"] = str(self.tls_ca_certs)
        return options

    def transport_options(self) -> dict[str, Any]:
        """What kombu's `sentinel://` transport and Celery's sentinel result backend need besides the URL
        (`broker_transport_options`, `result_backend_transport_options`)."""
        return {"master_name": self.master, "sentinel_kwargs": self.sentinel_kwargs()}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `sentinel://` URL: the sentinels' addresses and the master's database and credentials."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> "SentinelURL":
        chunks = [chunk.strip() for chunk in url.split(URL_SEPARATOR) if chunk.strip()]
        parts = [urlsplit(chunk) for chunk in chunks]
        wrong = [chunk for chunk, part in zip(chunks, parts, strict=True) if part.scheme != SENTINEL_SCHEME]
        if not parts or wrong:
            raise ValueError(f"sentinel URL {redact(url)!r}: expected sentinel://host:26379[;sentinel://host2:26379...]"
                             f"{', got ' + redact(wrong[0]) if wrong else ''}")
        first = parts[0]
        return cls([(_host(part, url), part.port or SENTINEL_PORT) for part in parts], _database(first.path, url),
                   unquote(first.username) if first.username else None,
                   unquote(first.password) if first.password is not None else None)


def is_sentinel(url: str) -> bool:
    return scheme_of(url) == SENTINEL_SCHEME


def scheme_of(url: str) -> str:
    """The scheme of a (possibly multi-sentinel) URL: the first part's."""
    return urlsplit(url.split(URL_SEPARATOR, 1)[0].strip()).scheme


def redis_client(url: str, sentinel: SentinelSettings | None = None, **options: Any) -> redis.Redis:
    """A client of the Redis `url` names (see the module's docstring for the forms). `options` are redis-py's
    client options (`decode_responses=True`, `socket_connect_timeout=1`, ...); `sentinel`: how to reach the
    sentinels of a sentinel:// URL (default: from the environment, STAGECOACH_SENTINEL_*)."""
    scheme = scheme_of(url)
    if scheme in DIRECT_SCHEMES:
        return redis.Redis.from_url(url, **options)
    if scheme == SENTINEL_SCHEME:
        return _master_client(SentinelURL.parse(url), sentinel or SentinelSettings(), options)
    raise ValueError(f"Redis URL {redact(url)!r}: expected one of {', '.join(s + '://' for s in CLIENT_SCHEMES)}")


def _master_client(target: SentinelURL, settings: SentinelSettings, options: dict[str, Any]) -> redis.Redis:
    """A client of the master the sentinels name now; redis-py asks them again after a failed connection."""
    sentinels = Sentinel(target.sentinels, sentinel_kwargs=settings.sentinel_kwargs())
    credentials = {"username": target.username, "password": target.password}
    master_options = {**settings.tls_options(), **options, "db": target.db,
                      **{key: value for key, value in credentials.items() if value is not None}}
    client: redis.Redis = sentinels.master_for(settings.master, redis_class=redis.Redis, **master_options)
    return client


def redact(url: str) -> str:
    """The URL with every password replaced by ***, for messages."""
    return URL_SEPARATOR.join(_redact_one(chunk) for chunk in url.split(URL_SEPARATOR))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return parts._replace(netloc=f"{name}:***@{host}").geturl()


def _host(part: Any, url: str) -> str:
    if not part.hostname:
        raise ValueError(f"sentinel URL {redact(url)!r}: a sentinel without a host")
    return str(part.hostname)


def _database(path: str, url: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"sentinel URL {redact(url)!r}: the path must be a database number, got {text!r}")
    return int(text)
