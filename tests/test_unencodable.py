"""Text UTF-8 cannot encode (a lone surrogate such as "\\ud800", which `json.loads('"\\\\ud800"')` gives)
is refused at every door naming the field: the contracts, the Python client, `pipeline.run` from any
Celery client, the CLI's `-i` and `--input-file`; a stage whose LM returns such text fails with a
contract error. Real workers; the job always ends, the workers keep serving (issue 18)."""

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from contracts.errors import ContractError, SpecError, UnknownPipelineError
from contracts.fields import FieldSpec, unencodable, validate
from contracts.jobs import JobRequest
from contracts.names import ROUTING_QUEUE, RUN_TASK, checkpoint_key
from routing.client import Client
from tests.services import Fleet, worker_env
from workers.outcome import preview

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
SURROGATE_PROBLEM = "contains a lone surrogate (\\ud800 at position 4): not encodable as UTF-8"
FIELDS = {"question": FieldSpec(type="str"), "tags": FieldSpec(type="list[str]", required=False, default=[]),
          "meta": FieldSpec(type="dict", required=False, default={})}


# --- the contracts: one check every door shares -----------------------------------------------------------

@pytest.mark.parametrize(("data", "fields", "problem"), [
    ({"question": "why \ud800?"}, ["question"], SURROGATE_PROBLEM),
    ({"question": "ok", "tags": ["fine", "bad \udcff"]}, ["tags.1"], "(\\udcff at position 4)"),
    ({"question": "ok", "meta": {"deep": [{"x": "\ud83d"}]}}, ["meta.deep.0.x"], "(\\ud83d at position 0)"),
    ({"question": "ok", "meta": {"k\ud800": 1}}, ["meta.k\\ud800"], "key contains a lone surrogate"),
    ({"que\ud800": "x"}, ["que\\ud800"], "key contains a lone surrogate (\\ud800 at position 3)"),
    ({"question": 7, "tags": ["\ud800"]}, ["tags.0", "question"], "input should be a valid string"),
], ids=["value", "list-item", "nested", "dict-key", "field-name", "with-another-problem"])
def test_contract_names_each_unencodable_field(data: dict[str, Any], fields: list[str], problem: str) -> None:
    with pytest.raises(ContractError) as caught:
        validate("pipeline 'qa' inputs", FIELDS, data)
    assert [p.field for p in caught.value.problems] == fields
    assert problem in str(caught.value)
    str(caught.value).encode("utf-8")  # the message itself is printable


def test_contract_keeps_real_non_ascii_text() -> None:
    text = "Schrödinger's ☃ and 😀 (a real astral character, not a surrogate pair)"
    assert validate("x", FIELDS, {"question": text}) == {"question": text, "tags": [], "meta": {}}
    assert unencodable({"q": [text, {"k": text}]}) == []


def test_request_fields_are_checked_by_the_request_model() -> None:
    with pytest.raises(ValueError, match="contains a lone surrogate"):
        JobRequest.model_validate({"pipeline": "qa\ud800", "inputs": {}})


def test_preview_of_unencodable_text_does_not_raise() -> None:
    text, size = preview({"question": "why \ud800?"})
    assert "\\ud800" in text and size == len(text.encode())


# --- the Python client ----------------------------------------------------------------------------------------

def test_client_refuses_before_enqueueing(client: Client) -> None:
    with pytest.raises(ContractError) as caught:
        client.submit("qa", {"question": "why \ud800?"})
    assert [p.field for p in caught.value.problems] == ["question"]
    assert f"pipeline 'qa' inputs: field 'question': {SURROGATE_PROBLEM}" in str(caught.value)
    with pytest.raises(UnknownPipelineError) as unknown:
        client.submit("qa\ud800", {"question": "ok"})
    assert "unknown pipeline 'qa\\ud800'" in str(unknown.value)
    with pytest.raises(ContractError, match="'answer\\\\udcff' is not an output"):
        client.submit("qa", {"question": "ok"}, outputs=["answer\udcff"])
    with pytest.raises(SpecError):
        client.submit("qa@1\ud800", {"question": "ok"})


# --- pipeline.run: a raw JSON request from any Celery client ------------------------------------------------------

def test_pipeline_run_request_from_the_issue_fails_naming_the_field(app: Celery, client: Client, fleet: Fleet) -> None:
    """The issue's exact request: today it crashed a stage and stayed running forever."""
    sent = app.send_task("pipeline.run", args=[{"pipeline": "qa", "inputs": {"question": "why \ud800?"}}],
                         queue="pipeline.routing")
    result = sent.get(timeout=60)
    assert result["state"] == "failed"
    assert result["error"]["kind"] == "contract"
    assert result["error"]["fields"] == ["question"]
    assert f"field 'question': {SURROGATE_PROBLEM}" in result["error"]["message"]
    assert client.status(sent.id).state == "failed"
    assert not client.runtime.jobs.client.exists(checkpoint_key(sent.id))  # never started: nothing to re-dispatch
    assert client.submit("qa", {"question": "Still serving?"}).get(timeout=60).ok
    assert all(worker.proc.poll() is None for worker in fleet.workers)


