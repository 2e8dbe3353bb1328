"""The monitor service: the event consumer (a replica in the fleet stream's consumer group) in a thread
and an HTTP server in the same process.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from pydantic import BaseModel

from contracts.catalog import Catalog, load_catalog
from contracts.errors import StagecoachError
from contracts.names import ROUTING_QUEUE, stage_queue
from contracts.schema import pipeline_schemas
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


class Handler(BaseHTTPRequestHandler):
    monitor: Monitor  # set on the subclass made by `serve`

    def do_GET(self) -> None:
        url = urlparse(self.path)
        try:
            self.route(url.path, parse_qs(url.query))
        except BadQuery as error:
            self.send(400, "text/plain", str(error).encode())
        except (KeyError, StagecoachError) as error:
            self.send(404, "text/plain", f"not found: {error}".encode())
        except Exception as error:  # one bad request must not stop the server
            log.exception("GET %s", self.path)
            self.send(500, "text/plain", f"error: {error}".encode())

    def route(self, path: str, query: dict[str, list[str]]) -> None:
        monitor = self.monitor
        if path in ("/", "/index.html"):
            self.static("index.html")
        elif path.startswith("/static/"):
            self.static(path[len("/static/"):])
        elif path == "/healthz":  # ready once the consumer reads the event stream in its group
            live = monitor.consumer.live.is_set()
            self.send(200 if live else 503, "text/plain", b"ok" if live else b"connecting to the event stream")
        elif path == "/api/health":
            self.json(monitor.consumer.status())
        elif path == "/metrics":
            self.send(200, "text/plain; version=0.0.4; charset=utf-8", exposition(monitor.collector))
        elif path == "/api/stats":
            self.json(monitor.store.report())
        elif path == "/api/series":
            self.json(monitor.store.series(_int(query, "buckets", 60)))
        elif path == "/api/queues":
            self.json(monitor.queue_depths())
        elif path == "/api/pipelines":
            self.json(monitor.pipelines())
        elif path.startswith("/api/graph/") and path.endswith(".svg"):
            self.send(200, "image/svg+xml", monitor.svg(path[len("/api/graph/"):-len(".svg")]))
        elif path.startswith("/api/schema/"):
            self.json(monitor.schemas(path[len("/api/schema/"):]))
        elif path == "/api/jobs":
            self.json(monitor.store.jobs(_int(query, "limit", 50)))
        elif path.startswith("/api/trace/"):
            job_id = path[len("/api/trace/"):]
            self.json(trace.build(job_id, monitor.store.trace(job_id)))
        else:
            raise KeyError(path)

    def static(self, name: str) -> None:
        file = (STATIC / name).resolve()
        if STATIC not in file.parents or not file.is_file():
            raise KeyError(name)
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self.send(200, kind, file.read_bytes())

    def json(self, data: Any) -> None:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        self.send(200, "application/json", json.dumps(data).encode())

    def send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    raw = query.get(name, [str(default)])[0]
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"query parameter '{name}': not an integer ({raw!r})") from None
    if value < 1:
        raise BadQuery(f"query parameter '{name}': must be at least 1 (got {value})")
    return value


def serve(settings: MonitorSettings, stop: threading.Event) -> None:
    """Run the consumer and the HTTP server until `stop` is set."""
    store = Store.connect(settings)
    consumer = Consumer(store, settings)
    handler = type("BoundHandler", (Handler,), {"monitor": Monitor(settings, store, load(settings), consumer)})
    server = ThreadingHTTPServer((settings.host, settings.port), handler)
    threads = [threading.Thread(target=consumer.run, name="events", daemon=True),
               threading.Thread(target=server.serve_forever, name="http", daemon=True)]
    for thread in threads:
        thread.start()
    log.info("monitor on http://%s:%s (events from %s, as %s)", settings.host, settings.port, settings.store,
             settings.consumer_name)
    try:
        stop.wait()
    finally:
        consumer.stop()
        server.shutdown()
        server.server_close()
