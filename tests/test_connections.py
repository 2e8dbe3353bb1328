"""The one Redis connection factory (contracts/connections.py, issue 20): it returns working clients for every URL
form (redis://, rediss:// on the TLS fixture, unix://, sentinel:// against a real master and sentinels, with the
sentinels' own password), a Sentinel client follows a failover by itself, the broker and result backend run real
jobs over sentinel:// (a chord counted natively, a poison message screened), and no product code opens a Redis
client any other way. The slow failover of a whole fleet is tests/chaos/test_sentinel_failover.py."""

import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.backends.redis import SentinelBackend

from cli.fleet import process
from cli.stack import redis_binary
from contracts.catalog import load_catalog
from contracts.connections import SentinelSettings, SentinelURL, redis_client
from contracts.names import DEAD_LETTER_KEY, MONITOR_KEY_PREFIX, stage_queue
from routing.client import Client
from tests.monitor_services import get_json, monitor_service
from tests.reliability_kit import catalog_paths, letters, qa_fleet, wait_for
from tests.sentinel_kit import SentinelSet, sentinel_set
from tests.services import ROOT, Fleet, client_for, wait_until, worker_env
from tests.test_reliability_tls import TlsRedis, make_certificates, server  # noqa: F401  (the TLS fixture)
from workers.factory import celery_config
from workers.settings import Settings

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
MASTER_PASSWORD = "master-" + uuid.uuid4().hex[:8]
SENTINEL_PASSWORD = "sentinel-" + uuid.uuid4().hex[:8]
SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])"


def works(client: redis.Redis, text: bool = False) -> None:
    """A round trip, a pipeline and a Lua script (the ledger's three ways of talking to Redis)."""
    key = f"factory-probe:{uuid.uuid4().hex}"
    client.set(key, "1", ex=60)
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.get(key)
    assert pipe.execute()[1] == ("2" if text else b"2")
    assert client.register_script(SCRIPT)(keys=[key], args=["3"]) == ("3" if text else b"3")
    client.delete(key)


# --- every URL form ------------------------------------------------------------------------------------

def test_redis_url(private_redis: str) -> None:
    works(redis_client(private_redis))
    works(redis_client(private_redis, decode_responses=True), text=True)


def test_rediss_url_with_its_ssl_query_options(server: TlsRedis) -> None:  # noqa: F811
    client = redis_client(server.url, socket_connect_timeout=5)
    works(client)
    assert type(client.connection_pool.get_connection()).__name__ == "SSLConnection"


@pytest.fixture(scope="module")
def unix_socket() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="stagecoach-unix-"))
    path = folder / "redis.sock"
    cmd = [redis_binary(), "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700", "--save", "",
           "--appendonly", "no", "--dir", str(folder)]
    with process(cmd, path.exists, "redis-server on a unix socket", timeout=20):
        yield path


def test_unix_socket_url(unix_socket: Path) -> None:
    client = redis_client(f"unix://{unix_socket}?db=2")
    works(client)
    assert client.connection_pool.connection_kwargs["db"] == 2


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    """One master, one replica, one sentinel (quorum 1), passwords on the master and on the sentinel."""
    with sentinel_set(replicas=1, sentinels=1, password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD) as s:
        yield s


def test_sentinel_url_gives_a_client_of_the_master(sentinels: SentinelSet) -> None:
    client = redis_client(sentinels.url, SentinelSettings(password=SENTINEL_PASSWORD), decode_responses=True)
    works(client, text=True)
    assert client.info("server")["tcp_port"] == sentinels.master_port()
    assert client.info("replication")["role"] == "master"


def test_a_wrong_sentinel_password_is_refused(sentinels: SentinelSet) -> None:
    client = redis_client(sentinels.url, SentinelSettings(password="wrong"), socket_connect_timeout=2)
    with pytest.raises(redis.ConnectionError):  # redis-py: no sentinel answered for the master
        client.ping()


def test_sentinel_url_forms_are_parsed_and_bad_ones_named() -> None:
    parsed = SentinelURL.parse("sentinel://u:p%40ss@s1:26380/3;sentinel://s2;sentinel://s3:26381")
    assert parsed.sentinels == [("s1", 26380), ("s2", 26379), ("s3", 26381)]
    assert (parsed.db, parsed.username, parsed.password) == (3, "u", "p@ss")
    with pytest.raises(ValueError, match=r"expected sentinel://host:26379.*got redis://s2"):
        SentinelURL.parse("sentinel://:secret@s1:26379;redis://s2:6379")
    with pytest.raises(ValueError, match=r"path must be a database number") as caught:
        SentinelURL.parse("sentinel://:secret@s1:26379/zero")
    assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match=r"expected one of redis://, rediss://, unix://, sentinel://"):
        redis_client("http://127.0.0.1:6379")