@pytest.mark.parametrize(("request_body", "fields"), [
    ({"pipeline": "qa", "inputs": {"question": "ok", "tags\ud800": ["x"]}}, ["tags\\ud800"]),
    ({"pipeline": "qa\ud800", "inputs": {"question": "ok"}}, ["pipeline"]),
    ({"pipeline": "qa", "inputs": {"question": "ok"}, "outputs": ["answer", "\ud800"]}, ["outputs.1"]),
    ({"pipeline": "qa", "version": "\udcff", "inputs": {"question": "ok"}}, ["version"]),
    ({"pipeline": "qa", "inputs": {"question": "ok"}, "\ud800": 1}, ["\\ud800"]),
], ids=["input-name", "pipeline", "outputs", "version", "request-key"])
def test_pipeline_run_names_every_unencodable_request_field(app: Celery, fleet: Fleet, request_body: dict[str, Any],
                                                            fields: list[str]) -> None:
    result = app.send_task(RUN_TASK, args=[request_body], queue=ROUTING_QUEUE).get(timeout=60)
    assert result["state"] == "failed"
    assert result["error"]["kind"] == "contract"
    assert result["error"]["fields"] == fields
    assert "lone surrogate" in result["error"]["message"]
    json.dumps(result, ensure_ascii=False).encode("utf-8")  # the stored result is encodable text throughout


def test_raw_redis_message_with_a_surrogate_escape_fails_naming_the_field(redis_url: str, fleet: Fleet) -> None:
    """A service in another language writes the JSON escape `\\ud800` into the message body."""
    from tests.test_cli import raw_message

    db = redis.Redis.from_url(redis_url)
    job_id = str(uuid.uuid4())
    message = raw_message(job_id, {"pipeline": "qa", "inputs": {"question": "why \ud800?"}})
    db.lpush(ROUTING_QUEUE, json.dumps(message))
    key = f"celery-task-meta-{job_id}"
    deadline = time.monotonic() + 60
    while b'"SUCCESS"' not in (db.get(key) or b"") and time.monotonic() < deadline:
        time.sleep(0.1)
    stored = json.loads(db.get(key) or b"{}")
    assert stored["result"]["state"] == "failed", stored
    assert stored["result"]["error"]["fields"] == ["question"]


# --- a stage whose LM returns text UTF-8 cannot encode ------------------------------------------------------

def test_lm_output_with_a_surrogate_is_a_stage_contract_error(client: Client, fleet: Fleet) -> None:
    """The test LM sends `"\\ud800"` (a JSON escape) as the answer: the stage's output contract refuses it,
    naming the field; the job ends failed at once (a permanent error: no retry), the worker keeps serving."""
    # past the 60 characters the test LM quotes in key_terms, so only the question carries the marker
    question = ('Which output comes back when the model stops half-way through an emoji? '
                '[[lm:set:answer="half an emoji \\ud83d"]]')
    result = client.submit("qa", {"question": question}).get(timeout=60)
    assert result.state == "failed", result.answer
    assert result.error is not None
    assert not result.error.retryable and result.error.attempts == 1
    assert result.error.kind == "contract"
    assert result.error.stage == "answer"
    assert result.error.fields == ["answer"]
    assert "stage 'answer' outputs: field 'answer': contains a lone surrogate (\\ud83d at position 14)" in \
        result.error.message
    assert client.submit("qa", {"question": "Served after?"}).get(timeout=60).ok


# --- the CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_env(redis_url: str, lm_url: str, fleet: Fleet) -> dict[str, str]:
    return worker_env(redis_url, lm_url)


def cli(env: dict[str, str], cwd: Path, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STAGECOACH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_cli_input_with_bytes_that_are_not_utf8_names_the_field(cli_env: dict[str, str], tmp_path: Path) -> None:
    """A shell passes bytes: Python decodes argv with surrogateescape, so `\\xff` arrives as `\\udcff`."""
    done = cli(cli_env, tmp_path, b"submit", b"qa", b"-i", b"question=why \xff?", b"--wait")
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "pipeline 'qa' inputs: field 'question': contains a lone surrogate (\\udcff at position 4)" in message
    assert "Traceback" not in done.stderr and done.stdout == ""


ISSUE_LINES = '{"question": "first good line?"}\n{"question": "bad \\ud800 line"}\n{"question": "third good line?"}\n'


def test_input_file_from_the_issue_reports_every_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    """The issue's file: the JSON escape `\\ud800` on line 2. Lines 1 and 3 run, each line has its outcome."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(ISSUE_LINES)
    assert "\\ud800" in jobs.read_text()  # written as the escape, as a user's file has it
    done = cli(cli_env, tmp_path, "submit", "qa", "--input-file", str(jobs), "--wait")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["line 1", "line 2", "line 3"], done.stdout
    assert lines[0].endswith(" succeeded") and lines[2].endswith(" succeeded")
    assert lines[1].startswith("line 2: - error: pipeline 'qa' inputs: field 'question': contains a lone surrogate")
    expected = f"{jobs}: line 2: pipeline 'qa' inputs: field 'question': {SURROGATE_PROBLEM}"
    assert expected in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_input_file_json_rows_without_wait(cli_env: dict[str, str], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(ISSUE_LINES)
    done = cli(cli_env, tmp_path, "submit", "qa", "--input-file", str(jobs), "--json")
    assert done.returncode == 2, done.stderr
    rows = json.loads(done.stdout)
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert rows[0]["job_id"] and rows[2]["job_id"] and rows[1]["job_id"] is None
    assert "field 'question': contains a lone surrogate" in rows[1]["error"]
    waited = [cli(cli_env, tmp_path, "result", rows[n]["job_id"], "--wait", "--json") for n in (0, 2)]
    assert [json.loads(w.stdout)["answer"]["answer"] for w in waited] == [
        "answer of <first good line?>", "answer of <third good line?>"]


def test_input_file_with_a_failing_job_exits_1(cli_env: dict[str, str], tmp_path: Path) -> None:
    """No bad line, but a job fails: exit 1, its error on its line."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"question": "good?"}\n{"question": "LM down [[lm:status=400]]"}\n')
    done = cli(cli_env, tmp_path, "submit", "qa", "--input-file", str(jobs), "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("line 1: ") and lines[0].endswith(" succeeded")
    assert lines[1].startswith("line 2: ") and " failed: " in lines[1]
