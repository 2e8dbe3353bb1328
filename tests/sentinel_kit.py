"""Redis Sentinel on loopback for tests: a master, replicas and sentinels, each a `redis-server` of its own on a
free port, their config files and data in one temp dir; every process is killed when the context ends."""

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli.stack import redis_binary
from tests.reliability_kit import wait_for
from tests.services import free_port

MASTER = "mymaster"


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    ca: Path | None = None  # TLS only: the CA that signed the node's certificate

    def client(self, password: str | None = None) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_cert_reqs": "required"} if self.ca else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=2,
                           socket_connect_timeout=2, decode_responses=True, **tls)

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class SentinelSet:
    """`replicas` replicas of one master watched by `sentinels` sentinels (quorum: a majority). A master that
    stops answering for `down_after_ms` is failed over. `password`: the master's and replicas' requirepass;
    `sentinel_password`: the sentinels' own requirepass. `tls`: a folder with ca.pem, server.pem and server.key
    (tests/test_reliability_tls.py: make_certificates): every node then listens on TLS only, replication too."""

    replicas: int = 1
    sentinels: int = 3
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    password: str | None = None
    sentinel_password: str | None = None
    tls: Path | None = None
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="stagecoach-sentinel-")))
    data: list[Node] = field(default_factory=list)  # the master first, then the replicas
    watchers: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """kombu's multi-sentinel URL; the master's password (if any) on the first part, database 0."""
        auth = f":{self.password}@" if self.password else ""
        first, *others = self.watchers
        return ";".join([f"sentinel://{auth}127.0.0.1:{first.port}/0",
                         *(f"sentinel://127.0.0.1:{node.port}" for node in others)])

    def start(self) -> None:
        master = self._data_node("master", [])
        for number in range(self.replicas):
            self._data_node(f"replica-{number}", ["--replicaof", "127.0.0.1", str(master.port)])
        for node in self.data[1:]:
            wait_for(lambda n=node: "master_link_status:up" in self._info(n), 30, f"{node.name} in sync")
        for number in range(self.sentinels):
            self._sentinel(number, master.port)
        for node in self.watchers:
            wait_for(lambda n=node: self._sees_everyone(n), 30, f"{node.name} knowing the others")

    def master_port(self) -> int:
        """The master's port as a sentinel that answers reports it now."""
        for node in self.watchers:
            with suppress(redis.RedisError):
                found = node.client(self.sentinel_password).execute_command("SENTINEL", "get-master-addr-by-name",
                                                                            MASTER)
                if found:
                    return int(found[1])
        raise AssertionError("no sentinel names a master")

    def master(self) -> Node:
        port = self.master_port()
        return next(node for node in self.data if node.port == port)

    def kill_master(self) -> Node:
        """SIGKILL the current master (no shutdown, no last save): the sentinels must fail it over."""
        node = self.master()
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        return node

    def wait_failover(self, old: Node, timeout: float = 60) -> Node:
        """The replica the sentinels promoted, once they name it and it answers as a master."""
        def promoted() -> Node | None:
            with suppress(redis.RedisError, AssertionError, StopIteration):
                node = self.master()
                if node is not old and node.client(self.password).info("replication")["role"] == "master":
                    return node
            return None

        found: Node = wait_for(promoted, timeout, "a replica promoted by the sentinels")
        return found

    def stop(self) -> None:
        for node in [*self.watchers, *self.data]:
            if node.alive():
                node.proc.kill()
                node.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- processes ---------------------------------------------------------------------------------

    def _data_node(self, name: str, extra: list[str]) -> Node:
        port = free_port()
        folder = self.folder / name
        folder.mkdir()
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        tls = [arg for line in self._tls_lines() for arg in (f"--{line.split()[0]}", line.split()[1])]
        listen = ["--port", "0", "--tls-port", str(port), *tls] if self.tls else ["--port", str(port)]
        cmd = [redis_binary(), *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder), *auth, *extra]
        node = self._spawn(name, port, cmd)
        self.data.append(node)
        wait_for(lambda: self._answers(node, self.password), 20, f"{name} on port {port}")
        return node

    def _sentinel(self, number: int, master_port: int) -> None:
        port = free_port()
        name = f"sentinel-{number}"
        quorum = self.sentinels // 2 + 1
        listen = ["port 0", f"tls-port {port}", *self._tls_lines()] if self.tls else [f"port {port}"]
        lines = [*listen, "bind 127.0.0.1", f"dir {self.folder}",
                 f"sentinel monitor {MASTER} 127.0.0.1 {master_port} {quorum}",
                 f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
                 f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {MASTER} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER} {self.password}")
        if self.sentinel_password:  # the sentinels' own password, which they also use among themselves
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        config = self.folder / f"{name}.conf"  # a sentinel rewrites its config file: one each, writable
        config.write_text("\n".join(lines) + "\n")
        node = self._spawn(name, port, [redis_binary(), str(config), "--sentinel"])
        self.watchers.append(node)
        wait_for(lambda: self._answers(node, self.sentinel_password), 20, f"{name} on port {port}")

    def _tls_lines(self) -> list[str]:
        """The TLS directives of every node (config-file form): its certificate, and TLS between the nodes."""
        if self.tls is None:
            return []
        return [f"tls-cert-file {self.tls / 'server.pem'}", f"tls-key-file {self.tls / 'server.key'}",
                f"tls-ca-cert-file {self.tls / 'ca.pem'}", "tls-auth-clients no", "tls-replication yes"]

    def _spawn(self, name: str, port: int, cmd: list[str]) -> Node:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return Node(name, port, proc, self.tls / "ca.pem" if self.tls else None)

    def _answers(self, node: Node, password: str | None) -> bool:
        if not node.alive():
            raise RuntimeError(f"{node.name} exited: {(self.folder / f'{node.name}.log').read_text()[-2000:]}")
        try:
            return bool(node.client(password).ping())
        except redis.RedisError:
            return False

    def _info(self, node: Node) -> str:
        with suppress(redis.RedisError):
            return "\n".join(f"{k}:{v}" for k, v in node.client(self.password).info("replication").items())
        return ""

    def _sees_everyone(self, node: Node) -> bool:
        try:
            client = node.client(self.sentinel_password)
            replicas = client.execute_command("SENTINEL", "replicas", MASTER)
            others = client.execute_command("SENTINEL", "sentinels", MASTER)
        except redis.RedisError:
            return False
        return len(replicas) == self.replicas and len(others) == self.sentinels - 1

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def sentinel_set(**options: object) -> Iterator[SentinelSet]:
    running = SentinelSet(**options)  # type: ignore[arg-type]
    try:
        running.start()
        yield running
    finally:
        running.stop()


def seconds_since(start: float) -> float:
    return round(time.time() - start, 2)
