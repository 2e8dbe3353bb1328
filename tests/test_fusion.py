"""Stage fusion on real workers: adjacent fusible stages of a sequence run in one task.

The catalog (bench/pipelines/fusion.yaml) holds one three-stage chain twice: `fz_*` stages say
`fusible: true`, `uf_*` stages do not. Each stage's queue has its own worker, so where a stage
ran shows whether the chain hopped: fused, all three run on the first stage's worker.
"""

import json
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.catalog import load_catalog
from contracts.names import FUSED_TASK, ROUTING_QUEUE, stage_queue
from contracts.specs import StageNode
from routing.client import Client
from routing.compile import Compiler
from routing.nodes import KINDS
from tests.services import ROOT, Fleet, client_for, worker_env
from workers.fusion import mergeable, merged_program, merged_spec

CATALOG = [ROOT / "pipelines", ROOT / "bench" / "pipelines" / "fusion.yaml"]
DOCUMENT = "Barges carry coal from Basel to Rotterdam."


@pytest.fixture(scope="module")
def client(private_redis: str, lm_url: str) -> Iterator[Client]:
    fleet = Fleet(worker_env(private_redis, lm_url, catalog=CATALOG), Path(tempfile.mkdtemp(prefix="sc-fusion-")))
    for step in ("summary", "headline", "terms"):
        fleet.start(f"w-{step}", [stage_queue(f"{kind}_{step}") for kind in ("fz", "uf", "lm")])
    fleet.start("routing", [ROUTING_QUEUE])
    try:
        fleet.wait_ready()
        yield client_for(private_redis, lm_url, CATALOG)
    finally:
        fleet.stop()


def test_the_fused_chain_compiles_to_one_task_on_the_first_stage_queue(client: Client) -> None:
    compiler = Compiler(client.app, load_catalog(CATALOG), KINDS)
    canvas = compiler.node(load_catalog(CATALOG).pipeline("bench_fused3").root, "")
    tasks = canvas.tasks if hasattr(canvas, "tasks") else [canvas]
    assert [(t.task, t.options["queue"]) for t in tasks] == [(FUSED_TASK, "stage.fz_summary")]
    assert [s["path"] for s in tasks[0].kwargs["steps"]] == ["summary", "headline", "terms"]


def test_fused_and_unfused_give_the_same_outputs_and_per_stage_timings(client: Client) -> None:
    fused = client.submit("bench_fused3", {"document": DOCUMENT}).get(timeout=90)
    plain = client.submit("bench_unfused3", {"document": DOCUMENT}).get(timeout=90)
    assert fused.state == plain.state == "succeeded", (fused.error, plain.error)
    assert fused.answer == plain.answer
    assert fused.outputs == plain.outputs
    assert [t.node for t in fused.timings] == [t.node for t in plain.timings] == ["summary", "headline", "terms"]
    assert [t.identity for t in fused.timings] == ["fz_summary@1", "fz_headline@1", "fz_terms@1"]
    assert {k.removeprefix("fz_"): (u.calls, u.prompt_tokens) for k, u in fused.usage.items()} == {
        k.removeprefix("uf_"): (u.calls, u.prompt_tokens) for k, u in plain.usage.items()}


def test_fused_stages_run_on_one_worker_unfused_hop_between_workers(client: Client) -> None:
    fused = client.submit("bench_fused3", {"document": DOCUMENT + " again"}).get(timeout=90)
    plain = client.submit("bench_unfused3", {"document": DOCUMENT + " again"}).get(timeout=90)
    assert [t.worker.split("@")[0] for t in fused.timings] == ["w-summary"] * 3
    assert [t.worker.split("@")[0] for t in plain.timings] == ["w-summary", "w-headline", "w-terms"]


def test_a_retry_inside_the_fused_task_resumes_at_the_failing_stage(client: Client) -> None:
    """The LM fails the first call of every stage once; each stage still runs (and is timed) once."""
    result = client.submit("bench_fused3", {"document": "[[lm:fail_first=1]] Owls at dusk."}).get(timeout=120)
    assert result.state == "succeeded", result.error
    assert [t.node for t in result.timings] == ["summary", "headline", "terms"]
    assert [e.node for e in result.errors] == ["summary", "headline", "terms"]
    assert all(e.retryable and e.kind == "lm" for e in result.errors)


def test_a_stage_failure_inside_the_fused_task_fails_the_job_naming_the_stage(client: Client) -> None:
    result = client.submit("bench_fused3", {"document": "[[lm:status=400]] Owls at dusk."}).get(timeout=90)
    assert result.state == "failed"
    assert result.error is not None and result.error.node == "summary" and result.error.stage == "fz_summary"
    assert result.timings == []


def lm_requests(lm_url: str) -> int:
    with urllib.request.urlopen(lm_url.removesuffix("/v1") + "/stats", timeout=5) as response:
        return int(json.load(response)["counts"].get("requests", 0))


def test_lm_fusion_merges_two_stages_into_one_lm_call(client: Client, lm_url: str) -> None:
    before = lm_requests(lm_url)
    result = client.submit("bench_lmfused3", {"document": DOCUMENT + " merged"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert lm_requests(lm_url) - before == 2  # summary+headline in one call, then terms
    assert [(t.node, t.shared_call) for t in result.timings] == [("summary", None), ("headline", "summary"),
                                                                 ("terms", None)]
    assert set(result.outputs["summary"]) == {"summary"}
    assert set(result.outputs["headline"]) == {"headline", "tags"}  # both stages' fields kept, each its own
    assert result.answer["summary"] == f"summary of <{DOCUMENT} merged>"
    assert result.answer["headline"].startswith("headline of <")
    assert result.usage["lm_summary"].calls == 1 and result.usage["lm_headline"].calls == 0
    assert [t.worker.split("@")[0] for t in result.timings] == ["w-summary"] * 3


def test_the_merged_prompt_holds_both_steps_and_every_field(client: Client) -> None:
    catalog = load_catalog(CATALOG)
    a, b = catalog.stage("lm_summary"), catalog.stage("lm_headline")
    node_a, node_b = StageNode(stage="lm_summary"), StageNode(stage="lm_headline")
    assert mergeable(a, node_a, b, node_b)
    assert not mergeable(a, node_a, b, StageNode(stage="lm_headline", inputs={"summary": "document"}))
    program = merged_program(a, b, merged_spec(a, node_a, b, node_b))
    signature = program.signature  # type: ignore[attr-defined]
    assert list(signature.input_fields) == ["document"]
    assert list(signature.output_fields) == ["summary", "headline", "tags"]
    assert "Step 1: Summarize the document" in signature.instructions
    assert "Step 2: Write a short headline" in signature.instructions
