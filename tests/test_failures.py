"""The ways a stage fails, end to end on real workers: each ends the job with a clear, named error
(or, for a non-critical stage, a logged one), and the workers go on serving."""

from routing.client import Client


def test_a_non_critical_stage_fails_and_the_job_goes_on(client: Client) -> None:
    result = client.submit("t_fail_noncritical", {"note": "n [[lm:status=400]]", "document": "Tides turn."}).get(60)
    assert result.state == "succeeded", result.error
    assert result.answer == {"summary": "summary of <Tides turn.>"}
    (error,) = result.errors
    assert (error.node, error.stage, error.kind, error.retryable) == ("headline", "headline", "stage", False)
    assert result.error is None and [t.node for t in result.timings] == ["summarize"]


def test_retries_running_out_fail_the_job_with_every_attempt_logged(client: Client) -> None:
    result = client.submit("t_fail_retries", {"document": "Storm [[lm:fail]]"}).get(60)
    assert result.state == "failed"
    assert [(e.node, e.kind, e.retryable, e.attempts) for e in result.errors] == [
        ("f_flaky", "lm", True, 1), ("f_flaky", "lm", True, 2), ("f_flaky", "lm", True, 3)]
    assert result.error == result.errors[-1]
    assert "503" in result.error.message


def test_a_stage_whose_module_cannot_be_imported(client: Client) -> None:
    result = client.submit("t_fail_import", {"document": "Shoals."}).get(60)
    assert result.state == "failed"
    assert result.error is not None and result.error.error_type == "ModuleLoadError"
    assert "cannot import examples.no_such_module:Missing" in result.error.message
    assert result.timings == []  # the job stopped there: summarize never ran


def test_an_output_that_breaks_its_contract_names_the_field(client: Client) -> None:
    result = client.submit("t_fail_contract", {"document": "Reefs."}).get(60)
    assert result.state == "failed"
    assert result.error is not None
    assert (result.error.node, result.error.kind, result.error.fields) == ("f_bad_contract", "contract", ["summary"])
    assert "stage 'f_bad_contract' outputs" in result.error.message


def test_a_reply_that_is_not_json_fails_the_stage_clearly(client: Client) -> None:
    result = client.submit("t_fail_garbage", {"document": "Currents [[lm:garbage]]"}).get(60)
    assert result.state == "failed"
    assert result.error is not None and result.error.node == "summarize"
    assert result.error.kind == "stage" and not result.error.retryable
    assert "stage 'summarize'" in result.error.message


def test_workers_go_on_serving_after_every_failure(client: Client) -> None:
    for name in ("t_fail_retries", "t_fail_import", "t_fail_contract", "t_fail_garbage"):
        client.submit(name, {"document": "boom [[lm:fail]] [[lm:garbage]]"})
    result = client.submit("t_fail_garbage", {"document": "Calm water."}).get(60)
    assert result.state == "succeeded", result.error
    assert result.answer["headline"] == "headline of <summary of <Calm water.>>"