def test_settings_take_sentinel_urls_and_give_celery_the_masters_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGECOACH_SENTINEL_MASTER", "cache-master")
    monkeypatch.setenv("STAGECOACH_SENTINEL_PASSWORD", "s3cret")
    settings = Settings(broker_url="sentinel://s1:26379/1;sentinel://s2:26379", redis_password="pw")  # type: ignore[arg-type]
    assert settings.broker_url == "sentinel://:pw@s1:26379/1;sentinel://s2:26379"  # the master's, on the first part
    assert settings.broker_is_redis and settings.backend_url == settings.broker_url
    config = celery_config(settings, load_catalog([ROOT / "pipelines"]))
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["master_name"] == "cache-master"
        assert options["sentinel_kwargs"]["password"] == "s3cret"
    assert config["worker_disable_prefetch"] is True
    with pytest.raises(ValueError, match=r"STAGECOACH_BROKER_URL: sentinel URL .*got redis://r:6379"):
        Settings(broker_url="sentinel://s1:26379;redis://r:6379")
    with pytest.raises(ValueError, match=r"STAGECOACH_RESULT_BACKEND: sentinel URL .*database number"):
        Settings(result_backend="sentinel://s1:26379/first")
    with pytest.raises(ValueError, match=r"redis://, rediss:// or sentinel://"):
        Settings(broker_url="amqp://guest@rabbit//", result_backend="unix:///run/redis.sock")


# --- a Sentinel client follows a failover by itself --------------------------------------------------------

def test_a_sentinel_client_follows_a_failover(sentinels: SentinelSet) -> None:
    """The same client object (no reconnect by hand) writes to the promoted replica, and a Lua script runs there
    although the new master's script cache is empty (the ledger's NOSCRIPT path)."""
    from workers.checkpoint import execute_with_scripts

    client = redis_client(sentinels.url, SentinelSettings(password=SENTINEL_PASSWORD), decode_responses=True)
    script = client.register_script(SCRIPT)
    key = f"failover-probe:{uuid.uuid4().hex}"
    assert execute_with_scripts(client, lambda p: p.evalsha(script.sha, 1, key, "before"), [script]) == ["before"]
    client.execute_command("WAIT", 1, 5000)  # the replica has it: this test is about the client, not lost writes
    old = sentinels.kill_master()
    new = sentinels.wait_failover(old)
    assert new.client(MASTER_PASSWORD).script_exists(script.sha) == [False]  # NOSCRIPT is what the ledger meets

    def written() -> bool:
        try:
            return execute_with_scripts(client, lambda p: p.evalsha(script.sha, 1, key, "after"), [script]) == ["after"]
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    wait_for(written, 30, "a write through the same client after the failover")
    assert client.info("server")["tcp_port"] == new.port
    assert new.client(MASTER_PASSWORD).get(key) == "after"


# --- Celery's broker and result backend over sentinel:// ---------------------------------------------------

@pytest.fixture(scope="module")
def sentinel_stack(lm_url: str) -> Iterator[tuple[SentinelSet, Fleet, Client]]:
    """Three sentinels, a master with a password and a replica; workers and client on the sentinel:// URL."""
    with sentinel_set(replicas=1, sentinels=3, password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD) as s:
        env = {"STAGECOACH_SENTINEL_PASSWORD": SENTINEL_PASSWORD}
        mp = pytest.MonkeyPatch()
        mp.setenv("STAGECOACH_SENTINEL_PASSWORD", SENTINEL_PASSWORD)  # the client's settings read it too
        try:
            with qa_fleet(s.url, lm_url, stages=(), shared=("key_terms", "answer", "summarize", "tone", "entities"),
                          **env) as fleet:
                yield s, fleet, client_for(s.url, lm_url, catalog_paths())
        finally:
            mp.undo()


def test_jobs_run_over_sentinel_with_native_chords(sentinel_stack: tuple[SentinelSet, Fleet, Client]) -> None:
    sentinels, fleet, client = sentinel_stack
    assert isinstance(client.app.backend, SentinelBackend) and client.app.backend.supports_native_join
    result = client.submit("qa", {"question": "Through the sentinels?"}).get(timeout=120)
    assert result.ok and result.answer["answer"] == "answer of <Through the sentinels?>"
    chord = client.submit("parallel_analysis", {"document": "Barges carry coal on the Rhine."}).get(timeout=120)
    assert chord.ok, chord.error
    assert {t.stage for t in chord.timings} == {"summarize", "tone", "entities"}
    logs = "".join(w.log_text() for w in fleet.workers)
    assert "chord_unlock" not in logs  # the Redis backend counts the members itself: no polling task
    master = sentinels.master().client(MASTER_PASSWORD)
    assert master.exists(f"celery-task-meta-{result.job_id}")  # results live on the master the sentinels name


def test_a_poison_message_is_screened_on_a_sentinel_broker(sentinel_stack: tuple[SentinelSet, Fleet, Client]) -> None:
    sentinels, fleet, client = sentinel_stack
    db = redis_client(sentinels.url, SentinelSettings(password=SENTINEL_PASSWORD))
    before = db.llen(DEAD_LETTER_KEY)
    raw = f"not json {uuid.uuid4().hex}".encode()
    db.lpush(stage_queue("answer"), raw)
    letter = wait_for(lambda: next((e for e in letters(db)[: db.llen(DEAD_LETTER_KEY) - before] if e.raw == raw),
                                   None), 60, "a dead letter for the raw message")
    assert "not JSON" in letter.reason and letter.queue == stage_queue("answer")
    assert all(worker.proc.poll() is None for worker in fleet.workers)
    assert screening_named(client)
    assert client.submit("qa", {"question": "Still serving?"}).get(timeout=120).ok


