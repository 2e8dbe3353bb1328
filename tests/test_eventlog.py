"""The event log (workers/eventlog.py): a job's life as typed events on its own Redis stream, in order,
each once, and on the fleet's stream for the monitor; written by the ledger in its own round trips."""

import uuid

import redis

from contracts.events import (
    DecisionMade,
    FieldsPublished,
    JobFinished,
    JobQueued,
    StagecoachEvent,
    StageOutcome,
    StageStarted,
)
from contracts.names import EVENTS_STREAM, job_events_key
from routing.client import Client
from tests.reliability_kit import wait_for
from workers.eventlog import decode


def kinds(events: list[tuple[str, StagecoachEvent]]) -> list[str]:
    out = []
    for _, event in events:
        if isinstance(event, StageStarted | StageOutcome):
            detail = event.stage if isinstance(event, StageStarted) else f"{event.stage}:{event.outcome}"
            out.append(f"{type(event).__name__}({detail})")
        elif isinstance(event, DecisionMade):
            out.append(f"DecisionMade({event.kind}->{event.choice})")
        else:
            out.append(type(event).__name__)
    return out


def finished_log(client: Client, job_id: str) -> list[tuple[str, StagecoachEvent]]:
    log = client.ledger.events
    return wait_for(lambda: (found := log.read(job_id)) and isinstance(found[-1][1], JobFinished) and found,
                    30, f"job {job_id}'s job-finished event")


def test_a_jobs_events_are_on_its_stream_in_order_once(client: Client) -> None:
    handle = client.submit("qa", {"question": f"Why do rivers meander ({uuid.uuid4().hex[:6]})?"})
    result = handle.get(timeout=60)
    events = finished_log(client, handle.id)
    # the last stage closes the job in its own round trip: its fields come with the end, not published early
    assert kinds(events) == ["JobQueued", "StageStarted(key_terms)", "StageOutcome(key_terms:ok)",
                             "StageStarted(answer)", "StageOutcome(answer:ok)", "JobFinished"]
    assert handle.output("answer") == result.answer["answer"]
    ids = [entry_id for entry_id, _ in events]
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-"))) and len(set(ids)) == len(ids)
    queued, finished = events[0][1], events[-1][1]
    assert isinstance(queued, JobQueued) and queued.door == "client"
    assert isinstance(finished, JobFinished) and finished.ending == "succeeded" and finished.state == result.state
    # reading on from an entry id gives exactly what came after it (a reconnecting reader misses nothing)
    assert client.ledger.events.read(handle.id, after=ids[2]) == events[3:]
    ttl = redis.Redis.from_url(str(client.app.conf.result_backend)).ttl(job_events_key(handle.id))
    assert 0 < ttl <= client.runtime.settings.result_expires


def test_decisions_retries_and_a_failure_are_told(client: Client) -> None:
    tag = uuid.uuid4().hex[:6]
    routed = client.submit("patterns_branch", {"question": f"Write an essay on tides ({tag})"})
    routed.get(timeout=60)
    told = kinds(finished_log(client, routed.id))
    assert told[:3] == ["JobQueued", "StageStarted(classify_task)", "StageOutcome(classify_task:ok)"]
    assert told[3].startswith("DecisionMade(branch->") and told[-1] == "JobFinished"
    assert told.index(told[3]) < told.index(next(k for k in told if k.startswith("StageStarted(") and
                                                 "classify_task" not in k))  # the decision precedes what it started
    flaky = client.submit("qa", {"question": f"Flaky ({tag}) [[lm:fail_first=1]]"})
    assert flaky.get(timeout=60).ok
    told = kinds(finished_log(client, flaky.id))
    assert told[1:4] == ["StageStarted(key_terms)", "StageOutcome(key_terms:retry)", "StageStarted(key_terms)"]
    broken = client.submit("qa", {"question": f"Broken ({tag}) [[lm:status=400]]"})
    assert not broken.get(timeout=60).ok
    told = kinds(finished_log(client, broken.id))
    assert told == ["JobQueued", "StageStarted(key_terms)", "StageOutcome(key_terms:error)", "JobFinished"]


def test_the_fleet_stream_carries_every_job_but_published_fields(client: Client) -> None:
    handle = client.submit("qa", {"question": f"Why is ice slippery ({uuid.uuid4().hex[:6]})?"})
    handle.get(timeout=60)
    mine = [e for e in (decode(f) for _, f in redis.Redis.from_url(str(client.app.conf.result_backend)).xrange(
        EVENTS_STREAM, count=100_000)) if e is not None and e.job_id == handle.id]
    assert [type(e).__name__ for e in mine] == [type(e).__name__ for _, e in finished_log(client, handle.id)
                                                if not isinstance(e, FieldsPublished)]
