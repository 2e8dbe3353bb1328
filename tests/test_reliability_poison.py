"""Workers survive every message (issue 9): >= 50 malformed inputs through raw LPUSH, `send_task` and
the CLI. Each gets a clear error or a dead-letter entry (and its waiter a failed result); the
workers keep serving and good jobs alongside all succeed. Real Redis (private), real workers."""

import base64
import json
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from contracts.names import DEAD_LETTER_KEY, ROUTING_QUEUE, RUN_TASK, stage_queue
from contracts.priority import queue_lists
from tests.reliability_kit import EMBED, headers, letters, message, qa_fleet, run_message, wait_for
from tests.services import Fleet, client_for, worker_env

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
MAX_MESSAGE = 200_000
MAX_REQUEST = 20_000
MAX_ENVELOPE = 100_000
KT, ANS = stage_queue("key_terms"), stage_queue("answer")
GOOD = {"pipeline": "qa", "inputs": {"question": "Poison-proof?"}}


@pytest.fixture(scope="module")
def poison_env(private_redis: str, lm_url: str) -> Iterator[tuple[str, Fleet]]:
    limits = {"STAGECOACH_MAX_MESSAGE_BYTES": str(MAX_MESSAGE), "STAGECOACH_MAX_REQUEST_BYTES": str(MAX_REQUEST),
              "STAGECOACH_MAX_ENVELOPE_BYTES": str(MAX_ENVELOPE)}
    with qa_fleet(private_redis, lm_url, pool="prefork", **limits) as fleet:
        yield private_redis, fleet


@pytest.fixture(scope="module")
def app(poison_env: tuple[str, Fleet], lm_url: str) -> Celery:
    return client_for(poison_env[0], lm_url).app


@pytest.fixture(scope="module")
def db(poison_env: tuple[str, Fleet]) -> redis.Redis:
    return redis.Redis.from_url(poison_env[0])


def pickle_bomb(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))
    return pickle.dumps(((Bomb(),), {}, EMBED))


def body_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run_head(tok: str, **extra: Any) -> dict[str, Any]:
    return headers(RUN_TASK, tok, **extra)


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()


# (case id, queue, raw bytes from a unique token, reason text, who waits: None, "job" or "task")
Case = tuple[str, str, Callable[[str], bytes], str, str | None]
REQ = [[GOOD], {}, EMBED]


def stage_body(job_id: str, stage: str, question: str = "Poison-proof?") -> list[Any]:
    """A well-formed stage message body: an envelope and a node that names `stage`."""
    envelope = {"job_id": job_id, "pipeline": "qa", "pipeline_version": "1", "state": {"question": question}}
    return [[envelope], {"node": {"kind": "stage", "stage": stage}, "path": stage}, EMBED]
