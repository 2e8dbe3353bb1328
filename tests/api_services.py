"""The HTTP API's test services: `stagecoach api` as a subprocess (real uvicorn), a webhook receiver that
checks signatures, and a fleet with the webhook worker."""

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from cli.fleet import stop_process
from contracts.names import WEBHOOK_QUEUE
from contracts.webhooks import SIGNATURE_HEADER, verify
from tests.services import CELERY, ROOT, free_port, wait_until

STAGECOACH = str(Path(CELERY).with_name("stagecoach"))


@contextmanager
def api_server(env: dict[str, str], logdir: Path, name: str = "api", **settings: str) -> Iterator[str]:
    """`stagecoach api` on a free port with `settings` (STAGECOACH_API_* without the prefix); yields its URL."""
    port = free_port()
    env = {**env, "STAGECOACH_API_PORT": str(port), **{f"STAGECOACH_API_{k.upper()}": v for k, v in settings.items()}}
    log = (logdir / f"{name}.log").open("wb")
    proc = subprocess.Popen([STAGECOACH, "api"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            output = (logdir / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"stagecoach api exited ({proc.returncode}): {output}")
        try:
            return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "stagecoach api")
        yield url
    finally:
        stop_process(proc)
        log.close()


@dataclass
class Delivery:
    job_id: str
    body: bytes
    signature: str
    attempt: int
    valid: bool

    @property
    def result(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A webhook receiver: verifies each delivery's signature, answers 500 to the first `fail_first` deliveries
    of each job (then 200)."""

    secret: str
    fail_first: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    url: str = ""

    def ok(self, job_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.job_id == job_id]


@contextmanager
def receiver(secret: str, fail_first: int = 0) -> Iterator[Receiver]:
    found = Receiver(secret, fail_first)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            job_id = self.headers.get("Stagecoach-Job", "")
            with lock:
                seen = len(found.ok(job_id))
                found.deliveries.append(Delivery(job_id, body, self.headers.get(SIGNATURE_HEADER, ""),
                                                 int(self.headers.get("Stagecoach-Attempt", "0")),
                                                 verify(found.secret, body, self.headers.get(SIGNATURE_HEADER, ""))))
            self.send_response(500 if seen < found.fail_first else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()


def webhook_queue() -> list[str]:
    return [WEBHOOK_QUEUE]
