"""The HTTP API end to end: a real uvicorn server (`stagecoach api`), real workers (stage, routing and
webhook queues) and a private Redis. Every path with httpx and with curl, each error status and its JSON
body, tokens and scopes, idempotency, limits, webhooks (signed, retried, dead-lettered; cancelled and
rejected jobs call back too) and priorities overtaking a backlog."""

import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from contracts.names import DEAD_LETTER_KEY, RUN_TASK, WEBHOOK_QUEUE, stage_queue
from contracts.names import ROUTING_QUEUE as ROUTING
from tests import api_services as apis
from tests.services import ROOT, Fleet, default_catalog, free_port, wait_until, worker_env

ADMIN = "sc_test-admin-" + uuid.uuid4().hex
SECRET = "whsec-" + uuid.uuid4().hex
SLOW = "[[lm:sleep=2500]]"


@pytest.fixture(scope="module")
def logdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="stagecoach-api-test-"))


@pytest.fixture(scope="module")
def hooks() -> Iterator[apis.Receiver]:
    """The receiver every webhook of this module calls; answers 500 to each job's first delivery."""
    with apis.receiver(SECRET, fail_first=1) as found:
        yield found


@pytest.fixture(scope="module")
def catalog_paths(logdir: Path, hooks: apis.Receiver) -> list[Path]:
    """The project's pipelines plus this module's: a limited backlog, a default webhook, a busy stage."""
    own = logdir / "catalog"
    own.mkdir()
    (own / "api_test.yaml").write_text(f"""
stages:
  - name: api_busy
    version: "1"
    module: examples.basic:KeyTerms
    inputs: {{question: str}}
    outputs: {{key_terms: "list[str]"}}
pipelines:
  - name: api_limited
    inputs: {{question: str}}
    outputs: [answer]
    max_queued: 2
    root: [key_terms, answer]
  - name: api_hooked
    inputs: {{question: str}}
    outputs: [key_terms]
    webhook: {{url: "{hooks.url}", secret: "{SECRET}"}}
    root: [key_terms]
  - name: api_busy
    inputs: {{question: str}}
    outputs: [key_terms]
    root: [api_busy]
""")
    return [*default_catalog(), own]


@pytest.fixture(scope="module")
def env(private_redis: str, lm_url: str, catalog_paths: list[Path]) -> dict[str, str]:
    return worker_env(private_redis, lm_url, catalog_paths, STAGECOACH_WEBHOOK_BACKOFF="0.2",
                      STAGECOACH_WEBHOOK_ATTEMPTS="3", STAGECOACH_WEBHOOK_TIMEOUT="2")


@pytest.fixture(scope="module")
def fleet(env: dict[str, str], logdir: Path) -> Iterator[Fleet]:
    own = Fleet(env, logdir)
    for stage in ("key_terms", "answer"):
        own.start(f"stage-{stage}", [stage_queue(stage)])
    own.start("stage-api_busy", [stage_queue("api_busy")], concurrency=1)  # a busy stage: one call at a time
    own.start("routing", [ROUTING, "celery"], concurrency=4)
    own.start("webhook", [WEBHOOK_QUEUE], concurrency=4)
    try:
        own.wait_ready()
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def api(env: dict[str, str], fleet: Fleet, logdir: Path) -> Iterator[str]:
    with apis.api_server(env, logdir, auth="true", admin_token=ADMIN, rate_per_minute="100000") as url:
        yield url


