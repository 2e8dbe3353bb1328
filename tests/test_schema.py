"""`stagecoach schema PIPELINE`: JSON Schemas that real requests and real results of a running fleet
satisfy (checked with the `jsonschema` package, as a service in another language would), and that a bad
request fails."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from jsonschema import Draft202012Validator

from cli.fleet import stop_process
from contracts.catalog import Catalog, load_catalog
from contracts.names import ROUTING_QUEUE, RUN_TASK
from contracts.schema import pipeline_schemas
from tests.services import ROOT, Fleet, free_port, http_ok, wait_until, worker_env

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
CATALOG = load_catalog([ROOT / "pipelines"])
WITH_EXAMPLES = sorted(name for name, spec in CATALOG.pipelines.items() if spec.example)


@pytest.fixture(scope="module")
def cli_schemas(redis_url: str, lm_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each pipeline's schemas as `stagecoach schema` prints them."""
    env = worker_env(redis_url, lm_url, catalog=[ROOT / "pipelines"])
    found = {}
    for name in sorted(CATALOG.pipelines):
        done = subprocess.run([STAGECOACH, "schema", name], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path_factory.mktemp("schema"))
        assert done.returncode == 0, done.stderr
        found[name] = json.loads(done.stdout)
    return found


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def run_raw(app: Celery, request: dict[str, Any]) -> dict[str, Any]:
    """What another service does: `pipeline.run` by name with plain JSON, the result as plain JSON."""
    result: dict[str, Any] = app.send_task(RUN_TASK, args=[request], queue=ROUTING_QUEUE).get(timeout=180)
    return result


def test_cli_prints_the_schemas_of_the_contracts(cli_schemas: dict[str, Any]) -> None:
    for name, document in cli_schemas.items():
        assert document == json.loads(json.dumps(pipeline_schemas(CATALOG, name)))
        assert document["request"]["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_input_and_output_field_types_are_in_the_schemas(cli_schemas: dict[str, Any]) -> None:
    request = cli_schemas["patterns_map"]["request"]
    inputs = request["$defs"][request["properties"]["inputs"]["$ref"].rsplit("/", 1)[1]]
    assert inputs["properties"]["question"]["type"] == "string"
    result = cli_schemas["multihop"]["result"]
    answer = result["$defs"]["MultihopAnswer"]["properties"]
    assert answer["sub_questions"] == {"items": {"type": "string"}, "title": "Sub Questions", "type": "array",
                                       "default": None}
    assert answer["final_answer"]["type"] == "string"
    tone = cli_schemas["parallel_analysis"]["result"]["$defs"]["ParallelAnalysisAnswer"]["properties"]["tone"]
    assert tone["enum"] == ["positive", "neutral", "negative"]
    confidence = cli_schemas["ensemble_qa"]["result"]["$defs"]["EnsembleQaAnswer"]["properties"]["confidence"]
    assert confidence["type"] == "number"


@pytest.mark.parametrize("pipeline", WITH_EXAMPLES)
def test_real_requests_and_results_satisfy_the_schemas(pipeline: str, cli_schemas: dict[str, Any], app: Celery,
                                                       fleet: Fleet, catalog: Catalog) -> None:
    request = {"pipeline": pipeline, "inputs": catalog.pipeline(pipeline).example}
    schemas = cli_schemas[pipeline]
    assert not list(validator(schemas["request"]).iter_errors(request))
    result = run_raw(app, request)
    assert result["state"] == "succeeded", result.get("error")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(schemas["result"]).iter_errors(result)]
    assert not errors, errors
    assert set(result["answer"]) == set(catalog.pipeline(pipeline).outputs)


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        ({"pipeline": "qa", "inputs": {}}, "'question' is a required property"),
        ({"pipeline": "qa", "inputs": {"question": 42}}, "42 is not of type 'string'"),
        ({"pipeline": "qa", "inputs": {"question": "q", "colour": "red"}}, "('colour' was unexpected)"),
        ({"pipeline": "digest", "inputs": {"question": "q"}}, "'qa' was expected"),
        ({"inputs": {"question": "q"}}, "'pipeline' is a required property"),
    ],
)
def test_a_bad_request_fails_validation(request_: dict[str, Any], problem: str, cli_schemas: dict[str, Any]) -> None:
    messages = [e.message for e in validator(cli_schemas["qa"]["request"]).iter_errors(request_)]
    assert any(problem in message for message in messages), messages


def test_a_rejected_request_still_gives_a_result_of_the_schema(cli_schemas: dict[str, Any], app: Celery,
                                                               fleet: Fleet) -> None:
    """A request sent without validating first: the failed JobResult also satisfies the result schema."""
    result = run_raw(app, {"pipeline": "qa", "inputs": {"question": 42}})
    assert result["state"] == "failed" and result["error"]["fields"] == ["question"]
    assert not list(validator(cli_schemas["qa"]["result"]).iter_errors(result))


def test_the_monitor_serves_the_same_schemas(redis_url: str, lm_url: str, tmp_path: Path) -> None:
    """`stagecoach monitor` answers /api/schema/NAME with what `stagecoach schema NAME` prints."""
    port = free_port()
    env = worker_env(redis_url, lm_url, catalog=[ROOT / "pipelines"])
    with (tmp_path / "monitor.log").open("wb") as log:
        proc = subprocess.Popen([STAGECOACH, "monitor", "--port", str(port)], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/healthz"), 60, "stagecoach monitor")
        with urllib.request.urlopen(f"{url}/api/schema/qa", timeout=10) as response:
            assert json.loads(response.read()) == json.loads(json.dumps(pipeline_schemas(CATALOG, "qa")))
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/api/schema/nope", timeout=10)
        assert missing.value.code == 404 and b"unknown pipeline 'nope'" in missing.value.read()
    finally:
        stop_process(proc)
