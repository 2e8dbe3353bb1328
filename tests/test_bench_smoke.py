"""The benchmark harness keeps working: every scenario runs at tiny sizes and reports sane numbers.

Speed is never asserted here (shared machines are noisy); only that each scenario in
`bench.SCENARIOS` produced positive, finite samples and ratios, and that the docs table was written.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench import SCENARIOS
from bench.report import BEGIN, END
from cli.fleet import PYTHON, ROOT


@pytest.mark.timeout(1800)  # thirteen fleets start one after another
def test_bench_smoke_writes_every_scenario(tmp_path: Path) -> None:
    results, docs = tmp_path / "results.json", tmp_path / "benchmarks.md"
    run = subprocess.run([PYTHON, "-m", "bench", "--smoke", "--results", str(results), "--docs", str(docs)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    doc = json.loads(results.read_text())
    assert set(doc["scenarios"]) == set(SCENARIOS)
    assert doc["machine"]["cpus"] >= 1 and doc["date"]
    for name, scenario in doc["scenarios"].items():
        assert scenario["series"] and scenario["ratios"], name
        for label, series in scenario["series"].items():
            assert series["n"] > 0, (name, label)
            assert all(_sane(series[k]) for k in ("median", "p25", "p75", "min", "max")), (name, label, series)
        for ratio in scenario["ratios"]:
            assert _sane(ratio["value"]), (name, ratio)
    text = docs.read_text()
    assert BEGIN in text and END in text
    assert all(f"### {name}:" in text for name in SCENARIOS)


def _sane(value: float) -> bool:
    return math.isfinite(value) and value > 0