def test_the_monitor_reads_events_and_keeps_its_store_through_the_sentinels(
        sentinel_stack: tuple[SentinelSet, Fleet, Client], lm_url: str, tmp_path: Path) -> None:
    sentinels, _, client = sentinel_stack
    env = {"STAGECOACH_SENTINEL_PASSWORD": SENTINEL_PASSWORD}
    with monitor_service(sentinels.url, lm_url, tmp_path, **env) as monitor:
        result = client.submit("qa", {"question": "Watched through the sentinels?"}).get(timeout=120)
        assert result.ok
        wait_until(lambda: any(p["name"] == "qa" and p["runs"] >= 1
                               for p in get_json(f"{monitor}/api/stats")["pipelines"]), 60, "the qa job counted")
        assert get_json(f"{monitor}/api/queues")[stage_queue("answer")] == 0  # depths read from the master
    master = sentinels.master().client(MASTER_PASSWORD)
    assert master.keys(f"{MONITOR_KEY_PREFIX}*")  # the store lives on the master the sentinels name


def test_jobs_run_over_sentinel_with_tls_everywhere(lm_url: str, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """Master, replica and sentinel on TLS ports only (STAGECOACH_SENTINEL_TLS): the factory, kombu's sentinel
    transport (broker_use_ssl) and Celery's sentinel backend (redis_backend_use_ssl) all verify against the CA."""
    make_certificates(tmp_path)
    env = {"STAGECOACH_SENTINEL_TLS": "true", "STAGECOACH_SENTINEL_TLS_CA_CERTS": str(tmp_path / "ca.pem")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with sentinel_set(replicas=1, sentinels=1, password=MASTER_PASSWORD, tls=tmp_path) as tls:
        client = redis_client(tls.url)
        works(client)
        assert type(client.connection_pool.get_connection()).__name__ == "SentinelManagedSSLConnection"
        with qa_fleet(tls.url, lm_url, stages=(), shared=("key_terms", "answer"), **env) as fleet:
            result = client_for(tls.url, lm_url, catalog_paths()).submit("qa", {"question": "Sealed?"}).get(timeout=120)
            assert result.ok and result.answer["answer"] == "answer of <Sealed?>"
            assert "insecure" not in "".join(w.log_text() for w in fleet.workers)


def screening_named(client: Client) -> bool:
    """The workers' broker connection is the screening Sentinel transport (`celery inspect stats` names it)."""
    stats = client.app.control.inspect(timeout=5).stats() or {}
    return bool(stats) and all(s["broker"]["transport"] == "sentinel (screening)" for s in stats.values())


# --- every Stagecoach Redis client comes from the factory ----------------------------------------------------

PRODUCT_EXCLUDED = {"tests", ".venv", "node_modules", "build", "dist"}
FACTORY = ROOT / "contracts" / "connections.py"
OTHER_WAYS = re.compile(r"Redis\.from_url|redis\.from_url|StrictRedis|\bRedis\(|\bSentinel\(|ConnectionPool\(|"
                        r"UnixDomainSocketConnection|SSLConnection\(")


def product_files() -> list[Path]:
    return [path for path in ROOT.rglob("*.py")
            if not PRODUCT_EXCLUDED & set(path.relative_to(ROOT).parts) and path != FACTORY]


def test_no_product_code_opens_redis_but_the_factory() -> None:
    files = product_files()
    assert {"workers", "routing", "monitor", "cli", "bench"} <= {p.relative_to(ROOT).parts[0] for p in files}
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1) if OTHER_WAYS.search(line)]
    assert not found, "Redis clients opened outside contracts/connections.py:\n" + "\n".join(found)
    assert OTHER_WAYS.search(FACTORY.read_text())  # the pattern does find the factory's own construction


def test_the_grep_would_catch_a_client_opened_by_hand(tmp_path: Path) -> None:
    sample = "db = redis.Redis.from_url(url)\nother = redis.Redis(host='h')\nlegacy = redis.StrictRedis()\n"
    assert len([line for line in sample.splitlines() if OTHER_WAYS.search(line)]) == 3


def test_the_monitor_package_uses_the_factory_from_contracts() -> None:
    text = subprocess.run(["grep", "-rn", "redis_client", str(ROOT / "monitor")], capture_output=True, text=True).stdout
    assert "from contracts.connections import" in text


def test_up_says_it_does_not_start_sentinel(tmp_path: Path) -> None:
    """`stagecoach up` starts a private Redis when the configured one is down, but never in place of sentinels."""
    env = {**worker_env("sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2", "http://127.0.0.1:1/v1", catalog_paths()),
           "HOME": str(tmp_path)}
    done = subprocess.run([STAGECOACH, "up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    assert "through the sentinels of sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2 (master 'mymaster'" in \
        done.stderr.replace("\n", "")
    assert "starts a plain Redis, not Sentinel" in done.stderr.replace("\n", "")
