"""Jobs that survive the broker (issue 9): checkpoints after every stage, once-only steps however
often a message is delivered, the watchdog re-dispatching a job whose message was lost, resume of
a failed job without repeating completed stages' LM calls, cancel. Real Redis and workers."""

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, checkpoint_key, stage_queue
from contracts.priority import queue_lists
from routing.client import Client
from routing.compile import Compiler, bind_input
from routing.nodes import KINDS
from tests.reliability_kit import catalog_paths, qa_fleet, wait_for
from tests.services import Fleet, client_for, worker_env
from tests.services import test_lm as start_test_lm

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
STALL = 3.0
SHARED = ("rel_summarize", "rel_headline", "rel_limited", "rel_headline_fallback", "rel_headline_skip",
          "rel_summary_fixed", "rel_rated")


@pytest.fixture(scope="module")
def own_lm() -> Iterator[str]:
    with start_test_lm() as url:
        yield url


@pytest.fixture(scope="module")
def stack(private_redis: str, own_lm: str) -> Iterator[tuple[str, Fleet]]:
    with qa_fleet(private_redis, own_lm, shared=SHARED, STAGECOACH_WATCHDOG_STALL_SECONDS=str(STALL),
                  STAGECOACH_STAGE_TIME_LIMIT="10") as fleet:
        yield private_redis, fleet


@pytest.fixture(scope="module")
def client(stack: tuple[str, Fleet], own_lm: str) -> Client:
    return client_for(stack[0], own_lm, catalog_paths())


@pytest.fixture(scope="module")
def env(stack: tuple[str, Fleet], own_lm: str) -> dict[str, str]:
    return worker_env(stack[0], own_lm, catalog_paths(), STAGECOACH_WATCHDOG_STALL_SECONDS=str(STALL))


def lm_calls(lm_url: str) -> int:
    with urllib.request.urlopen(lm_url.removesuffix("/v1") + "/stats", timeout=5) as response:
        return int(json.loads(response.read())["counts"].get("requests", 0))


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STAGECOACH, *args], env=env, capture_output=True, text=True, timeout=120)


def stages_of(result: JobResult) -> list[str]:
    return [t.node for t in result.timings]


def test_checkpoint_holds_the_envelope_after_every_stage(client: Client, stack: tuple[str, Fleet]) -> None:
    result = client.submit("qa", {"question": "Checkpointed?"}).get(timeout=60)
    saved = redis.Redis.from_url(stack[0]).hgetall(checkpoint_key(result.job_id))
    request = json.loads(saved[b"request"])
    assert (request["pipeline"], request["inputs"]) == ("qa", {"question": "Checkpointed?"})
    assert json.loads(saved[b"envelope"])["state"]["answer"] == "answer of <Checkpointed?>"
    assert {b"done:key_terms", b"done:answer", b"finished_at"} <= set(saved)
    assert 0 < redis.Redis.from_url(stack[0]).ttl(checkpoint_key(result.job_id)) <= 7 * 24 * 3600


def test_a_job_dispatched_twice_runs_each_stage_once(client: Client, own_lm: str) -> None:
    """Two identical canvases for one job (what a redelivered `pipeline.run` or a duplicated message
    amounts to): one chain does the work, the other's steps are dropped; one result, no double count."""
    app: Celery = client.app
    catalog = client.runtime.catalog
    job_id = "twice-" + str(time.time_ns())
    envelope = {"job_id": job_id, "pipeline": "qa", "pipeline_version": "1", "state": {"question": "Twice?"}}
    from routing.tasks import start_envelope
    request = {"pipeline": "qa", "inputs": {"question": "Twice?"}}
    first, _, pinned = start_envelope(catalog, request, job_id)
    client.ledger.start(first, request, pinned, "client", "test", final=True)  # recorded, as a client would
    before = lm_calls(own_lm)
    for _ in range(2):
        bind_input(Compiler(app, catalog, KINDS).pipeline(catalog.pipeline("qa")), envelope).apply_async(task_id=job_id)
    result = client.handle(job_id).get(timeout=60)
    time.sleep(1.0)  # let the second chain's steps arrive and be dropped
    assert result.ok and stages_of(result) == ["key_terms", "answer"]
    assert lm_calls(own_lm) - before == 2
    assert client.status(job_id).stages_done == 2


