"""Ctrl-C stops an optimisation cleanly, and `--resume` continues from the evaluations that finished.

`stagecoach optimize qa --optimizer mipro` runs against a slowed test LM; SIGINT arrives while
evaluations run: the command exits 130 saying where the journal is, having cancelled its jobs. The
same command with `--resume` replays every journalled evaluation instead of running its job again,
and ends with the same program as an uninterrupted run.
"""

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.names import ROUTING_QUEUE, stage_queue
from tests import services
from tests.optimize_kit import QUESTIONS
from tests.services import ROOT, Fleet, wait_until, worker_env

STAGECOACH = str(Path(sys.executable).with_name("stagecoach"))
CATALOG = [ROOT / "pipelines"]


@pytest.fixture(scope="module")
def env(private_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with services.test_lm("--vary", "--latency-ms", "60") as lm_url:
        env = worker_env(private_redis, lm_url, catalog=CATALOG)
        fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="stagecoach-optimize-resume-")))
        fleet.start("qa-stages", [stage_queue("key_terms"), stage_queue("answer")], concurrency=8)
        fleet.start("routing", [ROUTING_QUEUE], concurrency=4)
        try:
            fleet.wait_ready()
            yield env
        finally:
            fleet.stop()


def command(folder: Path, journal: str, *extra: str) -> list[str]:
    return [STAGECOACH, "optimize", "qa", "--optimizer", "mipro", "--auto", "none", "--trials", "5",
            "--candidates", "3", "--seed", "11", "--max-demos", "2", "--max-labeled", "1",
            "--trainset", str(folder / "train.jsonl"), "--devset", str(folder / "dev.jsonl"),
            "--metric", "tests.optimize_kit:vary_metric", "--journal", str(folder / journal), "--no-register",
            "--json", *extra]


def test_ctrl_c_stops_cleanly_and_resume_replays_what_finished(env: dict[str, str], tmp_path: Path) -> None:
    lines = [json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(lines[5:]) + "\n")
    whole = subprocess.run(command(tmp_path, "whole.jsonl"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = json.loads(whole.stdout)

    proc = subprocess.Popen(command(tmp_path, "cut.jsonl"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "cut.jsonl"
    wait_until(lambda: journal.exists() and len(journal.read_text().splitlines()) >= 4, 300,
               "four evaluations in the journal")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "run the same command with --resume" in err
    finished = len(journal.read_text().splitlines())
    assert finished >= 4

    resumed = subprocess.run(command(tmp_path, "cut.jsonl", "--resume"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    outcome = json.loads(resumed.stdout)
    assert outcome["replayed"] >= finished - 1  # what finished is not run again (a last line may be cut off)
    assert outcome["jobs"] < expected["jobs"]
    assert outcome["stages"] == expected["stages"]
