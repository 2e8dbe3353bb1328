"""`stagecoach api`: the API under uvicorn; refuses a non-loopback address with auth off."""

import logging

import uvicorn

from api.app import create_app
from api.services import Services
from api.settings import APISettings, is_loopback
from workers.settings import Settings

log = logging.getLogger(__name__)


class UnsafeBind(ValueError):
    """Auth off on an address other machines reach."""


def check_bind(host: str, auth: bool, what: str, setting: str) -> None:
    if not auth and not is_loopback(host):
        raise UnsafeBind(f"{what}: refusing to listen on {host} with auth off: anyone who reaches it could use it. "
                         f"Turn auth on ({setting}=true, then `stagecoach tokens create NAME`) or bind 127.0.0.1")


def serve(settings: Settings, api: APISettings) -> None:
    check_bind(api.host, api.auth, "stagecoach api", "STAGECOACH_API_AUTH")
    services = Services.build(settings, api)
    services.register_admin_token()
    log.info("Stagecoach API on http://%s:%s (auth %s)", api.host, api.port, "on" if api.auth else "off")
    uvicorn.run(create_app(services), host=api.host, port=api.port, log_level="info", timeout_graceful_shutdown=5)
