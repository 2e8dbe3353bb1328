"""Bad input: a clear error naming the pipeline, field and problem, at submit time in the Python
client and in the job result when raw JSON reaches `pipeline.run`; workers keep serving."""

from typing import Any

import pytest
from celery import Celery

from contracts.errors import ContractError, UnknownPipelineError
from contracts.names import ROUTING_QUEUE, RUN_TASK
from routing.client import Client
from tests.services import Fleet


def send_raw(app: Celery, request: Any) -> dict[str, Any]:
    """What a service that does not validate client-side sends: plain JSON, by task name."""
    result: dict[str, Any] = app.send_task(RUN_TASK, args=[request], queue=ROUTING_QUEUE).get(timeout=60)
    return result


def test_client_rejects_unknown_pipeline_before_enqueueing(client: Client) -> None:
    with pytest.raises(UnknownPipelineError) as caught:
        client.submit("no_such_pipeline", {"question": "x"})
    assert "unknown pipeline 'no_such_pipeline'" in str(caught.value)
    assert "qa" in caught.value.known


@pytest.mark.parametrize(
    ("inputs", "field", "problem"),
    [
        ({}, "question", "missing required field"),
        ({"question": ["not", "a", "string"]}, "question", "valid string"),
        ({"question": "ok", "colour": "blue"}, "colour", "unexpected field"),
    ],
)
def test_client_names_the_bad_field(client: Client, inputs: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(ContractError) as caught:
        client.submit("qa", inputs)
    assert [p.field for p in caught.value.problems] == [field]
    assert problem in str(caught.value)
    assert "pipeline 'qa' inputs" in str(caught.value)


@pytest.mark.parametrize(
    ("request_body", "fields", "message"),
    [
        ({"pipeline": "no_such_pipeline", "inputs": {}}, [], "unknown pipeline 'no_such_pipeline'"),
        ({"pipeline": "qa", "inputs": {}}, ["question"], "field 'question': missing required field"),
        ({"pipeline": "qa", "inputs": {"question": 42}}, ["question"], "field 'question': input should be a valid"),
        ({"pipeline": "qa", "inputs": {"question": "q", "x": 1}}, ["x"], "field 'x': unexpected field"),
        ({"inputs": {"question": "q"}}, ["pipeline"], "pipeline.run request: field 'pipeline': missing"),
        ("just a string", ["<input>"], "pipeline.run request"),
    ],
)
def test_raw_request_fails_with_a_result_naming_the_problem(
    app: Celery, fleet: Fleet, request_body: Any, fields: list[str], message: str
) -> None:
    result = send_raw(app, request_body)
    assert result["state"] == "failed"
    assert result["error"]["kind"] == "contract"
    assert result["error"]["fields"] == fields
    assert message in result["error"]["message"]


def test_bad_job_between_good_ones_leaves_them_untouched(app: Celery, client: Client, fleet: Fleet) -> None:
    first = client.submit("qa", {"question": "First good question?"})
    bad = app.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": {"question": {"nested": True}}}],
                        queue=ROUTING_QUEUE)
    second = client.submit("qa", {"question": "Second good question?"})
    assert bad.get(timeout=60)["state"] == "failed"
    assert first.get(timeout=60).answer["answer"] == "answer of <First good question?>"
    assert second.get(timeout=60).answer["answer"] == "answer of <Second good question?>"
    assert all(worker.proc.poll() is None for worker in fleet.workers)
    assert client.status(bad.id).state == "failed"