RAW_CASES: list[Case] = [
    ("hello", ROUTING_QUEUE, lambda t: b"hello", "not JSON", None),
    ("empty", ROUTING_QUEUE, lambda t: b"", "not JSON", None),
    ("list", ROUTING_QUEUE, lambda t: b"[1,2,3]", "JSON list, not a message object", None),
    ("null", ROUTING_QUEUE, lambda t: b"null", "JSON NoneType", None),
    ("number", ROUTING_QUEUE, lambda t: b"42", "JSON int", None),
    ("string", ROUTING_QUEUE, lambda t: b'"hi"', "JSON str", None),
    ("bool", ROUTING_QUEUE, lambda t: b"true", "JSON bool", None),
    ("not-utf8", ROUTING_QUEUE, lambda t: b"\xff\xfe\x00junk", "not UTF-8", None),
    ("truncated", ROUTING_QUEUE, lambda t: b'{"body": "', "not JSON", None),
    ("nested-100k", ROUTING_QUEUE, lambda t: b"[" * 100_000 + b"]" * 100_000, "not JSON", None),
    ("no-properties", ROUTING_QUEUE, lambda t: dumps({"body": "", "headers": run_head(t)}), "no 'properties'", "job"),
    ("properties-list", ROUTING_QUEUE, lambda t: dumps({**run_message(t, GOOD), "properties": [1]}),
     "no 'properties'", "job"),
    ("no-delivery-tag", ROUTING_QUEUE,
     lambda t: dumps({**run_message(t, GOOD), "properties": {"body_encoding": "base64"}}), "delivery_tag", "job"),
    ("delivery-tag-int", ROUTING_QUEUE,
     lambda t: dumps({**run_message(t, GOOD), "properties": {"delivery_tag": 7}}), "delivery_tag", "job"),
    ("headers-list", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, [t], REQ)), "'headers' is not", None),
    ("body-number", ROUTING_QUEUE, lambda t: dumps({**run_message(t, GOOD), "body": 5}), "not an encoded string",
     "job"),
    ("body-not-base64", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), None, raw_body="!!!x")),
     "does not decode as 'base64'", "job"),
    ("unknown-encoding", ROUTING_QUEUE,
     lambda t: dumps(message(ROUTING_QUEUE, run_head(t), REQ, encoding="rot13")), "does not decode", "job"),
    ("delivery-info-str", ROUTING_QUEUE, lambda t: dumps({**run_message(t, GOOD), "properties": {
        "delivery_tag": t, "body_encoding": "base64", "delivery_info": "x"}}), "delivery_info", "job"),
    ("body-text", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), b"hello")),
     "does not decode as JSON", "job"),
    ("body-object", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), GOOD)),
     "JSON dict, not [args, kwargs, embed]", "job"),
    ("body-empty-list", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [])), "a list of 0", "job"),
    ("body-one-item", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [[GOOD]])), "a list of 1",
     "job"),
    ("args-not-list", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [1, {}, {}])),
     "args (list)", "job"),
    ("kwargs-not-object", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [[GOOD], [], {}])),
     "kwargs (object)", "job"),
    ("embed-string", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [[GOOD], {}, "x"])),
     "embed (object)", "job"),
    ("no-id", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, {"task": RUN_TASK, "root_id": t}, REQ)),
     "header 'id' is missing", "job"),
    ("no-task", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, {"id": t}, REQ)), "header 'task' is missing",
     None),
    ("task-int", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, {**run_head(t), "task": 5}, REQ)),
     "header 'task'", None),
    ("id-int", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, {**run_head(t), "id": 5}, REQ)),
     "header 'id'", "job"),
    ("eta-garbage", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t, eta="tuesday"), REQ)),
     "header 'eta' is not an ISO 8601", "job"),
    ("expires-garbage", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t, expires=[1]), REQ)),
     "header 'expires'", "job"),
    ("timelimit-garbage", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t, timelimit="x"), REQ)),
     "header 'timelimit'", "job"),
    ("retries-garbage", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t, retries="x"), REQ)),
     "header 'retries'", "job"),
    ("embed-chain-str", ROUTING_QUEUE,
     lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [[GOOD], {}, {**EMBED, "chain": "x"}])), "embed 'chain'",
     "job"),
    ("embed-callbacks-ints", ROUTING_QUEUE,
     lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [[GOOD], {}, {**EMBED, "callbacks": [1]}])),
     "embed 'callbacks'", "job"),
    ("embed-chord-str", ROUTING_QUEUE,
     lambda t: dumps(message(ROUTING_QUEUE, run_head(t), [[GOOD], {}, {**EMBED, "chord": "x"}])), "embed 'chord'",
     "job"),
    ("yaml", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), b"!!python/object/apply:os.system "
                                                    b"['true']", content_type="application/x-yaml")),
     "'application/x-yaml' refused", "job"),
    ("msgpack", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, run_head(t), b"\x93\x90\x80\x80",
                                                       content_type="application/x-msgpack")),
     "'application/x-msgpack' refused", "job"),
    ("no-content-type", ROUTING_QUEUE, lambda t: dumps({**run_message(t, GOOD), "content-type": None}),
     "content type None refused", "job"),
    ("unknown-task", ROUTING_QUEUE, lambda t: dumps(message(ROUTING_QUEUE, headers("no.such.task", t), REQ)),
     "no task named 'no.such.task'", "task"),
    ("too-big", ROUTING_QUEUE, lambda t: dumps(run_message(t, {"pipeline": "qa", "inputs": {"q": "x" * 300_000}})),
     "exceeds STAGECOACH_MAX_MESSAGE_BYTES", "job"),
    ("deep-args", ROUTING_QUEUE,
     lambda t: dumps(message(ROUTING_QUEUE, run_head(t), None,
                             raw_body=body_b64(b"[[" + b"[" * 50_000 + b"]" * 50_000 + b"], {}, {}]"))),
     "nested too deeply", "job"),
    ("stage-no-args", KT, lambda t: dumps(message(KT, headers("stage.key_terms", t), [[], {}, EMBED])),
     "arguments do not fit stage.key_terms", "task"),
    ("stage-bad-envelope", KT, lambda t: dumps(message(KT, headers("stage.key_terms", t), [
        [{"job_id": 5}], {"node": {"stage": "key_terms"}, "path": "key_terms"}, EMBED])),
     "invalid envelope or node", "task"),
    ("stage-other-node", KT, lambda t: dumps(message(KT, headers("stage.key_terms", t), stage_body(t, "nope"))),
     "its node names stage 'nope', not this task's stage 'key_terms'", "task"),
    ("stage-other-queue", KT, lambda t: dumps(message(KT, headers("stage.answer", t), stage_body(t, "answer"))),
     "it came from queue 'stage.key_terms', not this stage's 'stage.answer'", "task"),
    ("stage-huge", KT, lambda t: dumps(message(KT, headers("stage.key_terms", t),
                                               stage_body(t, "key_terms", "x" * 120_000))),
     "exceeds STAGECOACH_MAX_ENVELOPE_BYTES", "task"),
    ("stage-surrogate", KT, lambda t: dumps(message(KT, headers("stage.key_terms", t),
                                                    stage_body(t, "key_terms", "why \ud800?"))),
     "the message holds text UTF-8 cannot encode", "task"),
    ("stage-hello", ANS, lambda t: b"hello", "not JSON", None),
    ("stage-list", ANS, lambda t: b"[1,2,3]", "JSON list", None),
    ("stage-body-object", ANS, lambda t: dumps(message(ANS, headers("stage.answer", t), {"x": 1})),
     "JSON dict, not [args", "task"),
]


