"""Every way a job ends goes through the job ledger's one close (workers/ledger.py).

Jobs end in each of the six ways: succeeded, failed, cancelled, rejected by its contract, dead-lettered,
timed out; for each the test checks one typed JobFinished event, one JobResult with that ending, the
final status, the state Flower's API shows for the task that ended it (and for a `pipeline.run` job,
the run task under the job id), and the monitor counting the job once.
"""

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from contracts.events import JobFinished
from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, RUN_TASK, stage_queue
from routing.client import Client
from routing.recovery import Recovery
from routing.tasks import start_envelope
from tests import monitor_services as ms
from tests.reliability_kit import EMBED, headers, message, wait_for
from tests.services import Fleet, client_for, per_stage_fleet, worker_env

STAGE_LIMIT = 4.0  # seconds: the timed-out job's LM sleeps longer, the cancelled one's less


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("endings")


@pytest.fixture(scope="module")
def fleet(private_redis: str, lm_url: str, logdir: Path) -> Iterator[Fleet]:
    env = worker_env(private_redis, lm_url, STAGECOACH_STAGE_TIME_LIMIT=str(STAGE_LIMIT))
    with per_stage_fleet(env, logdir, ["key_terms", "answer"]) as own:
        yield own


@pytest.fixture(scope="module")
def client(private_redis: str, lm_url: str, fleet: Fleet) -> Client:
    return client_for(private_redis, lm_url)


class FinishedEvents:
    """Every job-finished event on the jobs' own event streams (the fleet stream's copies are the monitor's,
    which trims them once read), validated against its model as the monitor does."""

    def __init__(self, client: Client) -> None:
        self.log = client.runtime.ledger.events

    def of(self, job_id: str) -> list[JobFinished]:
        return [e for _, e in self.log.read(job_id, count=1000) if isinstance(e, JobFinished)]


@pytest.fixture(scope="module")
def services(private_redis: str, lm_url: str, fleet: Fleet, logdir: Path) -> Iterator[tuple[str, str]]:
    with ms.flower(private_redis, lm_url, logdir) as flower_url, \
            ms.monitor_service(private_redis, lm_url, logdir) as monitor_url:
        yield monitor_url, flower_url


@pytest.fixture(scope="module")
def events(client: Client, services: tuple[str, str]) -> FinishedEvents:
    return FinishedEvents(client)


def question(tag: str, marker: str = "") -> dict[str, str]:
    return {"question": f"How do tides work ({tag}, {uuid.uuid4().hex[:6]})? {marker}".strip()}


def started_job(client: Client, job_id: str) -> None:
    """A job the ledger recorded whose chain was never sent (so only what the test sends runs for it)."""
    request = {"pipeline": "qa", "inputs": question("dead")}
    first, _, pinned = start_envelope(client.runtime.catalog, request, job_id)
    client.ledger.start(first, request, pinned, "client", "test", final=True)


def end_jobs(client: Client, private_redis: str) -> dict[str, tuple[str, str]]:
    """Job id -> (expected ending, how it was started) for one job per ending (two for `failed`)."""
    app, db = client.app, redis.Redis.from_url(private_redis)
    jobs: dict[str, tuple[str, str]] = {}
    ok = client.submit("qa", question("ok", "[[lm:fail_first=1]]"))  # one retried attempt on the way
    jobs[ok.id] = ("succeeded", "client")
    failed = client.submit("qa", question("bad", "[[lm:status=400]]"))
    jobs[failed.id] = ("failed", "client")
    run_failed = f"run-{uuid.uuid4().hex}"
    app.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": question("bad-run", "[[lm:status=400]]")}],
                  task_id=run_failed, queue=ROUTING_QUEUE)
    jobs[run_failed] = ("failed", "run")
    slow = client.submit("qa", question("cancel", "[[lm:sleep=1500]]"))
    wait_for(lambda: client.status(slow.id).state == "running", 30, "the job to be running")
    Recovery(app, client.runtime.catalog, client.ledger).cancel(slow.id)
    jobs[slow.id] = ("cancelled", "client")
    rejected = f"rejected-{uuid.uuid4().hex}"
    app.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": {"questio": "typo"}}], task_id=rejected,
                  queue=ROUTING_QUEUE)
    jobs[rejected] = ("rejected", "run")
    dead = f"dead-{uuid.uuid4().hex}"
    started_job(client, dead)
    poison = message(stage_queue("answer"), headers("stage.answer", uuid.uuid4().hex, root_id=dead),
                     [[{"job_id": 5}], {"node": {"stage": "answer"}, "path": "answer"}, EMBED])
    db.lpush(stage_queue("answer"), json.dumps(poison))
    jobs[dead] = ("dead-lettered", "client")
    timed = client.submit("qa", question("slow", f"[[lm:sleep={int(STAGE_LIMIT * 1000 + 3000)}]]"))
    jobs[timed.id] = ("timed-out", "client")
    return jobs


@pytest.fixture(scope="module")
def ended(client: Client, private_redis: str, events: FinishedEvents) -> dict[str, tuple[str, str]]:
    jobs = end_jobs(client, private_redis)
    for job_id in jobs:
        AsyncResult(job_id, app=client.app).get(timeout=90)
    wait_for(lambda: all(events.of(j) for j in jobs), 30, "a job-finished event for every job")
    time.sleep(1.0)  # a duplicate event, were there one, would arrive by now
    return jobs


