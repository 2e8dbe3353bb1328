"""The monitor service: the event consumer (a replica in the fleet stream's consumer group) in a thread and
its HTTP side (FastAPI under uvicorn) in another.

With STAGECOACH_MONITOR_AUTH on, every route needs an API token (contracts/tokens.py) with the read scope
over every pipeline; a browser gives it once as `/?token=...` (kept in a cookie). Auth off is refused on
any address but loopback.

Routes (all GET):
  /                     the web page (static/index.html; Chart.js served from static/vendor)
  /api/stats            the Report (per stage, per pipeline, stage x pipeline, error groups)
  /api/series?buckets=N per-stage and per-pipeline time series (runs, errors, mean seconds)
  /api/queues           messages waiting per stage queue and the routing queue
  /api/pipelines        every pipeline's graph model and Mermaid text
  /api/graph/NAME.svg   the pipeline drawn by Graphviz (what `stagecoach graph NAME --format svg` prints)
  /api/schema/NAME      JSON Schemas of the pipeline's request and JobResult (`stagecoach schema NAME`)
  /api/jobs             the latest job ids with a trace;  /api/trace/JOB  one job's trace
  /metrics              Prometheus text;  /healthz  ok;  /api/health  events counted here, the stream's lag
"""

import json
import logging
import mimetypes
import threading
from functools import cache
from pathlib import Path
from typing import Any

import redis
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.catalog import Catalog, load_catalog
from contracts.errors import StagecoachError
from contracts.names import ROUTING_QUEUE, stage_queue
from contracts.schema import pipeline_schemas
from contracts.tokens import TokenRecord, TokenStore, bearer
from monitor import graph, trace
from monitor.consumer import Consumer
from monitor.errors import BadQuery, MonitorError
from monitor.metrics import ReportCollector, exposition
from monitor.queues import depth_reader
from monitor.settings import MonitorSettings
from monitor.store import Store

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


class Monitor:
    """What the HTTP handlers read: the store, the broker (queue depths) and the catalog (graphs)."""

    def __init__(self, settings: MonitorSettings, store: Store, catalog: Catalog | None, consumer: Consumer) -> None:
        self.settings = settings
        self.consumer = consumer
        self.store = store
        self.catalog = catalog
        self.depths = depth_reader(settings.broker_url, settings.sentinel)
        self.collector = ReportCollector(store.report, self.queue_depths)

    def queue_depths(self) -> dict[str, int]:
        stages = list(self.catalog.stages) if self.catalog else self.store.names("stage")
        return self.depths([stage_queue(name) for name in stages] + [ROUTING_QUEUE])

    def pipelines(self) -> list[dict[str, Any]]:
        if self.catalog is None:
            return []
        graphs = [graph.build(self.catalog, name) for name in sorted(self.catalog.pipelines)]
        return [{**g.model_dump(mode="json"), "mermaid": graph.mermaid(g)} for g in graphs]

    def schemas(self, pipeline: str) -> dict[str, Any]:
        if self.catalog is None:
            raise MonitorError("no catalog loaded")
        return pipeline_schemas(self.catalog, pipeline)

    @cache  # noqa: B019 (one Monitor per process; the catalog does not change while it runs)
    def svg(self, pipeline: str) -> bytes:
        if self.catalog is None:
            raise MonitorError("no catalog loaded")
        return graph.render(graph.build(self.catalog, pipeline), "svg")


def load(settings: MonitorSettings) -> Catalog | None:
    try:
        return load_catalog(settings.catalog)
    except StagecoachError as error:
        log.warning("no pipeline graphs: cannot load the catalog (%s)", error)
        return None


