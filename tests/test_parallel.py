"""Parallel groups end to end on the session fleet (thread-pool workers, one per stage queue)."""

from routing.client import Client

SLOW = "[[lm:sleep=6000]]"


def test_members_run_on_their_own_queues_and_merge_fieldwise(client: Client) -> None:
    result = client.submit("par_fields", {"text_a": "alpha", "text_b": "beta", "text_c": "gamma"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer == {"finding_a": "finding of <alpha>", "finding_b": "finding of <beta>",
                             "finding_c": "finding of <gamma>"}
    assert set(result.outputs) == {"scan/a/par_probe", "scan/b/par_probe", "scan/c/par_probe", "scan"}
    summary = result.outputs["scan"]
    assert summary["succeeded"] == ["a", "b", "c"] and summary["failed"] == {}
    assert summary["fields"]["b"] == ["finding_b", "score_b"]
    assert sorted(t.node for t in result.timings) == ["scan/a/par_probe", "scan/b/par_probe", "scan/c/par_probe"]
    assert result.usage["par_probe"].calls == 3
    assert [d.choice for d in result.trail] == ["merged"]


def test_one_failing_member_is_recorded_and_the_rest_merged(client: Client) -> None:
    inputs = {"text_a": "alpha", "text_b": "beta [[lm:status=400]]", "text_c": "gamma"}
    result = client.submit("par_fields", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["finding_a"] == "finding of <alpha>"
    assert result.answer["finding_c"] == "finding of <gamma>"
    assert result.answer["finding_b"] is None
    assert [e.node for e in result.errors] == ["scan/b/par_probe"]
    assert result.errors[0].stage == "par_probe"
    assert "400" in result.errors[0].message
    assert list(result.outputs["scan"]["failed"]) == ["b"]


def test_a_member_past_its_timeout_is_cut_off_by_the_lm_timeout(client: Client) -> None:
    """Thread-pool workers: member_timeout (2 s) is the LM HTTP timeout; the LM would take 6 s."""
    inputs = {"text_a": "alpha", "text_b": "beta", "text_c": f"gamma {SLOW}"}
    result = client.submit("par_fields", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["finding_a"] == "finding of <alpha>"
    assert result.answer["finding_c"] is None
    (error,) = result.errors
    assert error.node == "scan/c/par_probe"
    assert "Timeout" in error.message


def test_every_member_failing_fails_the_job_naming_each_error(client: Client) -> None:
    inputs = {"text_a": "a [[lm:status=400]]", "text_b": "b [[lm:status=422]]", "text_c": "c [[lm:status=401]]"}
    result = client.submit("par_fields", inputs).get(timeout=60)
    assert result.state == "failed"
    assert result.error is not None
    assert result.error.kind == "pipeline" and result.error.error_type == "PipelineError"
    assert result.error.node == "scan"
    assert result.error.message.startswith("all 3 members of parallel 'scan' failed: a: ")
    for name, status in (("a", "400"), ("b", "422"), ("c", "401")):
        assert f"{name}: stage 'par_probe'" in result.error.message
        assert status in result.error.message
    assert sorted(e.node for e in result.errors) == ["scan", "scan/a/par_probe", "scan/b/par_probe", "scan/c/par_probe"]


def test_concat_merge_inside_a_sequence_feeds_the_next_stage(client: Client) -> None:
    result = client.submit("par_concat", {"text_a": "red", "text_b": "blue"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["finding"] == "finding of <red> | finding of <blue>"
    assert result.answer["summary"] == "summary of <finding of <red> | finding of <blue>>"
    assert [t.node for t in result.timings][-1] == "summarize"


def test_custom_merger_by_import_path(client: Client) -> None:
    inputs = {"text_a": "dull [[lm:set:score=0.1]]", "text_b": "vivid [[lm:set:score=0.9]]"}
    result = client.submit("par_custom", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    findings = result.answer["findings"]
    assert [f.split(" ")[2] for f in findings] == ["<vivid", "<dull"]
    assert result.outputs["ranked"]["conflicts"] == {"finding": ["low", "high"], "score": ["low", "high"]}


def test_sequence_member_and_nested_parallel(client: Client) -> None:
    result = client.submit("par_nested", {"question": "Why do rivers meander?", "text_a": "oxbow"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "answer of <Why do rivers meander?>"
    assert result.answer["finding"] == "finding of <oxbow>"
    assert len(result.answer["key_terms"]) >= 1
    nested = "outer/inner/parallel"  # a member's node is named by its id, else its kind
    assert set(result.outputs) == {"outer/qa/key_terms", "outer/qa/answer", f"{nested}/probe/par_probe", nested,
                                   "outer"}
    assert [d.node for d in result.trail] == [nested, "outer"]


def test_runtime_member_replaces_itself_inside_the_chord(client: Client) -> None:
    result = client.submit("par_branch", {"document": "Quiet harbour.", "mode": "Long"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["summary"] == "summary of <Quiet harbour.>"
    assert result.answer["entities"][0] == "entities 1 of <Quiet harbour.>"
    assert result.answer["tone"] is None
    assert [(d.node, d.kind) for d in result.trail] == [("mixed/pick/branch", "branch"), ("mixed", "parallel")]