def test_redelivered_pipeline_run_starts_one_chain(client: Client, stack: tuple[str, Fleet], own_lm: str) -> None:
    from tests.reliability_kit import run_message

    db = redis.Redis.from_url(stack[0])
    job_id = "redelivered-" + str(time.time_ns())
    raw = run_message(job_id, {"pipeline": "qa", "inputs": {"question": "Once?"}})
    before = lm_calls(own_lm)
    db.lpush(ROUTING_QUEUE, json.dumps(raw), json.dumps(raw))  # the same message, delivered twice
    result = client.handle(job_id).get(timeout=60)
    time.sleep(1.0)
    assert result.ok and stages_of(result) == ["key_terms", "answer"]
    assert lm_calls(own_lm) - before == 2


def test_watchdog_redispatches_a_lost_message_from_the_checkpoint(client: Client, stack: tuple[str, Fleet],
                                                                   env: dict[str, str], own_lm: str) -> None:
    db = redis.Redis.from_url(stack[0])
    fleet = stack[1]
    answer = next(w for w in fleet.workers if w.name == "answer-0")
    answer.stop()
    fleet.workers.remove(answer)
    handle = client.submit("qa", {"question": "Lost in transit?"})
    lists = queue_lists(stage_queue("answer"))  # one Redis list per priority step
    wait_for(lambda: sum(db.llen(key) for key in lists), 30, "the answer stage's message in its queue")
    db.delete(*lists)  # the message is lost (what a consumer killed mid-pop does)
    fleet.start("answer-1", [stage_queue("answer")], concurrency=2)
    fleet.wait_ready()
    before = lm_calls(own_lm)
    time.sleep(STALL + 0.5)
    swept = cli(env, "watchdog", "--once")
    assert swept.returncode == 0, swept.stderr
    assert f"job {handle.id}: re-dispatched (generation 1)" in swept.stdout
    result = handle.get(timeout=60)
    assert result.ok and result.answer["answer"] == "answer of <Lost in transit?>"
    by_node = {t.node: t for t in result.timings}
    assert by_node["key_terms"].from_checkpoint and not by_node["answer"].from_checkpoint
    assert lm_calls(own_lm) - before == 1  # only the lost stage called the LM again


def test_resume_continues_a_failed_job_without_repeating_done_stages(client: Client, env: dict[str, str],
                                                                     own_lm: str) -> None:
    handle = client.submit("rel_two", {"document": "Rivers carry silt.", "hint": "[[lm:fail_first=1]] tide"})
    failed = handle.get(timeout=60)
    assert failed.state == "failed" and failed.error is not None and failed.error.stage == "rel_headline"
    before = lm_calls(own_lm)
    resumed = cli(env, "resume", handle.id)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed (generation 1)" in resumed.stdout
    result = handle.get(timeout=60)
    assert result.ok, result.error
    assert result.answer["summary"] == "summary of <Rivers carry silt.>"
    by_node = {t.node: t for t in result.timings}
    assert by_node["rel_summarize"].from_checkpoint and not by_node["rel_headline"].from_checkpoint
    assert lm_calls(own_lm) - before == 1
    again = cli(env, "resume", handle.id)
    assert again.returncode == 3 and "succeeded; nothing to resume" in again.stderr


def test_cancel_stops_the_remaining_stages(client: Client, env: dict[str, str], stack: tuple[str, Fleet],
                                           own_lm: str) -> None:
    handle = client.submit("qa", {"question": "[[lm:sleep=6000]] Slow one?"})
    wait_for(lambda: client.status(handle.id).stage == "key_terms", 30, "the job in key_terms")
    done = cli(env, "cancel", handle.id)
    assert done.returncode == 0, done.stderr
    result = handle.get(timeout=60)
    assert result.state == "failed" and result.error is not None and result.error.kind == "cancelled"
    assert "stagecoach cancel" in result.error.message
    assert stages_of(result) == ["key_terms"]  # the running stage finished; answer never ran
    assert cli(env, "cancel", handle.id).returncode == 3


