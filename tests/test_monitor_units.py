"""The monitor's parts without a fleet: the consumer reading typed events off the fleet's event stream on a
real Redis (exact counts, bounds, malformed entries, two replicas sharing a batch), the graph drawings and
`stagecoach graph`."""

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts.catalog import Catalog
from contracts.events import StagecoachEvent, StageOutcome, StageStarted, event_name
from contracts.names import EVENTS_STREAM, MONITOR_GROUP, monitor_key
from monitor.batch import Batch
from monitor.consumer import Consumer
from monitor.graph import build, mermaid, render
from monitor.settings import MonitorSettings
from monitor.store import Store
from monitor.trace import build as build_trace
from tests.monitor_services import STAGECOACH, png_stats
from tests.services import ROOT


def settings_for(url: str, **more: Any) -> MonitorSettings:
    return MonitorSettings(broker_url=url, samples=10, error_examples=3, trace_events=20, **more)


@pytest.fixture
def consumer(private_redis: str) -> Iterator[Consumer]:
    client = redis.Redis.from_url(private_redis)
    client.delete(EVENTS_STREAM)
    own = Consumer.connect(settings_for(private_redis, consumer="a"))
    own.store.clear()
    yield own
    own.store.clear()
    client.delete(EVENTS_STREAM)


def put(consumer: Consumer, *events: StagecoachEvent | dict[str, str]) -> list[str]:
    """Events appended to the fleet stream as the workers append them (a dict: a raw entry)."""
    fields = [e if isinstance(e, dict) else {"type": event_name(e), "data": e.model_dump_json()} for e in events]
    return [consumer.r.xadd(EVENTS_STREAM, f) for f in fields]


def outcome(i: int, outcome: str = "ok", **extra: Any) -> StageOutcome:
    fields = {"stage": "answer", "pipeline": "qa", "job_id": f"job{i}", "node": "answer", "outcome": outcome,
              "seconds": i / 10, "at": 1000.0 + i, "prompt_tokens": 3, "completion_tokens": 2, "input_bytes": 10,
              "output_bytes": 5, **extra}
    return StageOutcome.model_validate(fields)


def test_counts_are_exact_and_lists_are_capped(consumer: Consumer) -> None:
    put(consumer, *(outcome(i) for i in range(25)))
    put(consumer, *(outcome(100 + i, "error", kind="lm", message=f"boom {i}", seconds=None) for i in range(5)))
    put(consumer, outcome(200, "retry", kind="lm", message="503"))
    assert consumer.drain() == 31
    report = consumer.store.report(now=1100.0)
    answer = report.stages[0]
    assert (answer.runs, answer.succeeded, answer.failed, answer.retries) == (30, 25, 5, 1)
    assert answer.failures == {"lm": 5} and answer.prompt_tokens == 90
    assert answer.runtime is not None and answer.runtime.count == 10  # the latest 10 samples only
    assert answer.runtime.max == pytest.approx(2.4) and answer.runtime.min == pytest.approx(1.5)
    [group] = report.errors
    assert group.count == 5 and [e.message for e in group.latest] == ["boom 4", "boom 3", "boom 2"]
    r = consumer.store.r
    assert r.llen(monitor_key("trace", "job0")) == 1
    assert all(r.ttl(key) > 0 for key in r.scan_iter(match=monitor_key("series", "*")))
    assert consumer.drain() == 0  # acknowledged: nothing counted twice
    assert consumer.store.report().stages[0].runs == 30


def test_a_bad_event_is_skipped_and_the_next_counted(consumer: Consumer) -> None:
    bad = {"type": event_name(outcome(0)), "data": '{"job_id": "x"}'}  # no stage: logged, counted, skipped
    unknown = {"type": "stagecoach-nonsense", "data": "{}"}
    not_an_outcome = {"type": event_name(outcome(0)), "data": outcome(2).model_dump_json().replace('"ok"', '"boom"')}
    put(consumer, bad, unknown, not_an_outcome, outcome(1))
    consumer.drain()
    assert consumer.store.report().stages[0].runs == 1
    assert consumer.malformed == 3
    assert consumer.r.xpending(EVENTS_STREAM, MONITOR_GROUP)["pending"] == 0  # the bad ones are acknowledged too


