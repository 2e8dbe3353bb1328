"""Versions side by side: two versions of a stage and of a pipeline in one catalog, on real workers.

The latest version keeps the bare name (task and queue `stage.vprobe`), the older one gets its own
(`stage.vprobe@1`). Requests pin a pipeline version (`vpipe@1` or a `version` field); a stage task
handed a node pinned to another version (a job compiled before the catalog changed) passes it to
that version's queue, so the job finishes on the versions it started with.
"""

import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from cli.compose import render as render_compose
from contracts.catalog import load_catalog
from contracts.envelope import Envelope
from contracts.errors import SpecError, UnknownVersionError
from contracts.jobs import JobResult
from contracts.names import ROUTING_QUEUE, RUN_TASK, stage_queue, stage_task
from contracts.priority import queue_lists
from routing.client import Client
from routing.recovery import Recovery, RecoveryError
from routing.tasks import start_envelope
from tests.services import ROOT, Fleet, client_for, worker_env
from workers.cache import StageCache
from workers.settings import CacheSettings

STAGES = """
stages:
  - {name: vprobe, version: "1", module: "examples.basic:Summarize", inputs: {document: str},
     outputs: {summary: str}}
  - {name: vprobe, version: 2, module: "examples.basic:Headline", inputs: {summary: str},
     outputs: {headline: str}}
"""
PIPELINES = """
pipelines:
  - {name: vpipe, version: "1", inputs: {document: str}, outputs: [summary], root: ["vprobe@1"]}
  - {name: vpipe, version: "2", inputs: {summary: str}, outputs: [headline], root: [vprobe]}
"""


@pytest.fixture(scope="module")
def catalog_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("versions")
    (folder / "stages.yaml").write_text(STAGES)  # the versions come from two files, as they would
    (folder / "pipelines.yaml").write_text(PIPELINES)
    return [folder / "stages.yaml", folder / "pipelines.yaml"]


@pytest.fixture(scope="module")
def client(private_redis: str, lm_url: str, catalog_paths: list[Path]) -> Iterator[Client]:
    env = worker_env(private_redis, lm_url, catalog=catalog_paths, STAGECOACH_CACHE_ENABLED="true")
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-versions-")))
    fleet.start("latest", [stage_queue("vprobe"), ROUTING_QUEUE])
    fleet.start("older", [stage_queue("vprobe@1")])
    try:
        fleet.wait_ready()
        yield client_for(private_redis, lm_url, catalog_paths)
    finally:
        fleet.stop()


def test_both_versions_load_each_with_its_own_queue(catalog_paths: list[Path]) -> None:
    catalog = load_catalog(catalog_paths)
    assert {ref: spec.version for ref, spec in catalog.stages.items()} == {"vprobe": "2", "vprobe@1": "1"}
    assert catalog.stage_ref("vprobe", "2") == "vprobe" and catalog.stage_ref("vprobe@1") == "vprobe@1"
    assert stage_task("vprobe@1") == stage_queue("vprobe@1") == "stage.vprobe@1"
    assert catalog.pipeline("vpipe").version == "2" and catalog.pipeline("vpipe", "1").version == "1"


def test_unknown_version_names_the_known_ones(catalog_paths: list[Path]) -> None:
    catalog = load_catalog(catalog_paths)
    with pytest.raises(UnknownVersionError, match="unknown version '9' of pipeline 'vpipe'; known versions: 1, 2"):
        catalog.pipeline("vpipe@9")
    with pytest.raises(UnknownVersionError, match="of stage 'vprobe'; known versions: 1, 2"):
        catalog.stage("vprobe", "3")


def test_the_same_version_defined_twice_differently_is_an_error(tmp_path: Path, catalog_paths: list[Path]) -> None:
    clash = tmp_path / "clash.yaml"
    clash.write_text(STAGES.replace("examples.basic:Summarize", "examples.basic:KeyTerms"))
    with pytest.raises(SpecError, match="stage 'vprobe@1' is defined twice with different contents"):
        load_catalog([*catalog_paths, clash])