def test_settings_show_the_effective_visibility_timeout(env: dict[str, str]) -> None:
    shown = cli({**env, "STAGECOACH_STAGE_TIME_LIMIT": "100"}, "settings")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "effective visibility timeout" in text and "170" in text  # 100 + 10 hard-limit grace + 60


def test_stage_time_limit_holds_in_the_thread_pool(client: Client, stack: tuple[str, Fleet]) -> None:
    shared = next(w for w in stack[1].workers if w.name == "shared")
    assert "--pool threads" in " ".join(shared.proc.args)  # type: ignore[arg-type]
    result = client.submit("rel_limit", {"document": "[[lm:sleep=20000]] A slow read."}).get(timeout=60)
    assert result.state == "failed" and result.error is not None and result.error.kind == "timeout"
    assert "time limit of 2s exceeded" in result.error.message
    assert "STAGECOACH_STAGE_TIME_LIMIT" in result.error.message
    quick = client.submit("rel_limit", {"document": "A quick read."}).get(timeout=60)
    assert quick.ok  # the worker that timed out keeps serving


def test_lm_timeout_error_names_the_setting(client: Client) -> None:
    result = client.submit("rel_lm_timeout", {"document": "[[lm:sleep=4000]] Slow model."}).get(timeout=60)
    assert result.state == "failed" and result.error is not None
    assert "LM Timeout: no reply within 1s; raise STAGECOACH_LM_TIMEOUT" in result.error.message


# --- recovery strategies after retries: fail, fallback (value or stage), skip, critical: false -------

FAIL = "[[lm:fail]] no good"


@pytest.mark.parametrize(("pipeline", "state", "answer", "choice"), [
    ("rel_fallback_value", "succeeded", {"summary": "no summary available"}, "fallback"),
    ("rel_fallback_stage", "succeeded", {"headline": "headline of <summary of <Tides turn.>>"}, "fallback"),
    ("rel_skip", "succeeded", {"summary": "summary of <Tides turn.>", "headline": None}, "skip"),
    ("rel_not_critical", "succeeded", {"summary": "summary of <Tides turn.>", "headline": None}, None),
    ("rel_two", "failed", {}, None),
])
def test_on_error_strategies(client: Client, pipeline: str, state: str, answer: dict[str, Any],
                             choice: str | None) -> None:
    inputs = {"document": FAIL} if pipeline == "rel_fallback_value" else {"document": "Tides turn.", "hint": FAIL}
    result = client.submit(pipeline, inputs).get(timeout=60)
    assert result.state == state, result.error
    for name, value in answer.items():
        assert result.answer.get(name) == value
    assert len(result.errors) == 1 and "503" in result.errors[0].message  # the failure is always recorded
    decisions = [d for d in result.trail if d.kind == "recovery"]
    assert [d.choice for d in decisions] == ([choice] if choice else [])


def test_rate_limit_is_shared_by_all_workers_of_a_stage(client: Client, stack: tuple[str, Fleet]) -> None:
    stack[1].start("rated-2", [stage_queue("rel_rated")], concurrency=4)  # a second worker of the stage
    stack[1].wait_ready()
    handles = [client.submit("rel_rate", {"document": f"Quota {i}."}) for i in range(6)]
    results = [h.get(timeout=120) for h in handles]
    assert all(r.ok for r in results)
    timings = sorted((t for r in results for t in r.timings), key=lambda t: t.started_at)
    assert sum(t.throttled_seconds for t in timings) > 0
    starts = [t.started_at for t in timings]
    # never three calls inside one 3 s window (a little slack for clocks read in two processes)
    assert all(later - earlier >= 3 - 0.25 for earlier, later in zip(starts, starts[2:], strict=False))
    logs = "".join(w.log_text() for w in stack[1].workers)
    assert "stage rel_rated throttled: calls limit 2 per 3s reached" in logs


def test_workers_did_not_crash(stack: tuple[str, Fleet]) -> None:
    assert all(w.proc.poll() is None for w in stack[1].workers)
    assert "Unrecoverable error" not in "".join(w.log_text() for w in stack[1].workers)
