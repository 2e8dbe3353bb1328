"""The monitor's test services: the monitor service, Flower and headless Chromium, as subprocesses."""

import json
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli.fleet import stop_process
from tests.services import CELERY, ROOT, free_port, wait_until, worker_env

STAGECOACH = str(Path(CELERY).with_name("stagecoach"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def get(url: str, token: str | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return bytes(response.read())


def get_json(url: str, token: str | None = None) -> Any:
    return json.loads(get(url, token))


def _up(url: str, token: str | None = None) -> bool:
    try:
        get(url, token)
        return True
    except OSError:
        return False


@contextmanager
def monitor_service(redis_url: str, lm_url: str, logdir: Path, token: str | None = None,
                    **settings: str) -> Iterator[str]:
    """`stagecoach monitor` on a free port (`settings`: more environment, e.g. STAGECOACH_MONITOR_TRACES,
    STAGECOACH_MONITOR_AUTH); yields its base URL once it reads the fleet's event stream in its consumer
    group (/healthz; `token`: what to read it with when its auth is on)."""
    with monitor_process(redis_url, lm_url, logdir, token, **settings) as (url, _):
        yield url


@contextmanager
def monitor_process(redis_url: str, lm_url: str, logdir: Path, token: str | None = None, **settings: str
                    ) -> Iterator[tuple[str, "subprocess.Popen[bytes]"]]:
    """`monitor_service`, also yielding the process (a test may kill it)."""
    port = free_port()
    env = {**worker_env(redis_url, lm_url), **settings, "STAGECOACH_MONITOR_PORT": str(port)}
    name = settings.get("STAGECOACH_MONITOR_CONSUMER", str(port))
    log = (logdir / f"monitor-{name}.log").open("wb")
    proc = subprocess.Popen([STAGECOACH, "monitor"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and _up(f"{url}/healthz", token), 60, "monitor HTTP and event stream")
        yield url, proc
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def flower(redis_url: str, lm_url: str, logdir: Path) -> Iterator[str]:
    """Flower on a free port against the test Redis, its API open as `stagecoach up` configures it."""
    port = free_port()
    env = {**worker_env(redis_url, lm_url), "FLOWER_UNAUTHENTICATED_API": "true"}
    log = (logdir / "flower.log").open("wb")
    cmd = [CELERY, "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and _up(f"{url}/healthcheck"), 60, "flower")
        yield url
    finally:
        stop_process(proc)
        log.close()


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("Debian's `chromium` is not installed: `make system-deps` (or apt-get install chromium)")
    return found


def browse(url: str, screenshot: Path, budget_ms: int = 8000) -> str:
    """The page's DOM after its scripts ran (virtual time), and a screenshot of it."""
    profile = tempfile.mkdtemp(prefix="stagecoach-chromium-")
    base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,2000",
            f"--virtual-time-budget={budget_ms}"]
    try:
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return dom.stdout


def png_stats(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decoded image data): a blank page has very few."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    idat, at = b"", 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            idat += data[at + 8:at + 8 + length]
        at += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}