def test_a_pipeline_node_pinning_an_unknown_stage_version_fails_at_load(tmp_path: Path,
                                                                       catalog_paths: list[Path]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {name: vbad, inputs: {document: str}, root: ['vprobe@4']}")
    with pytest.raises(SpecError, match="pipeline 'vbad': unknown version '4' of stage 'vprobe'"):
        load_catalog([*catalog_paths, bad])


@pytest.fixture(scope="module")
def app(client: Client) -> Celery:
    return client.app


def test_latest_version_runs_by_default(client: Client) -> None:
    result = client.submit("vpipe", {"summary": "Tides turn."}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.pipeline_version == "2"
    assert [(t.identity, t.worker.split("@")[0]) for t in result.timings] == [("vprobe@2", "latest")]
    assert result.answer == {"headline": "headline of <Tides turn.>"}


def test_a_request_pins_an_older_pipeline_version(client: Client) -> None:
    for handle in (client.submit("vpipe@1", {"document": "Tides turn."}),
                   client.submit("vpipe", {"document": "Tides turn."}, version="1")):
        result = handle.get(timeout=90)
        assert result.state == "succeeded", result.error
        assert result.pipeline_version == "1"
        assert [(t.identity, t.worker.split("@")[0]) for t in result.timings] == [("vprobe@1", "older")]


def test_plain_json_request_with_a_version_field(app: Celery) -> None:
    request = {"pipeline": "vpipe", "version": "1", "inputs": {"document": "Owls."}}
    result = app.send_task(RUN_TASK, args=[request], queue=ROUTING_QUEUE).get(timeout=90)
    assert result["state"] == "succeeded"
    assert result["answer"] == {"summary": "summary of <Owls.>"}


def test_plain_json_request_for_an_unknown_version_fails_clearly(app: Celery) -> None:
    request = {"pipeline": "vpipe@7", "inputs": {"document": "Owls."}}
    result = app.send_task(RUN_TASK, args=[request], queue=ROUTING_QUEUE).get(timeout=90)
    assert result["state"] == "failed"
    assert "unknown version '7' of pipeline 'vpipe'; known versions: 1, 2" in result["error"]["message"]


def test_a_job_compiled_before_an_upgrade_finishes_on_its_version(app: Celery) -> None:
    """A message for `stage.vprobe` pinned to version 1 (sent when 1 was the latest) reaches the
    v2 worker, which hands it to `stage.vprobe@1`."""
    envelope = Envelope(job_id="pinned", pipeline="vpipe", pipeline_version="1", state={"document": "Owls."})
    node = {"kind": "stage", "stage": "vprobe", "version": "1"}
    raw = app.send_task(stage_task("vprobe"), args=[envelope.model_dump(mode="json")],
                        kwargs={"node": node, "path": "vprobe"}, queue=stage_queue("vprobe")).get(timeout=90)
    done = Envelope.model_validate(raw)
    assert [(t.identity, t.worker.split("@")[0]) for t in done.timings] == [("vprobe@1", "older")]
    assert done.state["summary"] == "summary of <Owls.>"


def test_a_version_no_worker_knows_is_a_clear_job_error(app: Celery) -> None:
    job_id = f"gone-{uuid.uuid4().hex[:8]}"
    envelope = Envelope(job_id=job_id, pipeline="vpipe", pipeline_version="0", state={"summary": "Owls."})
    node = {"kind": "stage", "stage": "vprobe", "version": "0"}
    app.send_task(stage_task("vprobe"), args=[envelope.model_dump(mode="json")],
                  kwargs={"node": node, "path": "vprobe"}, queue=stage_queue("vprobe"))
    # a fatal error at the job's top level ends the job there: its JobResult is under the job id
    done = JobResult.model_validate(AsyncResult(job_id, app=app).get(timeout=90))
    assert done.state == "failed" and done.error is not None
    assert "unknown version '0' of stage 'vprobe'; known versions: 1, 2" in done.error.message


def test_cache_entries_are_kept_per_version(app: Celery, private_redis: str) -> None:
    stages = {s.stage for s in StageCache.from_url(private_redis, CacheSettings()).report().stages}
    assert {"vprobe@1", "vprobe@2"} <= stages


def test_submit_command_pins_a_version(private_redis: str, lm_url: str, catalog_paths: list[Path],
                                       client: Client) -> None:
    env = worker_env(private_redis, lm_url, catalog=catalog_paths)
    stagecoach = str(Path(sys.executable).with_name("stagecoach"))
    cmd = [stagecoach, "submit", "vpipe@1", "-i", "document=Owls.", "--wait", "--json"]
    shown = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    result = json.loads(shown.stdout)
    assert result["pipeline_version"] == "1" and result["timings"][0]["identity"] == "vprobe@1"
    unknown = subprocess.run([stagecoach, "submit", "vpipe@9", "-i", "document=Owls."], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2
    assert "unknown version '9' of pipeline 'vpipe'; known versions: 1, 2" in unknown.stderr


def test_compose_gives_each_version_a_worker_service(catalog_paths: list[Path]) -> None:
    compose = render_compose(load_catalog(catalog_paths))
    # the service is worker-<ref>; its Celery node is named as `stagecoach up` names it (one command builder)
    assert "worker-vprobe-v1:" in compose and "-Q stage.vprobe@1 -n stage-vprobe-v1@%h" in compose
    assert "worker-vprobe:" in compose and "-Q stage.vprobe -n stage-vprobe@%h" in compose


def test_a_job_resumed_after_a_deploy_runs_the_versions_it_started_with(
        client: Client, catalog_paths: list[Path], private_redis: str, tmp_path: Path) -> None:
    """`done:<path>` checkpoints are not keyed by version: a re-dispatch or resume after a deploy must run
    the versions the job started on (or refuse, saying which), never mix them."""
    job_id = f"deployed-{uuid.uuid4().hex[:8]}"
    request = {"pipeline": "vpipe", "inputs": {"summary": "Owls hunt at night."}}
    first, _, pinned = start_envelope(client.runtime.catalog, request, job_id)  # vpipe@2 runs vprobe@2
    client.ledger.start(first, request, pinned, "client", "test", final=True)
    newer = tmp_path / "v3.yaml"  # the deploy: vprobe@3 becomes the latest
    newer.write_text("stages:\n  - {name: vprobe, version: '3', module: 'examples.basic:Headline', "
                     "inputs: {summary: str}, outputs: {headline: str}}\n")
    deployed = load_catalog([*catalog_paths, newer])
    assert deployed.stage("vprobe").version == "3"
    db = redis.Redis.from_url(private_redis)
    lists = queue_lists(stage_queue("vprobe@2"))  # one Redis list per priority step
    before = sum(db.llen(key) for key in lists)
    Recovery(client.app, deployed, client.ledger).redispatch(job_id)
    assert sum(db.llen(key) for key in lists) == before + 1  # version 2's queue, not the latest's
    gone = tmp_path / "only-v3"
    gone.mkdir()
    (gone / "stages.yaml").write_text(newer.read_text())
    (gone / "pipelines.yaml").write_text(PIPELINES.replace('["vprobe@1"]', "[vprobe]"))
    with pytest.raises(RecoveryError, match="cannot run again on the versions it started with: unknown version "
                                            "'2' of stage 'vprobe'; known versions: 3"):
        Recovery(client.app, load_catalog([gone / "stages.yaml", gone / "pipelines.yaml"]),
                 client.ledger).redispatch(job_id)
