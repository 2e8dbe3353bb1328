"""A map member whose task RAISES (killed at the hard time limit in a prefork worker).

That fails the chord: the Redis backend calls the gather body's errback instead of the body, and
`pipeline.map.rescue` must send the gather anyway with the rest of the job, so the item counts as
failed (dropped or failing the job per `on_error`) and nothing hangs, also when the map is itself
a member of an outer map's chord. Own Redis server, test LM and workers: the session fleet's
routing worker does not know these pipelines.
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
  - name: map_stall
    module: examples.patterns:Stall
    inputs: {text: str}
    outputs: {echo: str}
    retry: {max_retries: 0}
pipelines:
  - name: map_hard_drop
    inputs: {texts: "list[str]", question: str}
    outputs: [echoes, answer]
    root:
      - {kind: map, id: hops, over: texts, item: text, node: map_stall, collect: {echo: echoes},
         item_timeout: 1, on_error: drop}
      - short_answer
  - name: map_hard_fail
    inputs: {texts: "list[str]", question: str}
    outputs: [echoes, answer]
    root:
      - {kind: map, id: hops, over: texts, item: text, node: map_stall, collect: {echo: echoes}, item_timeout: 1}
      - short_answer
  - name: map_hard_nested
    inputs: {groups: "list[list[str]]"}
    outputs: [echo_groups]
    root:
      kind: map
      id: outer
      over: groups
      item: group
      collect: {echoes: echo_groups}
      node: {kind: map, id: inner, over: group, item: text, node: map_stall, collect: {echo: echoes},
             item_timeout: 1, on_error: drop}
"""




@pytest.fixture(scope="module")
def prefork_client(private_redis: str) -> Iterator[Client]:
    specs = Path(tempfile.mkdtemp(prefix="stagecoach-map-prefork-")) / "map_prefork.yaml"
    specs.write_text(SPECS)
    catalog = [*default_catalog(), specs]
    with services.test_lm() as lm_url:
        fleet = Fleet(worker_env(private_redis, lm_url, catalog), specs.parent)
        fleet.start("prefork-map_stall", [stage_queue("map_stall")], pool="prefork", concurrency=3)
        fleet.start("threads-short_answer", [stage_queue("short_answer")])
        fleet.start("routing", [ROUTING_QUEUE], concurrency=8)
        try:
            fleet.wait_ready()
            yield client_for(private_redis, lm_url, catalog)
        finally:
            fleet.stop()


TEXTS = ["tide", "[[stall]] moon", "orbit"]


def test_killed_item_is_dropped_and_the_rest_of_the_job_runs(prefork_client: Client) -> None:
    result = prefork_client.submit("map_hard_drop", {"texts": TEXTS, "question": "Why?"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["echoes"] == ["echo of <tide>", "echo of <orbit>"]
    assert result.answer["answer"] == "answer of <Why?>"  # the rest of the job ran after the rescue
    (error,) = result.errors
    assert (error.node, error.kind, error.error_type) == ("hops[1]", "timeout", "TimeLimitExceeded")
    dropped = [d.detail for d in result.trail if d.choice == "drop"]
    assert [(d["index"], d["item"]) for d in dropped] == [(1, "[[stall]] moon")]
    assert result.outputs["hops"] == {"items": 3, "kept": 2, "dropped": 1}
    assert [t.node for t in result.timings] == ["hops[0]/map_stall", "hops[2]/map_stall", "short_answer"]


def test_killed_item_fails_the_job_by_default(prefork_client: Client) -> None:
    result = prefork_client.submit("map_hard_fail", {"texts": TEXTS, "question": "Why?"}).get(timeout=90)
    assert result.state == "failed"
    assert result.error is not None
    assert (result.error.node, result.error.kind) == ("hops[1]", "timeout")
    assert "short_answer" not in [t.stage for t in result.timings]


def test_rescued_inner_map_still_completes_the_outer_chord(prefork_client: Client) -> None:
    groups = [["salt", "[[stall]] wind"], ["rock"]]
    result = prefork_client.submit("map_hard_nested", {"groups": groups}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["echo_groups"] == [["echo of <salt>"], ["echo of <rock>"]]
    assert [e.node for e in result.errors] == ["outer[0]/inner[1]"]
