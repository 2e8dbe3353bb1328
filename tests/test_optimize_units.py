"""The parts of optimisation on the fleet that need no workers: traffic splits and pinned-only versions in
the catalog, the candidate store and applying a state, the journal, and the monitor's per-version figures."""

from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest
import redis

from contracts.candidates import StageCandidate, TraceStep, state_digest
from contracts.catalog import load_catalog
from contracts.errors import SpecError
from contracts.events import JobFinished, event_name
from contracts.names import EVENTS_STREAM
from contracts.traffic import pick, routed_version
from examples.basic import Answer
from monitor.consumer import Consumer
from monitor.settings import MonitorSettings
from monitor.store import Store
from optimize.journal import Evaluation, Journal, evaluation_key
from workers.candidates import CandidateStore, apply_state
from workers.errors import PermanentStageError

STAGES = """
stages:
  - {name: probe, version: "1", module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str}}
  - {name: probe, version: "2", module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str},
     pinned_only: true}
pipelines:
  - {name: tp, version: "1", inputs: {document: str}, outputs: [summary], root: [probe]}
  - {name: tp, version: "2", inputs: {document: str}, outputs: [summary], root: ["probe@2"],
     traffic: {"1": 75, "2": 25}}
"""


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    (tmp_path / "specs.yaml").write_text(STAGES)
    (tmp_path / "states").mkdir()
    (tmp_path / "states" / "probe.json").write_text('{"not": "a spec"}')  # a states/ folder is not read as specs
    return tmp_path


def test_pinned_only_versions_never_become_the_default(catalog_file: Path) -> None:
    catalog = load_catalog([catalog_file])
    assert catalog.stage("probe").version == "1" and catalog.stage("probe@2").pinned_only
    assert catalog.pipeline("tp").version == "2"


def test_traffic_split_is_decided_by_the_job_id(catalog_file: Path) -> None:
    catalog = load_catalog([catalog_file])
    chosen = [routed_version(catalog, "tp", None, f"job-{i}") for i in range(2000)]
    assert chosen == [routed_version(catalog, "tp", None, f"job-{i}") for i in range(2000)]  # stable per job
    assert abs(chosen.count("2") / 2000 - 0.25) < 0.04
    assert routed_version(catalog, "tp@1", None, "x") is None and routed_version(catalog, "tp", "2", "x") == "2"
    assert pick({"1": 0, "2": 5}, "anything") == "2"


def test_traffic_naming_an_unknown_version_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(STAGES.replace('{"1": 75, "2": 25}', '{"1": 75, "9": 25}'))
    with pytest.raises(SpecError, match="traffic names unknown version"):
        load_catalog([tmp_path / "bad.yaml"])


@pytest.fixture
def store(private_redis: str) -> Iterator[CandidateStore]:
    yield CandidateStore(redis.Redis.from_url(private_redis), 60)


def test_a_candidate_state_is_stored_once_and_applied_to_a_fresh_program(store: CandidateStore) -> None:
    tuned = dspy.Predict(Answer)
    tuned.signature = tuned.signature.with_instructions("Answer tersely.")
    tuned.demos = [dspy.Example(question="Q?", key_terms=["q"], answer="A.", confidence=0.5)]
    state = {name: {**p.dump_state(), "lm": None} for name, p in tuned.named_parameters()}
    digest = store.put(state)
    assert digest == state_digest(state) and store.put(state) == digest
    fresh = CandidateStore(store.client, 60)  # another process: reads it from Redis
    program = apply_state(dspy.Predict(Answer), fresh.get(digest, "answer"), "answer")
    assert program.signature.instructions == "Answer tersely." and program.demos[0]["answer"] == "A."
    assert dspy.Predict(Answer).signature.instructions != "Answer tersely."  # nothing leaked into the class
    with pytest.raises(PermanentStageError, match="not found"):
        fresh.get("0" * 64, "answer")
    with pytest.raises(PermanentStageError, match="does not fit"):
        apply_state(dspy.ChainOfThought(Answer), state, "answer")


def test_the_journal_replays_finished_evaluations(tmp_path: Path) -> None:
    candidates = {"answer": StageCandidate(state="a" * 64)}
    key = evaluation_key("qa@1", {"question": "Q?"}, candidates)
    assert key != evaluation_key("qa@1", {"question": "Q?"}, {"answer": StageCandidate(state="b" * 64)})
    journal = Journal(tmp_path / "j.jsonl", resume=False)
    step = TraceStep(node="answer", stage="answer", predictor="self", inputs={"question": "Q?"},
                     outputs={"answer": "A"})
    journal.add(Evaluation(key=key, job_id="j1", answer={"answer": "A"}, traces=[step]))
    with (tmp_path / "j.jsonl").open("a") as out:
        out.write('{"key": "broken')  # a run stopped mid-write
    again = Journal(tmp_path / "j.jsonl", resume=True)
    replayed = again.get(key)
    assert replayed is not None and replayed.traces == [step] and len(again) == 1
    assert len(Journal(tmp_path / "j.jsonl", resume=False)) == 0  # without --resume it starts afresh


def test_the_monitor_counts_jobs_per_pipeline_version(private_redis: str) -> None:
    settings = MonitorSettings(broker_url=private_redis)
    store = Store.connect(settings)
    store.clear()
    consumer = Consumer(store, settings)
    for i in range(6):  # appended to the fleet stream as the ledger appends them
        event = JobFinished(job_id=f"job{i}", pipeline="qa", version="2" if i % 3 == 0 else "1", at=1000.0 + i,
                            state="succeeded", ending="succeeded", seconds=0.5)
        consumer.r.xadd(EVENTS_STREAM, {"type": event_name(event), "data": event.model_dump_json()})
    assert consumer.drain() == 6
    report = store.report(now=1010.0)
    assert [(f.name, f.runs) for f in report.pipelines] == [("qa", 6)]
    assert sorted((f.name, f.runs, f.succeeded) for f in report.pipeline_versions) == [("qa@1", 4, 4), ("qa@2", 2, 2)]
    store.clear()
