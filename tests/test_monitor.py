"""The monitor end to end on the session fleet: a burst of good and failing jobs (the test LM's fault
markers), then the report, the JSON endpoint, /metrics, the web page (headless Chromium) and Flower
must agree on per-stage counts; traces print, save and replay; timings agree with `stagecoach eval`'s.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from contracts.catalog import Catalog
from contracts.jobs import JobResult
from monitor.graph import build as build_graph
from monitor.stats import stage_stats
from routing.client import Client
from tests import monitor_services as ms
from tests.services import ROOT, Fleet, client_for, per_stage_fleet, wait_until, worker_env

PIPELINES = ("qa", "patterns_branch", "patterns_map")


@pytest.fixture(scope="module")
def logdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="stagecoach-monitor-test-"))


# This module's own Redis and fleet (the stages of PIPELINES): jobs other modules left running would
# send events into the counts this module compares.
@pytest.fixture(scope="module")
def redis_url(private_redis: str) -> str:
    return private_redis


@pytest.fixture(scope="module")
def fleet(redis_url: str, lm_url: str, catalog: Catalog, logdir: Path) -> Iterator[Fleet]:
    stages = sorted({n.stage for p in PIPELINES for n in build_graph(catalog, p).nodes if n.stage})
    with per_stage_fleet(worker_env(redis_url, lm_url), logdir, stages) as own:
        yield own


@pytest.fixture(scope="module")
def client(redis_url: str, lm_url: str, fleet: Fleet) -> Client:
    return client_for(redis_url, lm_url)


@pytest.fixture(scope="module")
def services(redis_url: str, lm_url: str, fleet: Fleet, logdir: Path) -> Iterator[tuple[str, str]]:
    """The monitor and Flower, both listening before any job of this module."""
    with ms.flower(redis_url, lm_url, logdir) as flower_url, \
            ms.monitor_service(redis_url, lm_url, logdir) as monitor_url:
        yield monitor_url, flower_url


def burst_inputs(tag: str) -> list[tuple[str, str]]:
    """(kind, question): good questions, permanent LM errors, unparsable replies, one transient error."""
    good = [("ok", f"Question {i} about rivers ({tag})?") for i in range(6)]
    failing = [("lm400", f"Broken {i} ({tag}) [[lm:status=400]]") for i in range(2)]
    garbage = [("garbage", f"Garbled {i} ({tag}) [[lm:garbage]]") for i in range(2)]
    return [*good, *failing, *garbage, ("retry", f"Flaky ({tag}) [[lm:fail_first=1]]")]


def expected_counts(results: list[JobResult]) -> dict[str, Counter[str]]:
    """Per stage, from the JobResults alone: calls that succeeded, failed finally, and retried attempts
    (each retry logs a non-fatal error on the node; a node that never succeeded failed once)."""
    out: dict[str, Counter[str]] = {}
    for result in results:
        ran = {t.node for t in result.timings}
        for timing in result.timings:
            out.setdefault(timing.stage, Counter())["succeeded"] += 1
        errors = Counter((e.node, str(e.stage)) for e in result.errors)
        for (node, stage), n in errors.items():
            counts = out.setdefault(stage, Counter())
            counts["retries"] += n if node in ran else n - 1
            counts["failed"] += 0 if node in ran else 1
    return out


@pytest.fixture(scope="module")
def burst(services: tuple[str, str], client: Client) -> list[JobResult]:
    tag = uuid.uuid4().hex[:8]
    handles = [client.submit("qa", {"question": q}) for _, q in burst_inputs(tag)]
    results = [h.get(timeout=120) for h in handles]
    monitor_url = services[0]
    expected_jobs = len(results)
    wait_until(lambda: sum(p["runs"] for p in ms.get_json(f"{monitor_url}/api/stats")["pipelines"]) >= expected_jobs,
               60, "the monitor to count every job")
    return results


def stats_counts(stats: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    return {s["name"]: (s["runs"], s["succeeded"], s["failed"]) for s in stats["stages"]}


def test_burst_figures_agree_everywhere(services: tuple[str, str], burst: list[JobResult], fleet: Fleet,
                                        redis_url: str, lm_url: str, logdir: Path) -> None:
    monitor_url, flower_url = services
    assert Counter(r.state for r in burst) == {"succeeded": 7, "failed": 4}
    expected = expected_counts(burst)
    stats = ms.get_json(f"{monitor_url}/api/stats")
    counts = stats_counts(stats)
    for stage, want in expected.items():
        runs = want["succeeded"] + want["failed"]
        assert counts[stage] == (runs, want["succeeded"], want["failed"]), (stage, counts, dict(want))
    by_stage = {s["name"]: s for s in stats["stages"]}
    for stage, want in expected.items():
        assert by_stage[stage]["retries"] == want["retries"], (stage, by_stage[stage], dict(want))
    assert sum(by_stage["key_terms"]["failures"].values()) == 4, by_stage["key_terms"]["failures"]
    assert by_stage["key_terms"]["retries"] >= 1 and by_stage["answer"]["retries"] >= 1
    assert by_stage["answer"]["skipped"] == 0  # a failed job ends at the stage that failed: `answer` never sees it
    qa = next(p for p in stats["pipelines"] if p["name"] == "qa")
    assert (qa["runs"], qa["succeeded"], qa["failed"]) == (11, 7, 4)
    assert by_stage["answer"]["prompt_tokens"] > 0 and by_stage["answer"]["input_bytes"] > 0
    assert by_stage["answer"]["queue_wait"]["count"] >= 7
    groups = {(g["stage"], g["kind"]): g for g in stats["errors"]}
    assert sum(g["count"] for (stage, _), g in groups.items() if stage == "key_terms") == 4
    assert all(g["latest"][0]["job_id"] for g in groups.values())

    # the same timings as `stagecoach eval` computes from the JobResults (one stats module)
    eval_stats = stage_stats(t for r in burst for t in r.timings)
    for stage, summary in eval_stats.items():
        assert by_stage[stage]["runtime"] == pytest.approx(summary.model_dump()), stage

    # the CLI report reads the same store
    env = worker_env(redis_url, lm_url)
    report = json.loads(subprocess.run([ms.STAGECOACH, "monitor", "report", "--json"], cwd=ROOT, env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert stats_counts(report) == counts
    table = subprocess.run([ms.STAGECOACH, "monitor", "report"], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=True).stdout
    assert "key_terms" in table and "errors by stage and kind" in table

    # /metrics, labelled by stage (and by stage and pipeline)
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in text_string_to_metric_families(ms.get(f"{monitor_url}/metrics").decode())
               for s in m.samples}
    for stage, (runs, _, failed) in counts.items():
        assert metrics[("stagecoach_stage_runs_total", (("stage", stage),))] == runs
        assert metrics[("stagecoach_stage_failed_total", (("stage", stage),))] == failed
    pair = ("stagecoach_stage_pipeline_runs_total", (("outcome", "failed"), ("pipeline", "qa"), ("stage", "key_terms")))
    assert metrics[pair] == 4
    assert ("stagecoach_queue_depth", (("queue", "stage.answer"),)) in metrics

    # the web page in headless Chromium: each stage's runs as the JSON says
    shot = logdir / "monitor-page.png"
    dom = ms.browse(f"{monitor_url}/", shot)
    assert 'data-ready="1"' in dom, dom[:2000]
    for stage, (runs, _, failed) in counts.items():
        row = re.search(rf'<tr data-stage="{stage}"><td class="text">{stage}</td><td>(\d+)</td><td>(\d+)</td>'
                        rf'<td[^>]*>(\d+)', dom)
        assert row is not None, (stage, dom[:3000])
        assert (int(row.group(1)), int(row.group(3))) == (runs, failed)
    assert 'id="stage.key_terms.' in dom and 'id="stage.answer.' in dom  # the qa graph drawn
    width, height, distinct = ms.png_stats(shot)
    assert (width, height) == (1400, 2000) and distinct > 50, (width, height, distinct)

    # Flower: every stage worker, and each stage task of the burst (runs + pass-throughs)
    # Flower asks the workers with a short broadcast timeout: on a busy machine a reply can miss it,
    # so ask again until every worker has answered once
    listed: set[str] = set()

    def every_worker_listed() -> bool:
        listed.update(name.split("@")[0] for name in ms.get_json(f"{flower_url}/api/workers?refresh=1"))
        return {w.name for w in fleet.workers} <= listed

    wait_until(every_worker_listed, 90, "Flower listing every worker")
    tasks = ms.get_json(f"{flower_url}/api/tasks?limit=100000")
    job_ids = {r.job_id for r in burst}
    mine = [t for t in tasks.values() if t.get("root_id") in job_ids]
    per_name = Counter(t["name"] for t in mine)
    for stage, (runs, _, _) in counts.items():
        skipped = by_stage[stage]["skipped"]
        assert per_name[f"stage.{stage}"] == runs + skipped, (stage, per_name)
    # the Python client sends each job's chain itself: no pipeline.run or pipeline.finish task, and the
    # job's last stage runs under the job id (it closes the job and answers there)
    assert per_name["pipeline.run"] == 0 and per_name["pipeline.finish"] == 0, per_name
    last = {t["uuid"]: t for t in mine if t["uuid"] in job_ids}
    assert set(last) == {r.job_id for r in burst if r.ok} and {t["name"] for t in last.values()} == {"stage.answer"}
    assert {t["state"] for t in last.values()} == {"SUCCESS"}
    # a failed job ends where it failed: that stage's task reads FAILURE, with the job's error as its exception
    failed = [t for t in mine if t["state"] == "FAILURE"]
    assert sorted(t["root_id"] for t in failed) == sorted(r.job_id for r in burst if not r.ok)
    assert {t["name"] for t in failed} == {"stage.key_terms"}
    assert all(t["exception"].startswith("JobFailed(") and "key_terms" in t["exception"] for t in failed), failed
    # one job, start to finish, by searching its id (docs/monitor.md: reading a job in Flower)
    job = burst[0].job_id
    found = ms.get_json(f"{flower_url}/api/tasks?search={job}")
    assert set(found) == {t["uuid"] for t in mine if t["root_id"] == job}
    assert sorted(t["name"] for t in found.values()) == ["stage.answer", "stage.key_terms"]
    if os.environ.get("STAGECOACH_SCREENSHOT_DIR"):  # how docs/monitor-page.png is made
        shutil.copy(shot, Path(os.environ["STAGECOACH_SCREENSHOT_DIR"]) / "monitor-page.png")


def test_page_and_json_behind_auth(services: tuple[str, str], burst: list[JobResult], redis_url: str, lm_url: str,
                                   logdir: Path) -> None:
    """With auth on, the monitor answers nothing without an API token; with one (the page: `/?token=` once,
    then a cookie) the page renders the same figures in headless Chromium."""
    from contracts.tokens import TokenRecord, TokenStore

    tokens = TokenStore(redis.Redis.from_url(redis_url))
    token = tokens.create(TokenRecord(name=f"viewer-{uuid.uuid4().hex[:6]}", scopes=["read"]))
    narrow = tokens.create(TokenRecord(name=f"qa-{uuid.uuid4().hex[:6]}", scopes=["read"], pipelines=["qa"]))
    with ms.monitor_service(redis_url, lm_url, logdir, token, STAGECOACH_MONITOR_AUTH="true") as guarded:
        for path in ("/", "/api/stats", "/metrics", f"/api/trace/{burst[0].job_id}"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                ms.get(f"{guarded}{path}")
            assert refused.value.code == 401, path
        with pytest.raises(urllib.error.HTTPError) as narrowed:
            ms.get(f"{guarded}/api/stats", narrow)
        assert narrowed.value.code == 403
        counts = stats_counts(ms.get_json(f"{guarded}/api/stats", token))
        shot = logdir / "monitor-page-auth.png"
        dom = ms.browse(f"{guarded}/?token={token}", shot)
        assert 'data-ready="1"' in dom, dom[:2000]
        for stage, (runs, _, failed) in counts.items():
            row = re.search(rf'<tr data-stage="{stage}"><td class="text">{stage}</td><td>(\d+)</td><td>(\d+)</td>'
                            rf'<td[^>]*>(\d+)', dom)
            assert row is not None and (int(row.group(1)), int(row.group(3))) == (runs, failed), (stage, dom[:3000])
        width, height, distinct = ms.png_stats(shot)
        assert (width, height) == (1400, 2000) and distinct > 50


def test_monitor_refuses_a_public_address_with_auth_off(redis_url: str, lm_url: str) -> None:
    env = {**worker_env(redis_url, lm_url), "STAGECOACH_MONITOR_HOST": "0.0.0.0"}
    done = subprocess.run([ms.STAGECOACH, "monitor", "--host", "0.0.0.0", "--port", str(ms.free_port())], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "refusing to listen on 0.0.0.0 with auth off" in done.stderr


def test_page_graph_is_the_cli_drawing_and_a_new_monitor_reads_the_same_store(
        services: tuple[str, str], burst: list[JobResult], redis_url: str, lm_url: str, logdir: Path) -> None:
    monitor_url = services[0]
    cli_svg = subprocess.run([ms.STAGECOACH, "graph", "qa", "--format", "svg"], cwd=ROOT,
                             env=worker_env(redis_url, lm_url), capture_output=True, check=True).stdout
    assert ms.get(f"{monitor_url}/api/graph/qa.svg") == cli_svg
    before = stats_counts(ms.get_json(f"{monitor_url}/api/stats"))
    with ms.monitor_service(redis_url, lm_url, logdir) as restarted:  # a new process: state is in Redis
        assert stats_counts(ms.get_json(f"{restarted}/api/stats")) == before


def test_trace_prints_saves_and_replays(services: tuple[str, str], client: Client, redis_url: str,
                                        lm_url: str, tmp_path: Path) -> None:
    monitor_url = services[0]
    job = client.submit("patterns_branch", {"question": f"Write an essay on tides ({uuid.uuid4().hex[:6]})"})
    result = job.get(timeout=120)
    wait_until(lambda: ms.get_json(f"{monitor_url}/api/trace/{job.id}")["state"] != "running", 30, "trace")
    env = worker_env(redis_url, lm_url)
    saved = tmp_path / "trace.json"
    shown = subprocess.run([ms.STAGECOACH, "trace", job.id, "--save", str(saved)], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True).stdout
    trace = json.loads(saved.read_text())
    assert trace["state"] == result.state and trace["inputs"] == {"question": result.fields["question"]}
    assert [n["stage"] for n in trace["nodes"]] == [t.stage for t in result.timings]
    assert trace["path"]["decisions"] == [f"{d.node}: {d.kind} -> {d.choice}" for d in result.trail]
    types = [e["type"] for e in trace["events"]]
    assert types[0] == "job-queued" and types[-1] == "job-finished"
    assert {"stage-started", "stage-outcome"} <= set(types)
    for timing in result.timings:
        assert timing.stage in shown
    assert f"{result.trail[0].kind} -> {result.trail[0].choice}" in shown

    replay = subprocess.run([ms.STAGECOACH, "trace", "--replay", str(saved)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert replay.returncode == 0 and "same path" in replay.stdout, replay.stdout + replay.stderr

    trace["path"]["stages"] = trace["path"]["stages"][:-1]  # a path the job will not take
    saved.write_text(json.dumps(trace))
    replay = subprocess.run([ms.STAGECOACH, "trace", "--replay", str(saved)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert replay.returncode == 1 and "different path" in replay.stdout


def test_trace_of_a_map_records_each_item(services: tuple[str, str], client: Client, catalog: Catalog) -> None:
    monitor_url = services[0]
    result = client.submit("patterns_map", catalog.pipeline("patterns_map").example).get(timeout=120)
    wait_until(lambda: ms.get_json(f"{monitor_url}/api/trace/{result.job_id}")["state"] != "running", 30, "trace")
    trace = ms.get_json(f"{monitor_url}/api/trace/{result.job_id}")
    assert sorted(n["node"] for n in trace["nodes"]) == sorted(t.node for t in result.timings)
    assert any(d["kind"] == "map" for d in trace["decisions"]), trace["decisions"]


def test_unknown_trace_is_a_clear_error(services: tuple[str, str], redis_url: str, lm_url: str) -> None:
    done = subprocess.run([ms.STAGECOACH, "trace", "no-such-job"], cwd=ROOT, env=worker_env(redis_url, lm_url),
                          capture_output=True, text=True)
    assert done.returncode == 3 and "no trace of job no-such-job" in done.stderr


def test_bad_query_and_unknown_pipeline_are_clear_http_errors(services: tuple[str, str]) -> None:
    monitor_url = services[0]
    with pytest.raises(urllib.error.HTTPError) as bad:
        ms.get(f"{monitor_url}/api/series?buckets=many")
    assert bad.value.code == 400 and b"'buckets': not an integer ('many')" in bad.value.read()
    with pytest.raises(urllib.error.HTTPError) as unknown:
        ms.get(f"{monitor_url}/api/graph/nope.svg")
    assert unknown.value.code == 404 and b"nope" in unknown.value.read()