def test_queue_wait_from_stage_started(consumer: Consumer) -> None:
    started = StageStarted(job_id="job1", pipeline="qa", at=1000.75, stage="answer", node="answer", waited=0.25,
                           first=True)
    put(consumer, started, outcome(1, job_id="job1", elapsed=0.2))
    consumer.drain()
    report = consumer.store.report()
    wait = report.stages[0].queue_wait
    assert wait is not None and wait.p50 == pytest.approx(0.25)
    assert report.pipelines[0].queue_wait is not None  # the job's first step: the pipeline's wait too
    trace = build_trace("job1", consumer.store.trace("job1"))
    assert [e["type"] for e in trace.events] == ["stage-started", "stage-outcome"]
    assert trace.nodes[0].queue_wait == pytest.approx(0.25) and trace.pipeline == "qa"


def test_trace_is_capped(consumer: Consumer) -> None:
    put(consumer, *(outcome(i, job_id="jobx") for i in range(30)))
    consumer.drain()
    assert len(consumer.store.trace("jobx")) == 20


def test_two_replicas_count_a_batch_once(consumer: Consumer, private_redis: str) -> None:
    """Replica a reads a batch and stalls before committing; b takes the entries over (a looks dead) and
    counts them; a's late commit then writes nothing. Each event counted once."""
    put(consumer, *(outcome(i) for i in range(10)))
    consumer.join()
    read_by_a = consumer.read(">", block=False)
    assert len(read_by_a) == 10
    b = Consumer.connect(settings_for(private_redis, consumer="b", claim_idle_seconds=0.001))
    wait_idle = consumer.r.xpending_range(EVENTS_STREAM, MONITOR_GROUP, "-", "+", 10)
    assert {entry["consumer"] for entry in wait_idle} == {"a"}
    counted_by_b = 0
    while counted_by_b < 10:  # XAUTOCLAIM takes an entry once it was idle 1 ms
        counted_by_b += b.claim()
    assert consumer.record(read_by_a) == 0  # a lost them: it writes nothing
    assert consumer.store.report().stages[0].runs == 10
    assert consumer.r.xpending(EVENTS_STREAM, MONITOR_GROUP)["pending"] == 0


def test_read_entries_are_trimmed_off_the_stream(consumer: Consumer) -> None:
    put(consumer, *(outcome(i) for i in range(3000)))
    consumer.drain()
    put(consumer, outcome(5000))  # one left unread: trimming keeps it
    consumer.trim()
    assert consumer.r.xlen(EVENTS_STREAM) < 3000  # MINID trims whole stream nodes (~100 entries each)
    assert consumer.drain() == 1 and consumer.store.report().stages[0].runs == 3001


def test_graph_draws_every_node_kind(catalog: Catalog) -> None:
    text = mermaid(build(catalog, "multihop"))
    assert '(["map over sub_questions"])' in text and '["retrieve"]' in text and "-->|each item|" in text
    branch = mermaid(build(catalog, "patterns_branch"))
    assert '{"branch on task_type"}' in branch and "-->|essay|" in branch
    for name in catalog.pipelines:  # every kind has a drawing
        assert build(catalog, name).edges
    svg = render(build(catalog, "qa"), "svg").decode()
    assert 'id="stage.key_terms.' in svg and 'id="stage.answer.' in svg


