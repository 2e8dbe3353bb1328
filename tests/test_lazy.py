"""Lazy evaluation on real workers: stages nobody needs are skipped (and say so in the trail), a
caller may ask for only some outputs, and `handle.output(field)` returns a field while the job
still runs when the pipeline can deliver it early.
"""

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from contracts.catalog import load_catalog
from contracts.errors import ContractError
from contracts.names import ROUTING_QUEUE, RUN_TASK, stage_queue
from routing.client import Client
from routing.errors import PipelineError
from routing.lazy import plan
from tests.services import ROOT, Fleet, client_for, worker_env

CATALOG = """
stages:
  - {name: lz_summary, module: "examples.basic:Summarize", inputs: {document: str}, outputs: {summary: str}}
  - {name: lz_enrich, module: "examples.basic:Headline", inputs: {summary: str},
     outputs: {headline: str, tags: "list[str]"}}
  - {name: lz_terms, module: "examples.basic:KeyTerms", inputs: {question: str}, outputs: {key_terms: "list[str]"}}
pipelines:
  - name: lazy_enrich
    description: an optional enrichment stage whose outputs nothing reads
    inputs: {document: str}
    outputs: [summary, key_terms]
    root:
      - lz_summary
      - lz_enrich
      - {stage: lz_terms, inputs: {question: summary}}
  - name: lazy_pick
    inputs: {document: str, topic: str}
    outputs: [summary, headline, key_terms]
    root:
      - lz_summary
      - lz_enrich
      - {stage: lz_terms, inputs: {question: topic}}
  - name: lazy_off
    inputs: {document: str}
    outputs: [summary]
    lazy: false
    root: [lz_summary, lz_enrich]
"""
STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
INPUTS = {"document": "Barges drift past the mill.", "topic": "canal locks"}


@pytest.fixture(scope="module")
def catalog_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("lazy")
    (folder / "lazy.yaml").write_text(CATALOG)
    return [ROOT / "pipelines", folder / "lazy.yaml"]


@pytest.fixture(scope="module")
def client(private_redis: str, lm_url: str, catalog_paths: list[Path]) -> Iterator[Client]:
    fleet = Fleet(worker_env(private_redis, lm_url, catalog=catalog_paths), Path(tempfile.mkdtemp(prefix="sc-lazy-")))
    queues = [stage_queue(s) for s in ("lz_summary", "lz_enrich", "lz_terms")]
    fleet.start("lazy", [*queues, ROUTING_QUEUE], concurrency=4)
    try:
        fleet.wait_ready()
        yield client_for(private_redis, lm_url, catalog_paths)
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def app(client: Client) -> Celery:
    return client.app


def test_a_stage_nothing_reads_is_skipped_and_recorded_in_the_trail(client: Client) -> None:
    result = client.submit("lazy_enrich", {"document": INPUTS["document"]}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert [t.node for t in result.timings] == ["lz_summary", "lz_terms"]
    assert result.skipped == ["lz_enrich"]
    (decision,) = result.trail
    assert (decision.node, decision.kind, decision.choice) == ("lz_enrich", "lazy", "skipped")
    assert decision.detail["outputs"] == ["headline", "tags"]
    assert set(result.answer) == {"summary", "key_terms"} and "headline" not in result.fields


def test_a_pipeline_may_turn_laziness_off(client: Client) -> None:
    result = client.submit("lazy_off", {"document": INPUTS["document"]}).get(timeout=90)
    assert [t.node for t in result.timings] == ["lz_summary", "lz_enrich"] and result.skipped == []


def test_asking_for_some_outputs_skips_the_stages_that_feed_only_others(client: Client) -> None:
    terms = client.submit("lazy_pick", INPUTS, outputs=["key_terms"]).get(timeout=90)
    assert terms.state == "succeeded", terms.error
    assert [t.node for t in terms.timings] == ["lz_terms"]
    assert terms.skipped == ["lz_summary", "lz_enrich"]
    assert list(terms.answer) == ["key_terms"]
    headline = client.submit("lazy_pick", INPUTS, outputs=["headline"]).get(timeout=90)
    assert [t.node for t in headline.timings] == ["lz_summary", "lz_enrich"]
    assert headline.skipped == ["lz_terms"] and list(headline.answer) == ["headline"]
    everything = client.submit("lazy_pick", INPUTS).get(timeout=90)
    assert len(everything.timings) == 3 and everything.skipped == []


def test_plain_json_request_may_name_its_outputs(app: Celery) -> None:
    request = {"pipeline": "lazy_pick", "inputs": INPUTS, "outputs": ["summary"]}
    result = app.send_task(RUN_TASK, args=[request], queue=ROUTING_QUEUE).get(timeout=90)
    assert result["state"] == "succeeded"
    assert result["answer"] == {"summary": "summary of <Barges drift past the mill.>"}
    assert [t["node"] for t in result["timings"]] == ["lz_summary"]


def test_asking_for_an_undeclared_output_is_a_clear_error(client: Client, app: Celery) -> None:
    with pytest.raises(ContractError, match="field 'outputs': 'answer' is not an output of pipeline 'lazy_pick'; "
                                            "outputs: summary, headline, key_terms"):
        client.submit("lazy_pick", INPUTS, outputs=["answer"])
    request = {"pipeline": "lazy_pick", "inputs": INPUTS, "outputs": ["answer"]}
    result = app.send_task(RUN_TASK, args=[request], queue=ROUTING_QUEUE).get(timeout=90)
    assert result["state"] == "failed" and result["error"]["fields"] == ["outputs"]


def test_output_delivers_a_field_while_the_job_still_runs(client: Client) -> None:
    """lz_terms sleeps 5 s in the test LM; the summary is final once lz_summary wrote it."""
    handle = client.submit("lazy_pick", {**INPUTS, "topic": "locks [[lm:sleep=5000]]"})
    summary = handle.output("summary", timeout=60)
    assert not handle.ready()  # the job was still in its slow last stage
    assert summary == "summary of <Barges drift past the mill.>"
    result = handle.get(timeout=90)
    assert result.answer["summary"] == summary
    assert handle.output("key_terms", timeout=5) == result.answer["key_terms"]


def test_output_of_a_failed_job_raises(client: Client) -> None:
    handle = client.submit("lazy_pick", {**INPUTS, "document": "[[lm:status=400]]"}, outputs=["summary"])
    with pytest.raises(PipelineError, match="lz_summary"):
        handle.output("summary", timeout=60)


def test_only_fields_final_when_written_are_published(catalog_paths: list[Path]) -> None:
    catalog = load_catalog(catalog_paths)
    spec = catalog.pipeline("lazy_pick")
    assert plan(catalog, spec, ["summary", "headline", "key_terms"]).publish == ["summary", "headline", "key_terms"]
    full = load_catalog([ROOT / "pipelines", ROOT / "tests" / "pipelines"])
    looped = full.pipeline("t_loop_max")
    # `draft` is written before the loop and again inside it: not final when first written
    assert "draft" not in plan(full, looped.model_copy(update={"lazy": True}), list(looped.outputs)).publish


def test_submit_command_asks_for_some_outputs(private_redis: str, lm_url: str, catalog_paths: list[Path],
                                              client: Client) -> None:
    env = worker_env(private_redis, lm_url, catalog=catalog_paths)
    cmd = [STAGECOACH, "submit", "lazy_pick", "-i", "document=Owls.", "-i", "topic=night", "-o", "key_terms",
           "--wait"]
    shown = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "skipped" in shown.stdout and "lz_summary, lz_enrich" in shown.stdout
    assert "key_terms" in shown.stdout and "headline" not in shown.stdout
