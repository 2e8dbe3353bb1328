"""A Node.js service starts a job by name with the npm package celery-node and reads its JobResult
(examples/node/client.js), run with the machine's `node` against the session's real fleet; and job
progress read from Redis without project code (the `stagecoach:job:<id>` hash)."""

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest
import redis
from celery import Celery

from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, RUN_TASK
from tests.services import ROOT, Fleet

NODE_DIR = ROOT / "examples" / "node"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:  # never a skip: `make system-deps` installs node and npm from Debian
        pytest.fail(f"`{name}` not found: run `make system-deps` (Debian packages nodejs, npm)")
    return found


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """`npm ci` from the committed lockfile (the npm registry is the only network used), then the command."""
    done = subprocess.run([tool("npm"), "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [tool("node"), str(NODE_DIR / "client.js")]


def run_node(command: list[str], redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "STAGECOACH_BROKER_URL": redis_url, **env}
    return subprocess.run([*command, *args], env=environment, capture_output=True, text=True, timeout=180)


def test_node_client_runs_a_job_end_to_end(node_client: list[str], redis_url: str, fleet: Fleet) -> None:
    done = run_node(node_client, redis_url, "qa", json.dumps({"question": "Why is the sky blue?"}))
    assert done.returncode == 0, done.stderr
    result = JobResult.model_validate(json.loads(done.stdout))
    assert result.state == "succeeded"
    assert result.answer["answer"] == "answer of <Why is the sky blue?>"
    assert [t.stage for t in result.timings] == ["key_terms", "answer"]
    assert f"job {result.job_id}: succeeded after 2 stage(s)" in done.stderr  # read from the status hash


def test_node_client_gets_a_failed_result_naming_the_bad_field(node_client: list[str], redis_url: str,
                                                               fleet: Fleet) -> None:
    done = run_node(node_client, redis_url, "qa", json.dumps({"question": 42}))
    assert done.returncode == 1, done.stderr
    result = JobResult.model_validate(json.loads(done.stdout))
    assert result.state == "failed" and result.error is not None
    assert (result.error.kind, result.error.fields) == ("contract", ["question"])


def test_node_client_runs_a_fan_out_pipeline(node_client: list[str], redis_url: str, fleet: Fleet) -> None:
    done = run_node(node_client, redis_url, "parallel_analysis", json.dumps({"document": "Barges carry coal."}))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["answer"]
    assert set(answer) == {"summary", "tone", "entities"}


def test_job_progress_is_readable_with_plain_redis(app: Celery, redis_url: str, fleet: Fleet) -> None:
    """What the README documents for any language: HGETALL stagecoach:job:<id>, each value JSON, while the
    job runs (state running, stage = the stage it is in) and after (state succeeded, stages_done)."""
    job_id = uuid.uuid4().hex
    plain = redis.Redis.from_url(redis_url, decode_responses=True)
    # each LM call takes 300 ms ([[lm:sleep]] marker of the test LM), so the polling sees stages in flight
    request = {"pipeline": "patterns_loop", "inputs": {"question": f"Why do tides turn {job_id}? [[lm:sleep=300]]"}}
    sent = app.send_task(RUN_TASK, args=[request], task_id=job_id, queue=ROUTING_QUEUE)
    seen: list[tuple[str, str | None]] = []
    deadline = time.monotonic() + 120
    while not sent.ready() and time.monotonic() < deadline:
        status = {key: json.loads(value) for key, value in plain.hgetall(f"stagecoach:job:{job_id}").items()}
        if status and (status["state"], status.get("stage")) not in seen:
            seen.append((status["state"], status.get("stage")))
        time.sleep(0.01)
    assert sent.get(timeout=60)["state"] == "succeeded"
    final = {key: json.loads(value) for key, value in plain.hgetall(f"stagecoach:job:{job_id}").items()}
    assert final["state"] == "succeeded" and final["stages_done"] >= 2 and final["stage"] is None
    running = {stage for state, stage in seen if state == "running" and stage}
    assert running and running <= {"short_answer", "refine", "score_draft"}, seen
    cli = subprocess.run(["redis-cli", "-u", redis_url, "--raw", "HGET", f"stagecoach:job:{job_id}", "state"],
                         capture_output=True, text=True, timeout=30)
    assert cli.stdout.strip() == '"succeeded"'
