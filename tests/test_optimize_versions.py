"""The winner ships beside the old, on real workers: `stagecoach optimize` registers `qa@2` (its stage
versions pinned_only, its states saved as DSPy JSON), workers that load the new catalog serve both
versions, a traffic split sends its share of unpinned jobs to each (through the Python client and
`pipeline.run` alike), `stagecoach eval --versions 1,2` prints both, and the monitor counts jobs per version.

The catalog is a copy of pipelines/qa.yaml in a folder of this test's own, so the new version's file is
written there, never into the repository.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cli.fleet import client_for
from contracts.catalog import load_catalog
from contracts.names import ROUTING_QUEUE, RUN_TASK, stage_queue
from contracts.traffic import pick
from routing.client import Client
from tests import services
from tests.optimize_kit import QUESTIONS
from tests.services import ROOT, Fleet, worker_env

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
SHARE = 30  # % of unpinned jobs for the new version
JOBS = 300


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("optimize-versions")
    (root / "catalog").mkdir()
    shutil.copy(ROOT / "pipelines" / "qa.yaml", root / "catalog" / "qa.yaml")
    lines = [json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS]
    (root / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (root / "dev.jsonl").write_text("\n".join(lines[6:]) + "\n")
    return root


@pytest.fixture(scope="module")
def vary_lm() -> Iterator[str]:
    with services.test_lm("--vary") as url:
        yield url


def start_fleet(redis_url: str, lm_url: str, catalog: Path, queues: list[str]) -> Fleet:
    env = worker_env(redis_url, lm_url, catalog=[catalog], STAGECOACH_CACHE_ENABLED="true")
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-versions-")))
    fleet.start("stages", [stage_queue(q) for q in queues], concurrency=6)
    fleet.start("routing", [ROUTING_QUEUE], concurrency=4)
    fleet.wait_ready()
    return fleet


@pytest.fixture(scope="module")
def optimised(private_redis: str, vary_lm: str, folder: Path) -> dict[str, object]:
    """`stagecoach optimize qa` against a fleet that knows only version 1."""
    fleet = start_fleet(private_redis, vary_lm, folder / "catalog", ["key_terms", "answer"])
    try:
        env = worker_env(private_redis, vary_lm, catalog=[folder / "catalog"], STAGECOACH_CACHE_ENABLED="true")
        cmd = [STAGECOACH, "optimize", "qa", "--optimizer", "bootstrap", "--trainset", str(folder / "train.jsonl"),
               "--devset", str(folder / "dev.jsonl"), "--metric", "tests.optimize_kit:vary_metric", "--max-demos", "2",
               "--max-labeled", "1", "--traffic", str(SHARE), "--journal", str(folder / "journal.jsonl"), "--json"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        fleet.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    outcome: dict[str, object] = json.loads(done.stdout)
    return outcome


@pytest.fixture(scope="module")
def both(private_redis: str, vary_lm: str, folder: Path, optimised: dict[str, object]) -> Iterator[Client]:
    """Workers started on the catalog that now holds both versions."""
    queues = ["key_terms", "answer", "key_terms@2", "answer@2"]
    fleet = start_fleet(private_redis, vary_lm, folder / "catalog", queues)
    try:
        yield client_for(private_redis, vary_lm, [folder / "catalog"], shared_cache=True)
    finally:
        fleet.stop()


def test_optimize_registers_a_new_version_beside_the_old(optimised: dict[str, object], folder: Path) -> None:
    registered = optimised["registered"]
    assert isinstance(registered, dict)
    assert (registered["pipeline"], registered["version"], registered["base_version"]) == ("qa", "2", "1")
    written = yaml.safe_load(Path(registered["file"]).read_text())
    assert written["pipeline"]["traffic"] == {"1": 100 - SHARE, "2": SHARE}
    assert {s["name"]: (s["version"], s["pinned_only"]) for s in written["stages"]} == {
        "key_terms": ("2", True), "answer": ("2", True)}
    saved = json.loads(Path(registered["states"]["answer"]).read_text())
    assert saved["demos"] == optimised["stages"]["answer"]["demos"]  # type: ignore[index]
    assert saved["demos"], "the bootstrapped demos were saved"  # DSPy's JSON of a Predict: its state, flat
    catalog = load_catalog([folder / "catalog"])
    assert catalog.stage("answer").version == "1", "unpinned references keep the old stage version"
    assert catalog.pipeline("qa@1").root.model_dump()["steps"][0]["stage"] == "key_terms"
    assert optimised["jobs"] and not optimised["failed"]


def test_both_versions_run_side_by_side(both: Client) -> None:
    old = both.submit("qa@1", {"question": "Why is the sky blue?"}).get(timeout=120)
    new = both.submit("qa@2", {"question": "Why is the sky blue?"}).get(timeout=120)
    assert old.ok and new.ok, (old.error, new.error)
    assert [t.identity.split("#")[0] for t in old.timings] == ["key_terms@1", "answer@1"]
    assert [t.identity.split("#")[0] for t in new.timings] == ["key_terms@2", "answer@2"]
    assert all("#" in t.identity for t in new.timings), "the new stage versions carry their state's digest"
    assert new.usage["answer"].prompt_tokens > old.usage["answer"].prompt_tokens, "the demos reached the LM"


def test_traffic_split_holds_for_client_and_pipeline_run(both: Client) -> None:
    handles = [both.submit("qa", {"question": f"Question number {i}?"}) for i in range(JOBS)]
    sent = [both.app.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": {"question": f"Plain {i}?"}}],
                               queue=ROUTING_QUEUE) for i in range(JOBS // 3)]
    versions = Counter()
    for handle in handles:
        result = handle.get(timeout=300)
        assert result.ok, result.error
        assert result.pipeline_version == pick({"1": 100 - SHARE, "2": SHARE}, handle.id)  # decided by the job id
        versions[result.pipeline_version] += 1
    plain = Counter(raw.get(timeout=300)["pipeline_version"] for raw in sent)
    share = versions["2"] / JOBS
    assert abs(share - SHARE / 100) < 0.08, versions
    assert 0 < plain["2"] < len(sent) and set(plain) == {"1", "2"}, plain


def test_eval_versions_prints_both(both: Client, private_redis: str, vary_lm: str, folder: Path) -> None:
    env = worker_env(private_redis, vary_lm, catalog=[folder / "catalog"])
    cmd = [STAGECOACH, "eval", "qa", "--versions", "1,2", "--devset", str(folder / "dev.jsonl"), "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout)
    assert set(reports) == {"1", "2"}
    assert [reports[v]["pipeline"] for v in ("1", "2")] == ["qa@1", "qa@2"]
    assert all(r["succeeded"] == r["questions"] == 2 for r in reports.values())
    table = subprocess.run(cmd[:-1], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "qa@1" in table.stdout and "qa@2" in table.stdout, table.stderr[-2000:]
