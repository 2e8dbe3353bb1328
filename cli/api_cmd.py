"""`stagecoach api` (the HTTP API service) and `stagecoach tokens create | list | revoke`."""

import json
import logging
import time
from typing import Annotated

import typer

from cli import render
from cli.exits import EXIT_INPUT, EXIT_SERVICES

tokens_app = typer.Typer(help="API tokens for the HTTP API and the monitor: printed once, stored only as a hash.",
                         no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


def _fail(message: str, code: int) -> None:
    render.err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _store() -> "object":
    from cli.jobs import client_settings
    from cli.stack import redis_reachable
    from contracts.connections import redis_client
    from contracts.tokens import TokenStore
    from routing.client import safe_url

    settings = client_settings()
    if not redis_reachable(settings.backend_url):
        _fail(f"cannot reach Redis at {safe_url(settings.backend_url)}: start the stack with `stagecoach up` or set "
              "STAGECOACH_BROKER_URL", EXIT_SERVICES)
    return TokenStore(redis_client(settings.backend_url, settings.sentinel))


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@tokens_app.command("create")
def create(
    name: str,
    scope: Annotated[str, typer.Option(help="comma-separated: read (look), submit (start, cancel, resume), "
                                            "admin (all)")] = "read,submit",
    pipelines: Annotated[str | None, typer.Option(help="comma-separated: the only pipelines it may use")] = None,
    rate: Annotated[int | None, typer.Option(help="its own requests per minute (default "
                                                  "STAGECOACH_API_RATE_PER_MINUTE)")] = None,
) -> None:
    """Create a token and print it (once: only its SHA-256 is stored)."""
    from pydantic import ValidationError

    from contracts.tokens import TokenError, TokenRecord, TokenStore

    store = _store()
    assert isinstance(store, TokenStore)
    try:
        record = TokenRecord(name=name, scopes=_split(scope), pipelines=_split(pipelines) or None,  # type: ignore[arg-type]
                             rate_per_minute=rate)
        token = store.create(record)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        _fail(f"bad token: {problems} (scopes: read, submit, admin)", EXIT_INPUT)
    except TokenError as error:
        _fail(str(error), EXIT_INPUT)
    print(token)


@tokens_app.command("list")
def list_tokens(as_json: JsonFlag = False) -> None:
    """Every token's name, scopes, pipelines and creation time (never the token)."""
    from contracts.tokens import TokenStore

    store = _store()
    assert isinstance(store, TokenStore)
    records = store.list()
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=1))
        return
    rows = [(r.name, ",".join(r.scopes), ",".join(r.pipelines or ["(all)"]), str(r.rate_per_minute or "-"),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))) for r in records]
    render.out.print(render.rows_table("API tokens", ("name", "scopes", "pipelines", "per minute", "created"), rows))


@tokens_app.command("revoke")
def revoke(name: str) -> None:
    """Remove the token NAME: the API and the monitor refuse it from the next request on."""
    from contracts.tokens import TokenError, TokenStore

    store = _store()
    assert isinstance(store, TokenStore)
    try:
        store.revoke(name)
    except TokenError as error:
        _fail(str(error), EXIT_INPUT)
    render.out.print(f"token {name} revoked", highlight=False)


def api(
    port: Annotated[int | None, typer.Option(help="HTTP port (default STAGECOACH_API_PORT, 8000)")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP interface (default STAGECOACH_API_HOST, 127.0.0.1)")] = None,
) -> None:
    """Run the HTTP API in the foreground (FastAPI + uvicorn): submit, follow, stream, results, webhooks."""
    from api.serve import UnsafeBind, serve
    from api.settings import APISettings
    from cli.jobs import client_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    found = APISettings()
    chosen = found.model_copy(update={k: v for k, v in (("port", port), ("host", host)) if v is not None})
    try:
        serve(client_settings(), chosen)
    except UnsafeBind as error:
        _fail(str(error), EXIT_INPUT)