def make_token(env: dict[str, str], name: str, *args: str) -> str:
    done = subprocess.run([apis.STAGECOACH, "tokens", "create", name, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def tokens(api: str, env: dict[str, str]) -> dict[str, str]:
    return {"user": make_token(env, "user", "--scope", "submit,read"),
            "reader": make_token(env, "reader", "--scope", "read"),
            "qa_only": make_token(env, "qa-only", "--scope", "submit,read", "--pipelines", "qa"),
            "slowpoke": make_token(env, "slowpoke", "--scope", "read", "--rate", "3")}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def curl(method: str, url: str, token: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """The same request with curl: status, headers (lower-case names) and the JSON body (or text)."""
    cmd = ["curl", "-sS", "-X", method, "-D", "-", url, "--max-time", "60"]
    for name, value in {**(auth(token) if token else {}), **(headers or {})}.items():
        cmd += ["-H", f"{name}: {value}"]
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    done = subprocess.run(cmd, input=data, capture_output=True, timeout=90, check=True)
    head, _, rest = done.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, rest = rest.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    found = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        return status, found, json.loads(rest)
    except ValueError:
        return status, found, rest.decode(errors="replace")


def both(method: str, url: str, token: str | None = None, body: Any = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> httpx.Response:
    """The request with httpx and with curl: the same status, error kind and Retry-After; the httpx answer."""
    sent = {**(auth(token) if token else {}), **(headers or {})}
    if raw is not None:
        response = httpx.request(method, url, content=raw, headers={**sent, "Content-Type": "application/json"},
                                 timeout=60)
    else:
        response = httpx.request(method, url, json=body, headers=sent, timeout=60)
    status, found, answer = curl(method, url, token, body, headers, raw)
    assert status == response.status_code, (method, url, status, response.status_code, answer, response.text)
    if status >= 400:
        assert isinstance(answer, dict) and answer["error"] == response.json()["error"], answer
        assert ("retry-after" in found) == ("retry-after" in response.headers)
    return response


def error_of(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["error"] == kind and body["message"], body
    return body  # type: ignore[no-any-return]


def question(tag: str = "") -> dict[str, Any]:
    return {"question": f"What feeds the rivers of Patagonia? ({tag or uuid.uuid4().hex[:8]})"}


def submit(api: str, token: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{api}/v1/jobs", json=body, headers={**auth(token), **headers}, timeout=30)


def result(api: str, token: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{api}/v1/jobs/{job_id}/result", params={"wait": 20}, headers=auth(token), timeout=60)
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        assert response.status_code == 202 and response.headers["retry-after"], response.text
        assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout}s"


# --- the paths --------------------------------------------------------------------------------------------


def test_submit_follow_and_read_a_job(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    sent = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": question(), "priority": 5,
                                                 "metadata": {"ticket": "T-1"}})
    assert sent.status_code == 202
    links = sent.json()
    job_id = links["job_id"]
    assert links["status_url"] == f"{api}/v1/jobs/{job_id}" == sent.headers["location"]
    assert links["result_url"] == f"{api}/v1/jobs/{job_id}/result"
    assert links["events_url"] == f"{api}/v1/jobs/{job_id}/events" and links["replayed"] is False
    done = result(api, user, job_id)
    assert done["state"] == "succeeded" and done["answer"]["answer"] and done["job_id"] == job_id
    status = both("GET", f"{api}/v1/jobs/{job_id}", user).json()
    assert status["state"] == "succeeded" and status["pipeline"] == "qa" and status["priority"] == 5
    assert status["metadata"] == {"ticket": "T-1"} and status["stages_done"] == status["stages_total"] == 2
    assert both("GET", f"{api}/v1/jobs/{job_id}/result", user).json() == done
    # the curl-sent twin of the job ran too
    listed = both("GET", f"{api}/v1/jobs?pipeline=qa&limit=50", user).json()
    assert job_id in [j["job_id"] for j in listed["jobs"]]


def test_listing_is_newest_first_filtered_and_paged(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    started = time.time()
    ids = [submit(api, user, {"pipeline": "qa", "inputs": question()}).json()["job_id"] for _ in range(5)]
    for job_id in ids:
        result(api, user, job_id)
    pages: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"pipeline": "qa", "since": started, "limit": 2, "state": "succeeded"}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(f"{api}/v1/jobs", params=params, headers=auth(user), timeout=30).json()
        pages += [j["job_id"] for j in page["jobs"]]
        assert len(page["jobs"]) <= 2
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == list(reversed(ids))  # newest first, each once
    assert httpx.get(f"{api}/v1/jobs", params={"state": "queued", "since": started, "pipeline": "qa"},
                     headers=auth(user), timeout=30).json()["jobs"] == []
    bad = both("GET", f"{api}/v1/jobs?cursor=nonsense", user)
    assert error_of(bad, 422, "contract")["problems"][0]["field"] == "cursor"
    bad_state = both("GET", f"{api}/v1/jobs?state=sleeping", user)
    assert error_of(bad_state, 422, "contract")["problems"][0]["field"] == "state"


def test_pipelines_and_health(api: str, tokens: dict[str, str], fleet: Fleet) -> None:
    user = tokens["user"]
    listed = both("GET", f"{api}/v1/pipelines", user).json()
    by_name = {p["name"]: p for p in listed}
    assert by_name["qa"]["stages"] == ["key_terms", "answer"] and by_name["qa"]["outputs"] == ["answer", "confidence"]
    assert by_name["api_limited"]["max_queued"] == 2
    assert by_name["api_hooked"]["webhook_url"].endswith("/hook") and SECRET not in json.dumps(listed)
    qa = both("GET", f"{api}/v1/pipelines/qa", user).json()
    assert qa["schemas"]["request"]["properties"]["inputs"] and qa["versions"] == ["1"]
    assert "webhook" not in qa["spec"]
    error_of(both("GET", f"{api}/v1/pipelines/nope", user), 404, "not-found")
    error_of(both("GET", f"{api}/v1/pipelines/qa@7", user), 404, "not-found")
    health = both("GET", f"{api}/healthz").json()  # no token needed
    assert health["redis"] is True
    assert health["workers"]["stage.key_terms"] == 1 and health["workers"][WEBHOOK_QUEUE] == 1
    assert "stage.answer" in health["queues"]
    docs = httpx.get(f"{api}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(f"{api}/openapi.json", timeout=10).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/resume",
            "/v1/pipelines", "/v1/pipelines/{name}", "/healthz"} <= set(spec["paths"])


def test_each_error_is_json_naming_the_problem(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    error_of(both("GET", f"{api}/v1/pipelines"), 401, "unauthorized")
    error_of(both("GET", f"{api}/v1/pipelines", "sc_not-a-token"), 401, "unauthorized")
    missing = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": {}})
    assert error_of(missing, 422, "contract")["problems"][0]["field"] == "question"
    wrong = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": {"question": ["a", "list"]}})
    assert "question" in error_of(wrong, 422, "contract")["message"]
    extra = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": question(), "colour": "red"})
    assert error_of(extra, 422, "contract")["problems"][0]["field"] == "colour"
    priority = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": question(), "priority": 12})
    assert error_of(priority, 422, "contract")["problems"][0]["field"] == "priority"
    outputs = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": question(), "outputs": ["nope"]})
    assert error_of(outputs, 422, "contract")["problems"][0]["field"] == "outputs"
    hook = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": question(),
                                                 "webhook": {"url": "http://192.0.2.7/hook", "secret": SECRET}})
    body = error_of(hook, 422, "contract")
    assert body["problems"][0]["field"] == "webhook.url" and "allow-list" in body["message"]
    broken = both("POST", f"{api}/v1/jobs", user, raw=b'{"pipeline": "qa", "inputs": ')
    error_of(broken, 422, "contract")
    error_of(both("POST", f"{api}/v1/jobs", user, {"pipeline": "nope", "inputs": {}}), 404, "not-found")
    error_of(both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "version": "9", "inputs": question()}),
             404, "not-found")
    huge = {"pipeline": "qa", "inputs": {"question": "x" * (1024 * 1024 + 10)}}
    assert "STAGECOACH_MAX_REQUEST_BYTES" in error_of(both("POST", f"{api}/v1/jobs", user, huge), 413,
                                                      "too-large")["message"]
    for path in ("", "/result"):
        error_of(both("GET", f"{api}/v1/jobs/no-such-job{path}", user), 404, "not-found")
    error_of(both("DELETE", f"{api}/v1/jobs/no-such-job", user), 404, "not-found")
    error_of(both("POST", f"{api}/v1/jobs/no-such-job/resume", user), 404, "not-found")


def test_tokens_scopes_and_pipelines(api: str, tokens: dict[str, str], env: dict[str, str]) -> None:
    denied = both("POST", f"{api}/v1/jobs", tokens["reader"], {"pipeline": "qa", "inputs": question()})
    assert "lacks scope 'submit'" in error_of(denied, 403, "forbidden")["message"]
    other = both("POST", f"{api}/v1/jobs", tokens["qa_only"], {"pipeline": "api_limited", "inputs": question()})
    assert "api_limited" in error_of(other, 403, "forbidden")["message"]
    mine = submit(api, tokens["qa_only"], {"pipeline": "qa", "inputs": question()})
    assert mine.status_code == 202
    job_of_other = submit(api, tokens["user"], {"pipeline": "api_hooked", "inputs": question()}).json()["job_id"]
    error_of(both("GET", f"{api}/v1/jobs/{job_of_other}", tokens["qa_only"]), 403, "forbidden")
    listed = httpx.get(f"{api}/v1/pipelines", headers=auth(tokens["qa_only"]), timeout=30).json()
    assert [p["name"] for p in listed] == ["qa"]
    error_of(both("DELETE", f"{api}/v1/jobs/{mine.json()['job_id']}", tokens["reader"]), 403, "forbidden")
    assert httpx.get(f"{api}/v1/pipelines", headers=auth(ADMIN), timeout=30).status_code == 200  # the bootstrap one
    shown = subprocess.run([apis.STAGECOACH, "tokens", "list", "--json"], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=True).stdout
    names = {t["name"]: t for t in json.loads(shown)}
    assert names["qa-only"]["pipelines"] == ["qa"] and names["reader"]["scopes"] == ["read"]
    assert tokens["user"] not in shown  # only hashes are stored
    temp = make_token(env, "short-lived", "--scope", "read")
    assert httpx.get(f"{api}/v1/pipelines", headers=auth(temp), timeout=30).status_code == 200
    subprocess.run([apis.STAGECOACH, "tokens", "revoke", "short-lived"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    error_of(httpx.get(f"{api}/v1/pipelines", headers=auth(temp), timeout=30), 401, "unauthorized")
    again = subprocess.run([apis.STAGECOACH, "tokens", "create", "user"], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = subprocess.run([apis.STAGECOACH, "tokens", "create", "x", "--scope", "root"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "scopes" in bad.stderr


def test_idempotency_key(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    key = uuid.uuid4().hex
    body = {"pipeline": "qa", "inputs": question()}
    first = submit(api, user, body, **{"Idempotency-Key": key})
    reordered = {"inputs": body["inputs"], "pipeline": "qa"}  # the same request, keys in another order
    status, _, again = curl("POST", f"{api}/v1/jobs", user, reordered, {"Idempotency-Key": key})
    assert first.status_code == status == 202
    assert again["job_id"] == first.json()["job_id"] and again["replayed"] is True
    conflict = both("POST", f"{api}/v1/jobs", user, {"pipeline": "qa", "inputs": question()},
                    {"Idempotency-Key": key})
    assert first.json()["job_id"] in error_of(conflict, 409, "conflict")["message"]
    # a request that failed frees its key for the corrected one
    key2 = uuid.uuid4().hex
    error_of(submit(api, user, {"pipeline": "qa", "inputs": {}}, **{"Idempotency-Key": key2}), 422, "contract")
    assert submit(api, user, body, **{"Idempotency-Key": key2}).status_code == 202
    error_of(both("POST", f"{api}/v1/jobs", user, body, {"Idempotency-Key": "k" * 201}), 400, "bad-request")


def test_rate_limit_and_backlog_answer_429_with_retry_after(api: str, tokens: dict[str, str]) -> None:
    slow = tokens["slowpoke"]  # 3 requests a minute
    answers = [httpx.get(f"{api}/v1/pipelines", headers=auth(slow), timeout=30) for _ in range(4)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    limited = error_of(answers[3], 429, "rate-limited")
    assert 1 <= int(answers[3].headers["retry-after"]) <= 61 and "3 requests per minute" in limited["message"]
    user = tokens["user"]
    backlog = [submit(api, user, {"pipeline": "api_limited", "inputs": question(SLOW)}) for _ in range(2)]
    assert [b.status_code for b in backlog] == [202, 202]
    full = both("POST", f"{api}/v1/jobs", user, {"pipeline": "api_limited", "inputs": question()})
    assert "max_queued" in error_of(full, 429, "backlog")["message"] and full.headers["retry-after"] == "5"
    for sent in backlog:
        result(api, user, sent.json()["job_id"])
    assert submit(api, user, {"pipeline": "api_limited", "inputs": question()}).status_code == 202  # room again


def test_cancel_and_resume(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    job_id = submit(api, user, {"pipeline": "qa", "inputs": question(SLOW)}).json()["job_id"]
    cancelled = both("DELETE", f"{api}/v1/jobs/{job_id}", user)
    assert cancelled.status_code == 202 and cancelled.json()["job_id"] == job_id
    ended = result(api, user, job_id)
    assert ended["state"] == "failed" and ended["error"]["kind"] == "cancelled"
    error_of(both("DELETE", f"{api}/v1/jobs/{job_id}", user), 409, "conflict")
    resumed = both("POST", f"{api}/v1/jobs/{job_id}/resume", user)
    assert resumed.status_code == 202 and resumed.json()["generation"] >= 1
    assert result(api, user, job_id)["state"] == "succeeded"
    error_of(both("POST", f"{api}/v1/jobs/{job_id}/resume", user), 409, "conflict")  # succeeded: nothing to resume


def test_redis_down_is_503(env: dict[str, str], logdir: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with apis.api_server({**env, "STAGECOACH_BROKER_URL": dead, "STAGECOACH_PUBLISH_RETRY_SECONDS": "1"}, logdir,
                         "api-dead", auth="false") as url:
        body = error_of(both("GET", f"{url}/v1/jobs/some-job"), 503, "unavailable")
        assert "Redis" in body["message"]
        error_of(both("POST", f"{url}/v1/jobs", body={"pipeline": "qa", "inputs": question()}), 503, "unavailable")
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 503


def test_auth_off_refuses_a_public_address(env: dict[str, str]) -> None:
    done = subprocess.run([apis.STAGECOACH, "api", "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT,
                          env={**env, "STAGECOACH_API_AUTH": "false"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to listen on 0.0.0.0 with auth off" in done.stderr


# --- webhooks ---------------------------------------------------------------------------------------------


def wait_delivery(api: str, token: str, job_id: str, state: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth(token), timeout=30).json())
        return (found.get("webhook") or {}).get("state") == state

    wait_until(reached, 60, f"webhook of job {job_id} {state}")
    return found["webhook"]  # type: ignore[no-any-return]


def test_webhook_is_signed_retried_and_shows_in_the_status(api: str, tokens: dict[str, str],
                                                           hooks: apis.Receiver) -> None:
    user = tokens["user"]
    job_id = submit(api, user, {"pipeline": "qa", "inputs": question(),
                                "webhook": {"url": hooks.url, "secret": SECRET}}).json()["job_id"]
    done = result(api, user, job_id)
    delivery = wait_delivery(api, user, job_id, "delivered")
    assert delivery["attempts"] == 2 and delivery["last_status"] == 200 and delivery["url"] == hooks.url
    got = hooks.ok(job_id)
    assert [d.attempt for d in got] == [1, 2] and all(d.valid for d in got)  # 500 first, then the retry
    assert got[-1].result["job_id"] == job_id and got[-1].result["answer"] == done["answer"]
    assert not apis.verify("another-secret-of-16", got[-1].body, got[-1].signature)
    # the pipeline's default webhook, when the request names none
    hooked = submit(api, user, {"pipeline": "api_hooked", "inputs": question()}).json()["job_id"]
    assert wait_delivery(api, user, hooked, "delivered")["attempts"] == 2
    assert hooks.ok(hooked)[-1].valid


def test_dead_receiver_ends_in_a_dead_letter(api: str, tokens: dict[str, str], private_redis: str) -> None:
    user = tokens["user"]
    nowhere = f"http://127.0.0.1:{free_port()}/hook"
    job_id = submit(api, user, {"pipeline": "qa", "inputs": question(),
                                "webhook": {"url": nowhere, "secret": SECRET}}).json()["job_id"]
    delivery = wait_delivery(api, user, job_id, "dead-lettered")
    assert delivery["attempts"] == 3 and "ConnectError" in delivery["last_error"]
    letters = [json.loads(raw) for raw in redis.Redis.from_url(private_redis).lrange(DEAD_LETTER_KEY, 0, -1)]
    mine = [letter for letter in letters if letter.get("root_id") == job_id]
    assert len(mine) == 1 and mine[0]["queue"] == WEBHOOK_QUEUE and SECRET not in json.dumps(mine)


def test_cancelled_and_rejected_jobs_call_back(api: str, tokens: dict[str, str], hooks: apis.Receiver,
                                               private_redis: str) -> None:
    user = tokens["user"]
    hook = {"url": hooks.url, "secret": SECRET}
    job_id = submit(api, user, {"pipeline": "qa", "inputs": question(SLOW), "webhook": hook}).json()["job_id"]
    assert httpx.delete(f"{api}/v1/jobs/{job_id}", headers=auth(user), timeout=30).status_code == 202
    wait_delivery(api, user, job_id, "delivered")
    assert hooks.ok(job_id)[-1].result["error"]["kind"] == "cancelled"
    # a Celery client's request that breaks the contract: rejected, and its webhook still hears of it
    sender = Celery("any-client", broker=private_redis, backend=private_redis)
    rejected_id = uuid.uuid4().hex
    sender.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": {"question": 42, "extra": 1}, "webhook": hook}],
                     task_id=rejected_id, queue="celery")
    wait_until(lambda: any(d.valid and d.result["job_id"] == rejected_id for d in hooks.deliveries), 60,
               "the rejected job's webhook")
    told = [d for d in hooks.deliveries if d.job_id == rejected_id][-1].result
    assert told["state"] == "failed" and told["error"]["kind"] == "contract" and not told["error"]["node"]


# --- priorities ---------------------------------------------------------------------------------------------


def test_urgent_jobs_overtake_a_backlog_on_a_busy_stage(api: str, tokens: dict[str, str]) -> None:
    """One worker, one call at a time, a backlog of 16 default-priority jobs (half a second each): 3 jobs of
    priority 9 sent after them run as soon as the stage frees up, ahead of the backlog still waiting."""
    user = tokens["user"]
    tag = uuid.uuid4().hex[:6]
    backlog = [submit(api, user, {"pipeline": "api_busy", "inputs": question(f"b{i} {tag} [[lm:sleep=500]]")})
               .json()["job_id"] for i in range(16)]
    urgent = [submit(api, user, {"pipeline": "api_busy", "priority": 9,
                                 "inputs": question(f"u{i} {tag} [[lm:sleep=500]]")}).json()["job_id"]
              for i in range(3)]
    finished = {job_id: result(api, user, job_id)["finished_at"] for job_id in [*backlog, *urgent]}
    last_urgent = max(finished[job_id] for job_id in urgent)
    overtaken = [job_id for job_id in backlog if finished[job_id] > last_urgent]
    # without priorities all 16 would finish first; the backlog's head runs while the urgent jobs are sent
    assert len(overtaken) >= 8, (len(overtaken), sorted(finished.values()))


# --- server-sent events ---------------------------------------------------------------------------------------


def sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events parsed from a response's lines (comments, the pings, skipped)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = event.get(name, "") + value.removeprefix(" ")


def read_events(url: str, token: str, last_id: str | None = None, stop_after: int | None = None
                ) -> list[dict[str, str]]:
    """The events of a stream, until it ends or `stop_after` of them came (then the client hangs up)."""
    headers = {**auth(token), **({"Last-Event-ID": last_id} if last_id else {})}
    got: list[dict[str, str]] = []
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60, read=60)) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for event in sse(response.iter_lines()):
            got.append(event)
            if stop_after is not None and len(got) == stop_after:
                break
    return got


def test_events_stream_in_order_resume_exactly_and_replay_for_late_clients(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    job_id = submit(api, user, {"pipeline": "qa", "inputs": question("[[lm:sleep=700]]")}).json()["job_id"]
    url = f"{api}/v1/jobs/{job_id}/events"
    first = read_events(url, user, stop_after=3)  # hang up midway: queued, started, ...
    rest = read_events(url, user, last_id=first[-1]["id"])
    seen = first + rest
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)), ids  # every event exactly once
    stream_ids = [tuple(map(int, i.split("-"))) for i in ids[:-1]]
    assert stream_ids == sorted(stream_ids)  # in order
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "stagecoach-job-queued" and kinds[-2:] == ["stagecoach-job-finished", "result"], kinds
    started = [json.loads(e["data"])["stage"] for e in seen if e["event"] == "stagecoach-stage-started"]
    outcomes = [json.loads(e["data"]) for e in seen if e["event"] == "stagecoach-stage-outcome"]
    assert started == ["key_terms", "answer"] and [(o["stage"], o["outcome"]) for o in outcomes] == \
        [("key_terms", "ok"), ("answer", "ok")]
    final = json.loads(seen[-1]["data"])
    assert final["job_id"] == job_id and final["state"] == "succeeded" and seen[-1]["id"] == ids[-2] + ":result"
    # a late client gets the whole history, the same events with the same ids
    late = read_events(url, user)
    assert [(e["id"], e["event"], e["data"]) for e in late] == [(e["id"], e["event"], e["data"]) for e in seen]
    # after the result nothing follows: 204 tells an EventSource to stop reconnecting
    done = httpx.get(url, headers={**auth(user), "Last-Event-ID": seen[-1]["id"]}, timeout=30)
    assert done.status_code == 204
    bad = both("GET", url, user, headers={"Last-Event-ID": "yesterday"})
    assert error_of(bad, 422, "contract")["problems"][0]["field"] == "Last-Event-ID"
    # curl -N reads the same stream
    text = subprocess.run(["curl", "-sSN", "--max-time", "60", "-H", f"Authorization: Bearer {user}", url],
                          capture_output=True, text=True, check=True).stdout
    assert [e["id"] for e in sse(iter(text.splitlines()))] == ids


def test_events_of_a_failed_job_end_with_its_result(api: str, tokens: dict[str, str]) -> None:
    user = tokens["user"]
    job_id = submit(api, user, {"pipeline": "qa", "inputs": question("[[lm:status=400]]")}).json()["job_id"]
    seen = read_events(f"{api}/v1/jobs/{job_id}/events", user)
    outcome = [json.loads(e["data"]) for e in seen if e["event"] == "stagecoach-stage-outcome"]
    assert outcome and outcome[-1]["outcome"] == "error" and outcome[-1]["fatal"] is True
    assert json.loads(seen[-1]["data"])["state"] == "failed" and seen[-1]["event"] == "result"


# --- clients in other languages --------------------------------------------------------------------------------

HTTP_EXAMPLES = ROOT / "examples" / "http"


def run_client(command: list[str], api: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "STAGECOACH_API": api, "STAGECOACH_TOKEN": token}
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("command", [["node", str(HTTP_EXAMPLES / "client.mjs")], [str(HTTP_EXAMPLES / "client.sh")]],
                         ids=["node-fetch", "shell-curl"])
def test_clients_in_other_languages_submit_stream_and_read(command: list[str], api: str,
                                                            tokens: dict[str, str]) -> None:
    done = run_client(command, api, tokens["user"], "qa", json.dumps(question("[[lm:sleep=200]]")))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"] == "succeeded" and result["answer"]["answer"]
    assert "stagecoach-stage-started" in done.stderr and "stagecoach-job-finished" in done.stderr
    refused = run_client(command, api, tokens["user"], "qa", json.dumps({"question": ["not", "text"]}))
    assert refused.returncode == 2 and "422" in refused.stderr and "question" in refused.stderr
    failed = run_client(command, api, tokens["user"], "qa", json.dumps(question("[[lm:status=400]]")))
    assert failed.returncode == 1 and json.loads(failed.stdout)["state"] == "failed"


# --- generated requests --------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_hang(api: str, logdir: Path) -> None:
    """schemathesis generates requests from /openapi.json (valid and invalid, every operation): none may get a
    5xx or take longer than the request timeout. One worker: hypothesis parses lambdas' source while it
    generates, and CPython 3.11's ast.parse is not thread-safe ("AST constructor recursion depth mismatch")."""
    report = logdir / "schemathesis.xml"
    done = subprocess.run(
        [str(Path(apis.STAGECOACH).with_name("schemathesis")), "run", f"{api}/openapi.json",
         "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {ADMIN}",
         "--max-examples", "25", "--request-timeout", "30", "--workers", "1", "--generation-deterministic",
         "--suppress-health-check", "all", "--report", "junit", "--report-junit-path", str(report)],
        cwd=logdir, capture_output=True, text=True, timeout=1200)  # its cache stays out of the repository
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout or "passed" in done.stdout.lower(), done.stdout[-3000:]