def test_each_ending_has_one_event_one_result_and_its_final_status(
        client: Client, ended: dict[str, tuple[str, str]], events: FinishedEvents) -> None:
    for job_id, (ending, _) in ended.items():
        result = JobResult.model_validate(AsyncResult(job_id, app=client.app).get(timeout=5))
        assert result.ending == ending, (job_id, result.error)
        [event] = events.of(job_id)
        assert (event.ending, event.state) == (ending, result.state)
        assert client.status(job_id).state == result.state == ("succeeded" if ending == "succeeded" else "failed")
    by_ending = {ending: job_id for job_id, (ending, _) in ended.items()}
    rejected = JobResult.model_validate(AsyncResult(by_ending["rejected"], app=client.app).get())
    assert rejected.error is not None and "questio" in rejected.error.fields
    timed = JobResult.model_validate(AsyncResult(by_ending["timed-out"], app=client.app).get())
    assert timed.error is not None and timed.error.kind == "timeout" and timed.error.stage == "key_terms"


def flower_tasks(flower_url: str, job_id: str) -> dict[str, dict[str, Any]]:
    return {t["uuid"]: t for t in ms.get_json(f"{flower_url}/api/tasks?limit=100000").values()
            if job_id in (t.get("root_id"), t.get("uuid"))}


def test_flower_shows_how_each_job_ended(services: tuple[str, str], ended: dict[str, tuple[str, str]]) -> None:
    flower_url = services[1]
    want = {"succeeded": "SUCCESS", "failed": "FAILURE", "timed-out": "FAILURE", "rejected": "FAILURE",
            "dead-lettered": "FAILURE", "cancelled": "REVOKED"}
    for job_id, (ending, door) in ended.items():
        def settled(job_id: str = job_id, ending: str = ending) -> dict[str, dict[str, Any]] | None:
            tasks = flower_tasks(flower_url, job_id)
            return tasks if any(t["state"] == want[ending] for t in tasks.values()) else None

        tasks = wait_for(settled, 30, f"Flower showing {want[ending]} for job {job_id} ({ending})")
        ending_tasks = [t for t in tasks.values() if t["state"] == want[ending]]
        states = Counter(t["state"] for t in tasks.values())
        assert not ({"FAILURE", "REVOKED"} & set(states)) or ending != "succeeded", (ending, states)
        if ending != "succeeded":
            assert states["SUCCESS"] <= 1 and "SUCCESS" not in {t["state"] for t in ending_tasks}
        if want[ending] == "FAILURE":
            shown = [(t["name"], t.get("exception")) for t in ending_tasks]
            assert all("JobFailed(" in (exception or "") for _, exception in shown), shown
        if door == "run":  # the `pipeline.run` task under the job id ends as the job did
            assert tasks[job_id]["name"] == RUN_TASK and tasks[job_id]["state"] == want[ending], tasks[job_id]
    by_ending = {ending: job_id for job_id, (ending, door) in ended.items() if door == "client"}
    failed = flower_tasks(flower_url, by_ending["failed"])
    [stage] = [t for t in failed.values() if t["state"] == "FAILURE"]  # the stage that failed is marked so
    assert stage["name"] == "stage.key_terms" and "key_terms" in stage["exception"]
    timed = [t for t in flower_tasks(flower_url, by_ending["timed-out"]).values() if t["state"] == "FAILURE"]
    assert [t["name"] for t in timed] == ["stage.key_terms"] and "timeout" in timed[0]["exception"]
    cancelled = [t for t in flower_tasks(flower_url, by_ending["cancelled"]).values() if t["state"] == "REVOKED"]
    assert [t["name"] for t in cancelled] == ["stage.answer"]
    dead = [t for t in flower_tasks(flower_url, by_ending["dead-lettered"]).values() if t["state"] == "FAILURE"]
    assert [t["name"] for t in dead] == ["stage.answer"] and "message" in dead[0]["exception"]
    retried = [t for t in flower_tasks(flower_url, by_ending["succeeded"]).values()
               if t["name"] == "stage.key_terms"]
    assert [t["retries"] for t in retried] == [1] and retried[0]["state"] == "SUCCESS"


def test_the_monitor_counts_each_job_once(services: tuple[str, str], ended: dict[str, tuple[str, str]]) -> None:
    monitor_url = services[0]
    total = len(ended)
    wait_for(lambda: sum(p["runs"] for p in ms.get_json(f"{monitor_url}/api/stats")["pipelines"]) >= total, 30,
             "the monitor to count every job")
    time.sleep(1.0)
    [qa] = [p for p in ms.get_json(f"{monitor_url}/api/stats")["pipelines"] if p["name"] == "qa"]
    assert (qa["runs"], qa["succeeded"], qa["failed"]) == (total, 1, total - 1), qa
    assert {"cancelled", "contract", "message", "timeout"} <= set(qa["failures"]), qa["failures"]
    for job_id in ended:
        trace = ms.get_json(f"{monitor_url}/api/trace/{job_id}")
        assert [e["type"] for e in trace["events"]].count("job-finished") == 1, job_id