def push_and_find(db: redis.Redis, queue: str, raw: bytes, tok: str, reason: str) -> Any:
    before = db.llen(DEAD_LETTER_KEY)
    db.lpush(queue, raw)

    def found() -> Any:
        fresh = letters(db)[: max(db.llen(DEAD_LETTER_KEY) - before, 0)]
        return next((e for e in fresh if reason in e.reason
                     and (e.task_id == tok or tok.encode() in e.raw or e.raw == raw[:65536])), None)

    return wait_for(found, 60, f"a dead letter for {raw[:80]!r} with reason {reason!r}; have "
                               f"{[e.reason for e in letters(db)[:5]]}")


@pytest.mark.parametrize(("case", "queue", "make", "reason", "waiter"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_lpush_is_dead_lettered_and_its_waiter_fails(
    app: Celery, db: redis.Redis, poison_env: tuple[str, Fleet], case: str, queue: str,
    make: Callable[[str], bytes], reason: str, waiter: str | None,
) -> None:
    tok = uuid.uuid4().hex
    letter = push_and_find(db, queue, make(tok), tok, reason)
    assert letter.queue == queue
    if waiter == "job":
        result = AsyncResult(tok, app=app).get(timeout=30)
        assert result["state"] == "failed" and result["error"]["kind"] == "message"
        assert reason in result["error"]["message"] and "stagecoach dead-letters" in result["error"]["message"]
    elif waiter == "task":
        with pytest.raises(Exception) as caught:
            AsyncResult(tok, app=app).get(timeout=30)
        assert reason.split("'")[0] in str(caught.value) or "NotRegistered" in type(caught.value).__name__
    assert all(worker.proc.poll() is None for worker in poison_env[1].workers)


def test_pickle_is_refused_and_never_unpickled(app: Celery, db: redis.Redis, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    tok = uuid.uuid4().hex
    raw = dumps(message(ROUTING_QUEUE, run_head(tok), pickle_bomb(marker),
                        content_type="application/x-python-serialize"))
    push_and_find(db, ROUTING_QUEUE, raw, tok, "'application/x-python-serialize' refused")
    assert AsyncResult(tok, app=app).get(timeout=30)["error"]["kind"] == "message"
    assert not marker.exists()


# --- send_task: what another Celery service might send ------------------------------------------

SEND_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no-args", {}, "got 0 positional argument(s)"),
    ("two-args", {"args": [GOOD, GOOD]}, "got 2 positional argument(s)"),
    ("args-and-kwargs", {"args": [GOOD], "kwargs": {"x": 1}}, "got 1 positional argument(s) and kwargs ['x']"),
    ("kwargs-unknown", {"kwargs": {"colour": "red"}}, "field 'colour': unexpected field"),
    ("none", {"args": [None]}, "pipeline.run request"),
    ("list", {"args": [[1, 2]]}, "pipeline.run request"),
    ("text", {"args": ["run qa please"]}, "pipeline.run request"),
    ("inputs-not-object", {"args": [{"pipeline": "qa", "inputs": [1]}]}, "field 'inputs'"),
    ("pipeline-int", {"args": [{"pipeline": 7, "inputs": {}}]}, "field 'pipeline'"),
    ("too-big", {"args": [{"pipeline": "qa", "inputs": {"question": "x" * (MAX_REQUEST + 10)}}]},
     "exceeds STAGECOACH_MAX_REQUEST_BYTES"),
    ("pickle", {"args": [GOOD], "serializer": "pickle"}, "'application/x-python-serialize' refused"),
    ("yaml", {"args": [GOOD], "serializer": "yaml"}, "'application/x-yaml' refused"),
]


@pytest.mark.parametrize(("case", "options", "message_text"), SEND_CASES, ids=[c[0] for c in SEND_CASES])
def test_send_task_wrong_shapes_get_a_failed_job_result(app: Celery, case: str, options: dict[str, Any],
                                                        message_text: str) -> None:
    result = app.send_task(RUN_TASK, queue=ROUTING_QUEUE, **options).get(timeout=60)
    assert result["state"] == "failed"
    assert message_text in result["error"]["message"]


@pytest.mark.parametrize("call", [{"kwargs": GOOD}, {"kwargs": {"request": GOOD}}], ids=["kwargs", "request-kwarg"])
def test_send_task_kwargs_requests_are_accepted(app: Celery, call: dict[str, Any]) -> None:
    result = app.send_task(RUN_TASK, queue=ROUTING_QUEUE, **call).get(timeout=60)
    assert result["state"] == "succeeded" and result["answer"]["answer"] == "answer of <Poison-proof?>"


@pytest.mark.parametrize(("name", "options", "text"), [
    ("no.such.task", {"args": [1]}, "no.such.task"),
    ("stage.answer", {}, "arguments do not fit stage.answer"),
    ("stage.answer", {"args": [{"job_id": "x"}], "kwargs": {"node": {"stage": "answer"}, "path": "answer"}},
     "invalid envelope or node"),
], ids=["unknown-task", "stage-no-args", "stage-bad-envelope"])
def test_send_task_to_other_tasks_fails_the_caller(app: Celery, name: str, options: dict[str, Any],
                                                   text: str) -> None:
    queue = ANS if name.startswith("stage.") else ROUTING_QUEUE
    with pytest.raises(Exception) as caught:
        app.send_task(name, queue=queue, **options).get(timeout=60)
    assert text in str(caught.value)


# --- the CLI --------------------------------------------------------------------------------------

def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STAGECOACH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli_env(poison_env: tuple[str, Fleet], lm_url: str) -> dict[str, str]:
    return worker_env(poison_env[0], lm_url, STAGECOACH_MAX_REQUEST_BYTES=str(MAX_REQUEST))


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


CLI_FILES: list[tuple[str, bytes, str]] = [
    ("nested-100k", b'{"question": "ok"}\n{"question": ' + deep(100_000).encode() + b"}\n",
     "line 2: JSON nested too deeply"),
    ("nested-100", b'{"question": ' + deep(100).encode() + b"}\n", "line 1: JSON nested too deeply"),
    ("bad-utf8", b'{"question": "ok"}\n{"question": "\xff\xfe"}\n', "line 2: not UTF-8 text"),
    ("array-line", b"[1, 2]\n", "line 1: expected a JSON object of inputs, got list"),
    ("too-big", b'{"question": "' + b"y" * (MAX_REQUEST + 10) + b'"}\n', "exceeds STAGECOACH_MAX_REQUEST_BYTES"),
    ("blank-only", b"\n\n", "no job lines"),
]


@pytest.mark.parametrize(("case", "content", "text"), CLI_FILES, ids=[c[0] for c in CLI_FILES])
def test_cli_input_file_names_the_bad_line(cli_env: dict[str, str], tmp_path: Path, case: str, content: bytes,
                                           text: str) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(content)
    done = cli(cli_env, tmp_path, "submit", "qa", "--input-file", str(jobs), "--wait")
    assert done.returncode == 2, done.stderr
    assert text in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "text"), [
    (["submit", "qa", "-i", f"question={'z' * (MAX_REQUEST + 10)}"], "exceeds STAGECOACH_MAX_REQUEST_BYTES"),
    (["submit", "qa", "-i", f"key_terms={deep(5000)}"], "nested too deeply"),
    (["submit", "qa", "--input-file", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["replay", "feedfacefeed"], "no single dead letter with id 'feedfacefeed'"),
], ids=["too-big", "deep-input", "missing-file", "replay-unknown"])
def test_cli_bad_input_exits_2_without_traceback(cli_env: dict[str, str], tmp_path: Path, args: list[str],
                                                 text: str) -> None:
    done = cli(cli_env, tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert text in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_cli_lists_and_replays_dead_letters(cli_env: dict[str, str], db: redis.Redis, app: Celery,
                                            tmp_path: Path) -> None:
    job_id = uuid.uuid4().hex
    raw = dumps({**run_message(job_id, GOOD), "content-type": "text/plain"})
    push_and_find(db, ROUTING_QUEUE, raw, job_id, "'text/plain' refused")
    listed = cli(cli_env, tmp_path, "dead-letters", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(e for e in json.loads(listed.stdout) if e["task_id"] == job_id)
    assert "'text/plain' refused" in entry["reason"] and entry["queue"] == ROUTING_QUEUE
    table = cli(cli_env, tmp_path, "dead-letters")
    assert entry["id"][:12] in table.stdout
    # fix the message (the way an operator would after finding the sender's bug), then replay it
    fixed = json.loads(base64.b64decode(entry["raw_b64"]))
    fixed["content-type"] = "application/json"
    db.lrem(DEAD_LETTER_KEY, 1, next(i for i in db.lrange(DEAD_LETTER_KEY, 0, -1) if job_id.encode() in i))
    db.lpush(DEAD_LETTER_KEY, json.dumps({**entry, "raw_b64": body_b64(dumps(fixed)), "size": len(dumps(fixed))}))
    db.delete(f"celery-task-meta-{job_id}")  # the refusal's failed result, so the replay's result is read
    replayed = cli(cli_env, tmp_path, "replay", entry["id"][:10])
    assert replayed.returncode == 0, replayed.stderr
    assert wait_for(lambda: AsyncResult(job_id, app=app).ready(), 60, "the replayed job")
    assert AsyncResult(job_id, app=app).get()["state"] == "succeeded"
    assert all(e["id"] != entry["id"] for e in json.loads(cli(cli_env, tmp_path, "dead-letters", "--json").stdout))


def test_result_of_a_poisoned_job_is_a_clear_failure(cli_env: dict[str, str], db: redis.Redis,
                                                     tmp_path: Path) -> None:
    job_id = uuid.uuid4().hex
    push_and_find(db, ROUTING_QUEUE, dumps(message(ROUTING_QUEUE, run_head(job_id), GOOD)), job_id, "JSON dict")
    done = cli(cli_env, tmp_path, "result", job_id, "--wait")
    assert done.returncode == 1
    assert "message dead-lettered: body is a JSON dict" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


# --- all of it at once, with good jobs in between ---------------------------------------------------

def test_good_jobs_alongside_every_poison_all_succeed(app: Celery, db: redis.Redis, poison_env: tuple[str, Fleet],
                                                      lm_url: str) -> None:
    client = client_for(poison_env[0], lm_url)
    handles = []
    for index, (_, queue, make, _, _) in enumerate(RAW_CASES):
        db.lpush(queue, make(uuid.uuid4().hex))
        handles.append(client.submit("qa", {"question": f"Good {index}?"}))
    results = [h.get(timeout=120) for h in handles]
    assert [r.answer["answer"] for r in results] == [f"answer of <Good {i}?>" for i in range(len(RAW_CASES))]
    assert all(worker.proc.poll() is None for worker in poison_env[1].workers)
    # nothing left behind to crash-loop a restarted worker
    wait_for(lambda: not db.hlen("unacked") and not any(db.llen(key) for key in queue_lists(ROUTING_QUEUE)), 60,
             "empty queues and unacked")


def test_a_restarted_worker_starts_clean_and_serves(poison_env: tuple[str, Fleet], lm_url: str) -> None:
    fleet = poison_env[1]
    routing = next(w for w in fleet.workers if w.name == "routing")
    routing.stop()
    fleet.workers.remove(routing)
    fleet.start("routing-again", [ROUTING_QUEUE], concurrency=4)
    fleet.wait_ready()
    result = client_for(poison_env[0], lm_url).submit("qa", {"question": "After restart?"}).get(timeout=60)
    assert result.ok
    assert "Unrecoverable error" not in "".join(w.log_text() for w in fleet.workers)