def create_app(monitor: Monitor, guard: "Guard") -> FastAPI:
    """The monitor's routes (unchanged for their users: same paths, bodies and content types)."""
    app = FastAPI(title="Stagecoach monitor", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(guard)])

    @app.exception_handler(_Login)
    async def _login(request: Request, error: _Login) -> Response:
        return _login_redirect(error.token)

    @app.exception_handler(BadQuery)
    async def _bad(request: Request, error: BadQuery) -> Response:
        return _text(400, str(error))

    @app.exception_handler(StagecoachError)
    async def _unknown(request: Request, error: StagecoachError) -> Response:
        return _text(404, f"not found: {error}")

    @app.exception_handler(KeyError)
    async def _missing(request: Request, error: KeyError) -> Response:
        return _text(404, f"not found: {error}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> Response:
        return _text(error.status_code, str(error.detail), dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception) -> Response:  # one bad request must not stop the server
        log.exception("GET %s", request.url.path)
        return _text(500, f"error: {error}")

    @app.get("/")
    @app.get("/index.html")
    def page() -> Response:
        return static("index.html")

    @app.get("/static/{name:path}")
    def static_file(name: str) -> Response:
        return static(name)

    @app.get("/healthz")
    def healthz() -> Response:  # ready once the consumer reads the event stream in its group
        live = monitor.consumer.live.is_set()
        return _text(200 if live else 503, "ok" if live else "connecting to the event stream")

    @app.get("/api/health")
    def health() -> Response:
        return _json(monitor.consumer.status())

    @app.get("/metrics")
    def metrics() -> Response:
        return _plain(exposition(monitor.collector), "text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/stats")
    def stats() -> Response:
        return _json(monitor.store.report())

    @app.get("/api/series")
    def series(buckets: str = "60") -> Response:
        return _json(monitor.store.series(_int("buckets", buckets)))

    @app.get("/api/queues")
    def queues() -> Response:
        return _json(monitor.queue_depths())

    @app.get("/api/pipelines")
    def pipelines() -> Response:
        return _json(monitor.pipelines())

    @app.get("/api/graph/{name}.svg")
    def graph_svg(name: str) -> Response:
        return _plain(monitor.svg(name), "image/svg+xml")

    @app.get("/api/schema/{name}")
    def schema(name: str) -> Response:
        return _json(monitor.schemas(name))

    @app.get("/api/jobs")
    def jobs(limit: str = "50") -> Response:
        return _json(monitor.store.jobs(_int("limit", limit)))

    @app.get("/api/trace/{job_id}")
    def job_trace(job_id: str) -> Response:
        return _json(trace.build(job_id, monitor.store.trace(job_id)))

    return app


TOKEN_COOKIE = "stagecoach_token"


class Guard:
    """The monitor behind the API's tokens (when its auth is on): a token with the `read` scope over every
    pipeline (the monitor shows them all), as `Authorization: Bearer` or, for the page in a browser, the
    cookie that `/?token=...` sets once."""

    def __init__(self, tokens: TokenStore | None) -> None:
        self.tokens = tokens  # None: auth off

    def __call__(self, request: Request, token: str | None = None) -> None:
        if self.tokens is None:
            return
        given = bearer(request.headers.get("authorization")) or token or request.cookies.get(TOKEN_COOKIE)
        record = self.tokens.check(given) if given else None
        if record is None:
            raise StarletteHTTPException(401, "the monitor needs an API token: `Authorization: Bearer <token>`, or "
                                              "open /?token=<token> once in a browser", {"WWW-Authenticate": "Bearer"})
        if not record.allows("read") or record.pipelines is not None:
            raise StarletteHTTPException(403, f"token '{record.name}' needs the read scope over every pipeline")
        if token and request.url.path in ("/", "/index.html"):  # remember it, and take it out of the address bar
            raise _Login(given or "")


class _Login(Exception):
    def __init__(self, token: str) -> None:
        super().__init__("login")
        self.token = token


def _login_redirect(token: str) -> Response:
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
    return response


def static(name: str) -> Response:
    file = (STATIC / name).resolve()
    if STATIC not in file.parents or not file.is_file():
        raise KeyError(name)
    kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return _plain(file.read_bytes(), kind)


def _json(data: Any) -> Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return _plain(json.dumps(data).encode(), "application/json")


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return _plain(text.encode(), "text/plain", status, headers)


def _plain(body: bytes, kind: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=kind, headers={"Cache-Control": "no-store", **(headers or {})})


def _int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"query parameter '{name}': not an integer ({raw!r})") from None
    if value < 1:
        raise BadQuery(f"query parameter '{name}': must be at least 1 (got {value})")
    return value


class UnsafeBind(MonitorError):
    """Auth off on an address other machines reach."""


def check_bind(settings: MonitorSettings) -> None:
    loopback = settings.host in ("127.0.0.1", "localhost", "::1") or settings.host.startswith("127.")
    if not settings.auth and not loopback:
        raise UnsafeBind(f"monitor: refusing to listen on {settings.host} with auth off: its traces show jobs' inputs "
                         "and outputs. Set STAGECOACH_MONITOR_AUTH=true (tokens: `stagecoach tokens create NAME "
                         "--scope read`) or bind 127.0.0.1")


def guard_of(settings: MonitorSettings, client: redis.Redis) -> Guard:
    if not settings.auth:
        return Guard(None)
    tokens = TokenStore(client)
    if settings.admin_token is not None:  # the deployment's admin token works here as in the API
        tokens.ensure(TokenRecord(name="admin", scopes=["admin"]), settings.admin_token.get_secret_value())
    return Guard(tokens)


def serve(settings: MonitorSettings, stop: threading.Event) -> None:
    """Run the consumer and the HTTP server (uvicorn) until `stop` is set."""
    check_bind(settings)
    store = Store.connect(settings)
    consumer = Consumer(store, settings)
    web = create_app(Monitor(settings, store, load(settings), consumer), guard_of(settings, store.r))
    server = uvicorn.Server(uvicorn.Config(web, host=settings.host, port=settings.port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    threads = [threading.Thread(target=consumer.run, name="events", daemon=True),
               threading.Thread(target=server.run, name="http", daemon=True)]
    for thread in threads:
        thread.start()
    log.info("monitor on http://%s:%s (events from %s, as %s)", settings.host, settings.port, settings.store,
             settings.consumer_name)
    try:
        stop.wait()
    finally:
        consumer.stop()
        server.should_exit = True
        threads[1].join(10)