def test_graph_command(tmp_path: Path) -> None:
    done = subprocess.run([STAGECOACH, "graph", "qa"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.startswith("flowchart TD") and '["key_terms"]' in done.stdout
    png = tmp_path / "qa.png"
    subprocess.run([STAGECOACH, "graph", "qa", "--format", "png", "-o", str(png)], cwd=ROOT, check=True)
    width, height, distinct = png_stats(png)
    assert width > 50 and height > 100 and distinct > 10
    bad = subprocess.run([STAGECOACH, "graph", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_store_survives_a_new_store_object(consumer: Consumer, private_redis: str) -> None:
    put(consumer, outcome(1))
    consumer.drain()
    again = Store(redis.Redis.from_url(private_redis, decode_responses=True), consumer.store.settings)
    assert again.report().stages[0].runs == 1


def test_traces_are_kept_for_the_latest_jobs_only(private_redis: str, consumer: Consumer) -> None:
    bounded = Consumer.connect(settings_for(private_redis, consumer="a", traces=5))
    put(consumer, *(outcome(i, job_id=f"job{i}") for i in range(8)))
    bounded.drain()
    r = consumer.r
    assert sorted(r.scan_iter(match=monitor_key("trace", "*"))) == \
        [monitor_key("trace", f"job{i}") for i in range(3, 8)]
    put(consumer, outcome(0, job_id="job0", at=2000.0))  # a late event of a job that fell out
    bounded.drain()
    assert not r.exists(monitor_key("trace", "job0")) and bounded.store.report().stages[0].runs == 9


def trace_event(store: Store, job_id: str, event: dict[str, Any]) -> None:
    """One trace event committed as the consumer commits a batch (monitor/batch.py: TRACE)."""
    batch = Batch(store.settings)
    batch.trace_event(job_id, float(event["timestamp"]), json.dumps(event))
    store.commit(batch)


def trace_keys(r: redis.Redis) -> set[str]:
    return {str(key) for key in r.scan_iter(match=monitor_key("trace", "*"), count=500)}


def test_traces_are_bounded_and_late_events_make_no_orphans(private_redis: str) -> None:
    """Only the latest `traces` jobs keep a trace list; one that falls out of the index loses its list in
    the same step, and its late events (two of them) do not bring the list back."""
    store = Store.connect(MonitorSettings(broker_url=private_redis, traces=3, trace_events=10, trace_ttl=600))
    store.clear()
    try:
        for i in range(6):
            trace_event(store, f"job{i}", {"type": "task-sent", "timestamp": 100.0 + i})
        assert trace_keys(store.r) == {monitor_key("trace", f"job{i}") for i in (3, 4, 5)}
        assert store.jobs() == ["job5", "job4", "job3"]
        trace_event(store, "job0", {"type": "task-succeeded", "timestamp": 200.0})
        trace_event(store, "job1", {"type": "job-finished", "timestamp": 201.0})
        trace_event(store, "job4", {"type": "task-succeeded", "timestamp": 202.0})
        assert trace_keys(store.r) == {monitor_key("trace", f"job{i}") for i in (3, 4, 5)}
        assert [e["type"] for e in store.trace("job4")] == ["task-sent", "task-succeeded"]
        assert all(0 < store.r.ttl(key) <= 600 for key in trace_keys(store.r))
        assert store.r.ttl(monitor_key("jobs")) > 0 and store.r.ttl(monitor_key("evicted")) > 0
    finally:
        store.clear()


def test_concurrent_writers_leave_at_most_the_bound(private_redis: str) -> None:
    """Four writers (as four monitors would) interleave 120 jobs' events, each job's last ones late."""
    settings = MonitorSettings(broker_url=private_redis, traces=10, trace_events=10)
    stores = [Store.connect(settings) for _ in range(4)]
    stores[0].clear()

    def write(worker: int) -> None:
        for i in range(120):
            for step in range(3):
                trace_event(stores[worker], f"job{i}", {"type": f"e{worker}.{step}", "timestamp": 1000.0 + i + step})
            if i >= 5:  # a late event of a job five jobs back, likely evicted meanwhile
                trace_event(stores[worker], f"job{i - 5}", {"type": "late", "timestamp": 2000.0 + i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        r = stores[0].r
        keys = trace_keys(r)
        indexed = {monitor_key("trace", job) for job in stores[0].jobs(100)}
        assert len(indexed) == 10 and keys == indexed  # every trace list belongs to an indexed job
        assert all(r.ttl(key) > 0 and r.llen(key) <= 10 for key in keys)
    finally:
        stores[0].clear()
