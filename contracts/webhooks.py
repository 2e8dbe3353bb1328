"""Completion webhooks: what a request asks for, how a delivery is signed, which URLs may be called.

The signature is Stripe's scheme: `Stagecoach-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under the secret>`. A receiver recomputes it over the raw body and compares in constant
time, and refuses an old `t` (replays). Pure functions: the API, the delivery task and receivers
(tests, examples) share them.
"""

import hashlib
import hmac
import ipaddress
import time
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

SIGNATURE_HEADER = "Stagecoach-Signature"
SIGNATURE_VERSION = "v1"
LOOPBACK = ["127.0.0.0/8", "::1", "localhost"]  # the default allow-list: this machine only

DeliveryState = Literal["pending", "retrying", "delivered", "dead-lettered"]


class Webhook(BaseModel):
    """Where to send the JobResult once the job ends, and the secret that signs it."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, pattern=r"^https?://", description="http(s) URL, on the allow-list")
    secret: str = Field(min_length=16, max_length=256, description="HMAC-SHA256 key of the signature (>= 16 chars)")


class WebhookDelivery(BaseModel):
    """The state of a job's completion webhook, as its status shows it."""

    state: DeliveryState
    url: str
    attempts: int = 0
    last_status: int | None = Field(None, description="HTTP status of the last attempt (None: no answer)")
    last_error: str | None = None
    delivered_at: float | None = None
    updated_at: float | None = None


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The `Stagecoach-Signature` header value of `body`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},{SIGNATURE_VERSION}={mac}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300.0, now: float | None = None) -> bool:
    """Whether `header` signs `body` with `secret`, made at most `tolerance` seconds ago."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
        given = parts[SIGNATURE_VERSION]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split(f"{SIGNATURE_VERSION}=", 1)[1]
    return hmac.compare_digest(expected, given)


def refused(url: str, allowed: list[str]) -> str | None:
    """Why `url` may not be called (None when it may): its host must be named on the allow-list, or be an
    IP address inside one of its networks. Hostnames are matched as written, never resolved, so a name
    cannot be pointed at another host later."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError as error:
        return f"not a URL: {error}"
    if parts.scheme not in ("http", "https") or not host:
        return "expected an http:// or https:// URL with a host"
    if any(_matches(host, entry) for entry in allowed):
        return None
    return f"host '{host}' is not on the webhook allow-list (STAGECOACH_WEBHOOK_ALLOW: {', '.join(allowed)})"


def _matches(host: str, entry: str) -> bool:
    entry = entry.strip().lower()
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return host == entry or (entry.startswith("*.") and host.endswith(entry[1:]))
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:
        return False
