"""The monitor's parts without a fleet: the store's bounds on a real Redis, events fed to the consumer
as Celery's receiver hands them over, the graph drawings and `stagecoach graph`."""

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from contracts.catalog import Catalog
from contracts.events import StageOutcome
from contracts.names import STAGE_OUTCOME_EVENT, monitor_key
from monitor.consumer import Consumer
from monitor.graph import build, mermaid, render
from monitor.settings import MonitorSettings
from monitor.store import Store
from monitor.trace import build as build_trace
from tests.monitor_services import STAGECOACH, png_stats
from tests.services import ROOT


@pytest.fixture
def consumer(private_redis: str) -> Iterator[Consumer]:
    settings = MonitorSettings(broker_url=private_redis, samples=10, error_examples=3, trace_events=20)
    store = Store.connect(settings)
    store.clear()
    yield Consumer(Celery("unit", broker=private_redis), store)
    store.clear()


def outcome(i: int, outcome: str = "ok", **extra: object) -> dict[str, object]:
    """A stage-outcome event as the receiver hands it over: the typed model's fields plus Celery's."""
    fields = {"stage": "answer", "pipeline": "qa", "job_id": f"job{i}", "node": "answer", "outcome": outcome,
              "seconds": i / 10, "at": 1000.0 + i, "prompt_tokens": 3, "completion_tokens": 2, "input_bytes": 10,
              "output_bytes": 5, **extra}
    celery = {key: fields.pop(key) for key in ("uuid",) if key in fields}
    event = StageOutcome.model_validate(fields).payload()
    return {"type": STAGE_OUTCOME_EVENT, "uuid": f"t{i}", "timestamp": 1000.0 + i, **event, **celery}


def test_counts_are_exact_and_lists_are_capped(consumer: Consumer) -> None:
    for i in range(25):
        consumer.handle(outcome(i))
    for i in range(5):
        consumer.handle(outcome(100 + i, "error", kind="lm", message=f"boom {i}", seconds=None))
    consumer.handle(outcome(200, "retry", kind="lm", message="503"))
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


def test_a_bad_event_is_skipped_and_the_next_counted(consumer: Consumer) -> None:
    consumer.handle({"type": STAGE_OUTCOME_EVENT, "uuid": "x"})  # no stage: logged, counted, skipped
    consumer.handle({**outcome(2), "outcome": "exploded"})  # not an outcome the model knows
    consumer.handle(outcome(1))
    assert consumer.store.report().stages[0].runs == 1
    assert consumer.malformed == 2


def test_queue_wait_from_sent_and_started(consumer: Consumer) -> None:
    consumer.handle({"type": "task-sent", "uuid": "u1", "name": "stage.answer", "root_id": "job1",
                     "timestamp": 50.0})
    consumer.handle({"type": "task-started", "uuid": "u1", "timestamp": 50.25, "hostname": "w@h"})
    consumer.handle(outcome(1, uuid="u1", job_id="job1"))
    wait = consumer.store.report().stages[0].queue_wait
    assert wait is not None and wait.p50 == pytest.approx(0.25)
    trace = build_trace("job1", consumer.store.trace("job1"))
    assert [e["type"] for e in trace.events] == ["task-sent", "task-started", "stage-outcome"]
    assert trace.nodes[0].queue_wait == pytest.approx(0.25)


def test_trace_is_capped(consumer: Consumer) -> None:
    for i in range(30):
        consumer.handle({"type": "task-received", "uuid": f"u{i}", "name": "stage.answer", "root_id": "jobx",
                         "timestamp": float(i)})
    assert len(consumer.store.trace("jobx")) == 20


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
    consumer.handle(outcome(1))
    again = Store(redis.Redis.from_url(private_redis, decode_responses=True), consumer.store.settings)
    assert again.report().stages[0].runs == 1


def trace_keys(r: redis.Redis) -> set[str]:
    return {str(key) for key in r.scan_iter(match=monitor_key("trace", "*"), count=500)}


def test_traces_are_bounded_and_late_events_make_no_orphans(private_redis: str) -> None:
    """Only the latest `traces` jobs keep a trace list; one that falls out of the index loses its list in
    the same step, and its late events (two of them) do not bring the list back."""
    store = Store.connect(MonitorSettings(broker_url=private_redis, traces=3, trace_events=10, trace_ttl=600))
    store.clear()
    try:
        for i in range(6):
            assert store.trace_event(f"job{i}", {"type": "task-sent", "timestamp": 100.0 + i})
        assert trace_keys(store.r) == {monitor_key("trace", f"job{i}") for i in (3, 4, 5)}
        assert store.jobs() == ["job5", "job4", "job3"]
        assert not store.trace_event("job0", {"type": "task-succeeded", "timestamp": 200.0})
        assert not store.trace_event("job1", {"type": "job-finished", "timestamp": 201.0})
        assert store.trace_event("job4", {"type": "task-succeeded", "timestamp": 202.0})
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
                stores[worker].trace_event(f"job{i}", {"type": f"e{worker}.{step}", "timestamp": 1000.0 + i + step})
            if i >= 5:  # a late event of a job five jobs back, likely evicted meanwhile
                stores[worker].trace_event(f"job{i - 5}", {"type": "late", "timestamp": 2000.0 + i})

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
