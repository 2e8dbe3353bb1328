"""The `stagecoach` CLI as a user runs it: a subprocess talking to the session's real workers,
and `stagecoach up` starting and stopping a whole private stack."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from contracts.jobs import JobResult, JobStatus
from routing.client import Client
from tests.services import ROOT, Fleet, free_port, reachable, wait_until, worker_env
from workers.factory import create_runtime
from workers.settings import LMSettings, Settings

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))


@pytest.fixture(scope="module")
def cli_env(redis_url: str, lm_url: str, fleet: Fleet) -> dict[str, str]:
    return worker_env(redis_url, lm_url)


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STAGECOACH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def json_out(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.stdout.strip(), f"no stdout; stderr: {done.stderr}"
    return json.loads(done.stdout)


def test_submit_wait_json_prints_the_job_result(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = run(cli_env, tmp_path, "submit", "qa", "--input", "question=What is 42?", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    result = JobResult.model_validate(json_out(done))
    assert result.state == "succeeded"
    assert result.answer["answer"] == "answer of <What is 42?>"
    assert [t.stage for t in result.timings] == ["key_terms", "answer"]


def test_submit_wait_prints_answer_and_stage_timings(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = run(cli_env, tmp_path, "submit", "qa", "-i", "question=Readable?", "--wait")
    assert done.returncode == 0, done.stderr
    assert "succeeded (qa, " in done.stdout
    assert "answer of <Readable?>" in done.stdout
    assert "stage-key_terms" in done.stdout and "stage-answer" in done.stdout  # the workers that ran it


def test_submit_then_status_then_result(cli_env: dict[str, str], tmp_path: Path) -> None:
    submitted = run(cli_env, tmp_path, "submit", "digest", "-i", "document=Barges carry coal.")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32
    finished = run(cli_env, tmp_path, "result", job_id, "--wait", "--json")
    assert finished.returncode == 0, finished.stderr
    result = JobResult.model_validate(json_out(finished))
    assert (result.job_id, result.answer["summary"]) == (job_id, "summary of <Barges carry coal.>")
    status = JobStatus.model_validate(json_out(run(cli_env, tmp_path, "status", job_id, "--json")))
    assert (status.state, status.pipeline, status.stages_done) == ("succeeded", "digest", 2)


def test_unknown_job_is_an_error(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = run(cli_env, tmp_path, "result", "0" * 32)
    assert done.returncode == 3
    assert f"no job {'0' * 32}" in done.stderr


def test_pipelines_json_lists_stages_kinds_and_inputs(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = run(cli_env, tmp_path, "pipelines", "--json")
    assert done.returncode == 0, done.stderr
    by_name = {p["name"]: p for p in json_out(done)}
    assert by_name["qa"]["stages"] == ["key_terms", "answer"]
    assert by_name["qa"]["kinds"] == ["sequence", "stage"]
    assert by_name["qa"]["inputs"]["question"]["type"] == "str"
    assert by_name["digest"]["example"]["document"].startswith("The Rhine")


def test_example_input(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = run(cli_env, tmp_path, "submit", "qa", "--example", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json_out(done)["answer"]["answer"] == "answer of <What is the capital of France?>"


def test_input_file_reports_bad_lines_and_runs_the_others(cli_env: dict[str, str], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"question": "First?"}\n{"question": oops}\n\n{"question": 7}\n{"question": "Last?"}\n')
    done = run(cli_env, tmp_path, "submit", "qa", "--input-file", str(jobs), "--wait", "--json")
    assert done.returncode == 2
    assert "line 2: not JSON" in done.stderr
    assert "line 4: pipeline 'qa' inputs: field 'question'" in done.stderr
    rows = {row["line"]: row for row in json_out(done)}
    assert sorted(rows) == [1, 2, 4, 5]
    assert rows[1]["result"]["answer"]["answer"] == "answer of <First?>"
    assert rows[5]["result"]["answer"]["answer"] == "answer of <Last?>"
    assert rows[2]["job_id"] is None and "not JSON" in rows[2]["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "nope", "-i", "question=x"], "unknown pipeline 'nope'; known pipelines:"),
        (["submit", "qa"], "field 'question': missing required field"),
        (["submit", "qa", "-i", "question=x", "-i", "colour=red"], "field 'colour': unexpected field"),
        (["submit", "patterns_map", "-i", "question"], "--input 'question': expected NAME=VALUE"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(cli_env: dict[str, str], tmp_path: Path, args: list[str],
                                              message: str) -> None:
    done = run(cli_env, tmp_path, *args)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())
    assert done.stdout == ""


# --- `stagecoach up` --------------------------------------------------------------------------

@pytest.fixture
def up_process(lm_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`stagecoach up` with a private Redis it must start itself (nothing listens on the port)."""
    broker = f"redis://127.0.0.1:{free_port()}/0"
    env = worker_env(broker, lm_url, catalog=[ROOT / "pipelines" / "qa.yaml"],
                     STAGECOACH_FLOWER_PORT=str(free_port()), STAGECOACH_MONITOR_PORT=str(free_port()))
    proc = subprocess.Popen([STAGECOACH, "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, broker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    seen: list[str] = []
    deadline = time.time() + timeout
    assert proc.stdout is not None
    while deadline > time.time():
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} from stagecoach up:\n{''.join(seen)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_starts_serves_and_stops_everything(up_process: tuple[subprocess.Popen[str], str], lm_url: str,
                                               tmp_path: Path) -> None:
    proc, broker = up_process
    table = read_until(proc, "stack ready", 150)
    assert "stage.key_terms" in table and "pipeline.routing" in table
    state = json.loads((tmp_path / ".stagecoach" / "stack.json").read_text())
    pids = state["pids"]
    assert set(pids) == {"redis", "stage-key_terms", "stage-answer", "routing", "webhook", "watchdog", "flower",
                         "monitor", "api"}
    settings = Settings(broker_url=broker, catalog=[ROOT / "pipelines" / "qa.yaml"],
                        lm=LMSettings(model="openai/test-lm", api_base=lm_url))
    result = Client(create_runtime(settings)).submit("qa", {"question": "Up and running?"}).get(timeout=60)
    assert result.answer["answer"] == "answer of <Up and running?>"
    # Flower's API answers without auth under `up` (local only); the monitor counted the job's stages
    with urllib.request.urlopen(f"{state['flower_url']}/api/workers", timeout=10) as response:
        assert response.status == 200
    wait_until(lambda: _stage_runs(state["monitor_url"]) == {"key_terms": 1, "answer": 1}, 30, "monitor counts")
    # the HTTP API, auth on, with the admin token `up` made (kept in the state dir, mode 600)
    token_file = tmp_path / ".stagecoach" / "api-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    request = urllib.request.Request(f"{state['api_url']}/v1/jobs/{result.job_id}",
                                     headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["state"] == "succeeded"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{state['api_url']}/v1/jobs/{result.job_id}", timeout=10)
    assert anonymous.value.code == 401
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    wait_until(lambda: not any(alive(pid) for pid in pids.values()), 10, "stack processes to exit")
    assert not reachable(broker)
    assert (tmp_path / ".stagecoach" / "logs" / "stage-answer.log").exists()


def _stage_runs(monitor_url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{monitor_url}/api/stats", timeout=10) as response:
        return {s["name"]: s["runs"] for s in json.loads(response.read())["stages"]}


def test_compose_prints_the_committed_file(cli_env: dict[str, str], tmp_path: Path) -> None:
    """What the file holds is checked by tests/test_compose.py (both Compose implementations)."""
    env = {**cli_env, "STAGECOACH_CATALOG": json.dumps([str(ROOT / "pipelines")])}
    done = run(env, tmp_path, "compose")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(done.stdout)["services"]
    assert "container_name" not in services["worker-answer"] and "ports" not in services["worker-answer"]


# --- another service, any language: a raw message in Redis, no Celery and no project import -----

def raw_message(job_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Celery's message protocol v2 as the Redis transport stores it (README: "Enqueue by name")."""
    body = [[request], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "pipeline.run", "id": job_id, "root_id": job_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": job_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "pipeline.routing"},
                       "delivery_tag": str(uuid.uuid4())},
    }


def test_raw_redis_message_starts_a_job_by_name(redis_url: str, fleet: Fleet) -> None:
    db = redis.Redis.from_url(redis_url)
    job_id = str(uuid.uuid4())
    db.lpush("pipeline.routing", json.dumps(raw_message(job_id, {"pipeline": "qa", "inputs": {"question": "Raw?"}})))
    key = f"celery-task-meta-{job_id}"
    wait_until(lambda: b'"SUCCESS"' in (db.get(key) or b""), 60, "the raw job's result")
    stored = json.loads(db.get(key) or b"{}")
    assert stored["result"]["state"] == "succeeded"
    assert stored["result"]["answer"]["answer"] == "answer of <Raw?>"


def test_readme_settings_table_is_current() -> None:
    """The README's table is generated (`stagecoach settings --markdown`); a new setting must appear."""
    from cli.settings_doc import markdown

    assert markdown() in (ROOT / "README.md").read_text(), "regenerate: stagecoach settings --markdown"
