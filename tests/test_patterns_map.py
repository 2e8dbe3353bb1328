"""Map fan-out on real workers: one `define` task per item, gathered in input order."""

import uuid

from routing.client import Client

TERMS = ["tide", "moon", "gravity", "orbit", "ocean"]


def test_map_defines_every_item_in_input_order(client: Client) -> None:
    result = client.submit("t_map_terms", {"terms": TERMS}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["definitions"] == [f"definition of <{t}>" for t in TERMS]
    assert result.fields["terms_seen"] == TERMS
    assert "term" not in result.fields  # the item binding stays inside the members
    assert [t.node for t in result.timings] == [f"hops[{i}]/define" for i in range(len(TERMS))]
    assert {t.worker.split("@")[0] for t in result.timings} == {"stage-define"}
    assert result.outputs["hops[3]/define"] == {"definition": "definition of <orbit>"}
    assert result.outputs["hops"] == {"items": 5, "kept": 5, "dropped": 0}
    assert [(d.kind, d.choice) for d in result.trail] == [("map", "fan_out"), ("map", "gathered")]
    assert result.usage["define"].calls == len(TERMS)


def test_map_over_empty_list_starts_no_task(client: Client) -> None:
    result = client.submit("t_map_terms", {"terms": []}).get(timeout=30)
    assert result.state == "succeeded", result.error
    assert result.answer["definitions"] == []
    assert result.fields["terms_seen"] == []
    assert result.timings == []


def test_map_item_failure_fails_the_job_by_default(client: Client) -> None:
    terms = ["tide", "moon [[lm:status=400]]", "orbit"]
    result = client.submit("t_map_terms", {"terms": terms}).get(timeout=60)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.node == "hops[1]/define"
    assert result.error.stage == "define"
    assert "definitions" not in result.fields


def test_map_drop_policy_records_the_dropped_item(client: Client) -> None:
    terms = ["tide", "moon [[lm:status=400]]", "orbit"]
    result = client.submit("t_map_drop", {"terms": terms}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["definitions"] == ["definition of <tide>", "definition of <orbit>"]
    dropped = [d for d in result.trail if d.choice == "drop"]
    assert len(dropped) == 1
    assert dropped[0].detail["index"] == 1
    assert dropped[0].detail["item"] == terms[1]
    assert dropped[0].detail["node"] == "hops[1]/define"
    assert [e.node for e in result.errors] == ["hops[1]/define"]
    assert result.outputs["hops"] == {"items": 3, "kept": 2, "dropped": 1}


def test_map_over_a_field_that_is_not_a_list_fails_clearly(client: Client) -> None:
    result = client.submit("t_map_not_list", {"terms": "tide"}).get(timeout=30)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.kind == "routing"
    assert "'terms' must be a list, got str" in result.error.message
    assert result.timings == []  # the stage after the map was passed through, not run


def test_map_truncates_to_max_fanout_when_asked(client: Client) -> None:
    result = client.submit("t_map_overflow", {"terms": TERMS}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.fields["definitions"] == ["definition of <tide>", "definition of <moon>"]


def test_chain_remainder_runs_after_the_map_replaces_itself(client: Client) -> None:
    result = client.submit("t_map_then", {"terms": TERMS[:3], "question": "Why tides?"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["definitions"] == [f"definition of <{t}>" for t in TERMS[:3]]
    assert result.answer["key_terms"][0].startswith("key_terms 1 of <Why tides?")
    assert [t.stage for t in result.timings][-1] == "key_terms"


def test_map_example_pipeline_by_name(client: Client) -> None:
    question = "How do tides depend on the moon?"
    result = client.submit("patterns_map", {"question": question}).get(timeout=60)
    assert result.state == "succeeded", result.error
    terms = result.answer["key_terms"]
    assert len(terms) == 2
    assert result.answer["definitions"] == [f"definition of <{t}>" for t in terms]


def test_a_retried_item_still_gathers_in_order(client: Client) -> None:
    """A transient LM error inside a chord member: the stage task retries, the chord still completes.

    The test LM counts attempts per prompt for its whole life: a prompt of this run's own keeps the
    count from being shared with any other test (or a rerun)."""
    terms = ["tide", f"moon {uuid.uuid4().hex[:8]} [[lm:fail_first=1]]", "orbit"]
    result = client.submit("t_map_terms", {"terms": terms}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["definitions"] == [f"definition of <{t}>" for t in terms]
    retried = [t for t in result.timings if t.node == "hops[1]/define"]
    assert [t.attempts for t in retried] == [2]
    assert [(e.node, e.kind, e.retryable) for e in result.errors] == [("hops[1]/define", "lm", True)]
