"""Member time limits in prefork workers, where Celery enforces them, on a fleet of our own.

The soft limit raises inside the stage, which records a timeout as a value. A stage that ignores
it (like a call stuck in native code) is killed at the hard limit: its task FAILS, which fails
the chord, and the fan-in's errback must still merge the other members and finish the job.

This module runs its own Redis server, test LM and workers, so the session fleet's thread-pool
workers cannot take these tasks.
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client
from tests import services
from tests.services import Fleet, client_for, default_catalog, worker_env

SPECS = """
stages:
  - name: par_nap
    module: examples.ensemble:Sleeper
    options: {seconds: 8}
    inputs: {text: str}
    outputs: {finding: str, score: float}
  - name: par_stuck
    module: examples.ensemble:Sleeper
    options: {seconds: 8, stubborn: true}
    inputs: {text: str}
    outputs: {finding: str, score: float}
pipelines:
  - name: par_soft
    inputs: {text: str}
    outputs: [finding]
    root:
      kind: parallel
      id: race
      member_timeout: 3
      members:
        fast: par_probe
        nap: {stage: par_nap, outputs: {finding: nap_finding}}
  - name: par_hard
    inputs: {text: str}
    outputs: [finding, summary]
    root:
      - kind: parallel
        id: race
        member_timeout: 3
        members:
          fast: par_probe
          stuck: {stage: par_stuck, outputs: {finding: stuck_finding}}
      - {stage: summarize, inputs: {document: finding}}
  - name: par_hard_all
    inputs: {text: str}
    outputs: [finding]
    root:
      kind: parallel
      id: race
      member_timeout: 3
      members:
        one: par_stuck
        two: par_stuck
  - name: par_hard_nested
    inputs: {text: str}
    outputs: [finding, other]
    root:
      kind: parallel
      id: outer
      members:
        probe: {stage: par_probe, outputs: {finding: other}}
        inner:
          kind: parallel
          member_timeout: 3
          members:
            fast: par_probe
            stuck: {stage: par_stuck, outputs: {finding: stuck_finding}}
  - name: nap_only
    inputs: {text: str}
    root: {stage: par_nap, outputs: {finding: nap_finding}}
  - name: par_soft_deep
    inputs: {text: str}
    outputs: [finding]
    root:
      kind: parallel
      id: race
      member_timeout: 3
      members:
        fast: par_probe
        sub: {kind: subpipeline, pipeline: nap_only}
        looped: {kind: loop, max_iterations: 1, body: {stage: par_nap, outputs: {finding: loop_finding}}}
  - name: ens_hard
    inputs: {text: str}
    outputs: [finding, score, ensemble]
    root:
      kind: ensemble
      id: judge
      aggregator: best_confidence
      answer_field: finding
      confidence_field: score
      member_timeout: 3
      members:
        - {id: quick, stage: par_probe}
        - {id: slow, kind: sequence, steps: [par_probe, par_stuck]}
"""






@pytest.fixture(scope="module")
def prefork_client(private_redis: str) -> Iterator[Client]:
    specs = Path(tempfile.mkdtemp(prefix="stagecoach-prefork-")) / "par_prefork.yaml"
    specs.write_text(SPECS)
    catalog = [*default_catalog(), specs]
    with services.test_lm() as lm_url:
        fleet = Fleet(worker_env(private_redis, lm_url, catalog), specs.parent)
        for stage in ("par_probe", "par_nap", "par_stuck"):
            fleet.start(f"prefork-{stage}", [stage_queue(stage)], pool="prefork", concurrency=2)
        fleet.start("threads-summarize", [stage_queue("summarize")])
        fleet.start("routing", [ROUTING_QUEUE], concurrency=8)
        try:
            fleet.wait_ready()
            yield client_for(private_redis, lm_url, catalog)
        finally:
            fleet.stop()


def test_soft_limit_is_recorded_as_a_timeout_and_the_rest_merged(prefork_client: Client) -> None:
    result = prefork_client.submit("par_soft", {"text": "tide"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["finding"] == "finding of <tide>"
    (error,) = result.errors
    assert (error.node, error.kind, error.error_type) == ("race/nap/par_nap", "timeout", "StageTimeoutError")
    assert "nap_finding" not in result.fields


def test_member_timeout_reaches_stages_of_named_subpipelines_and_runtime_nodes(prefork_client: Client) -> None:
    """A loop member's stage is compiled only when the loop runs, a named sub-pipeline's in another
    spec: the member's time bound still reaches both."""
    result = prefork_client.submit("par_soft_deep", {"text": "surge"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["finding"] == "finding of <surge>"
    timeouts = sorted((e.node, e.kind, e.error_type) for e in result.errors)
    assert timeouts == [("race/looped/loop[1]/par_nap", "timeout", "StageTimeoutError"),
                        ("race/sub/nap_only/par_nap", "timeout", "StageTimeoutError")]


def test_hard_limit_kill_fails_the_header_task_yet_the_job_finishes(prefork_client: Client) -> None:
    result = prefork_client.submit("par_hard", {"text": "ebb"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["finding"] == "finding of <ebb>"
    assert result.answer["summary"] == "summary of <finding of <ebb>>"  # the rest of the job ran
    (error,) = result.errors
    assert error.node == "race/stuck" and error.kind == "timeout"
    assert error.error_type == "TimeLimitExceeded"
    assert result.outputs["race"]["failed"] == {"stuck": error.message}
    assert [t.node for t in result.timings] == ["race/fast/par_probe", "summarize"]


def test_every_member_killed_fails_the_job_with_each_error(prefork_client: Client) -> None:
    result = prefork_client.submit("par_hard_all", {"text": "neap"}).get(timeout=90)
    assert result.state == "failed"
    assert result.error is not None and result.error.error_type == "PipelineError"
    assert result.error.message.startswith("all 2 members of parallel 'race' failed: one: ")
    assert "two: " in result.error.message
    assert sorted(e.node for e in result.errors) == ["race", "race/one", "race/two"]


def test_hard_kill_inside_a_sequence_member_of_an_ensemble(prefork_client: Client) -> None:
    result = prefork_client.submit("ens_hard", {"text": "swell"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["finding"] == "finding of <swell>"
    members = {m["member"]: m for m in result.answer["ensemble"]["members"]}
    assert members["quick"]["ok"] is True
    assert members["slow"]["ok"] is False and "TimeLimitExceeded" in members["slow"]["error"]
    # the killed member's envelope died with it: what its first stage did is not merged (documented)
    assert set(result.outputs) == {"judge/quick", "judge"}


def test_hard_kill_in_a_parallel_nested_in_a_chord_header(prefork_client: Client) -> None:
    """The rescued inner body must still count as its part of the outer chord."""
    result = prefork_client.submit("par_hard_nested", {"text": "rip"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer == {"finding": "finding of <rip>", "other": "finding of <rip>"}
    assert [e.node for e in result.errors] == ["outer/inner/parallel/stuck"]
    assert [d.node for d in result.trail] == ["outer/inner/parallel", "outer"]
